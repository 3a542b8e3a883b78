//! The host-neutral request and response heads.
//!
//! A host fills a [`RequestHead`] from whatever its HTTP parser produced; an adapter turns an
//! app's status line and header list into a [`ResponseHead`] through [`ResponseHead::new`],
//! which refuses anything that is not valid HTTP (RFC 9110 section 5), so no app header
//! reaches the wire unchecked.

use crate::error::DispatchError;
use bytes::Bytes;
use std::net::SocketAddr;

/// The HTTP version a request arrived over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.0.
    Http10,
    /// HTTP/1.1.
    Http11,
    /// HTTP/2.
    Http2,
}

impl HttpVersion {
    /// `SERVER_PROTOCOL` as CGI (RFC 3875 section 4.1.16) and PEP 3333 spell it.
    pub fn server_protocol(self) -> &'static str {
        match self {
            HttpVersion::Http10 => "HTTP/1.0",
            HttpVersion::Http11 => "HTTP/1.1",
            HttpVersion::Http2 => "HTTP/2",
        }
    }

    /// The version as ASGI's `http_version` spells it: `"1.0"`, `"1.1"` or `"2"`.
    pub fn short(self) -> &'static str {
        match self {
            HttpVersion::Http10 => "1.0",
            HttpVersion::Http11 => "1.1",
            HttpVersion::Http2 => "2",
        }
    }
}

/// How much request body follows the head, as the host's framing says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body at all: the adapter answers reads without asking the host.
    Empty,
    /// `Content-Length` bytes.
    Known(u64),
    /// Chunked (HTTP/1.1) or a stream without a length (HTTP/2).
    Unknown,
}

/// A request head, owned, with nothing borrowed from the host.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// The method, as sent (`GET`).
    pub method: String,
    /// The path as sent, still percent-encoded, without the query.
    pub raw_path: Bytes,
    /// The query string without `?`, as sent.
    pub query: Bytes,
    /// Which protocol the request came over.
    pub version: HttpVersion,
    /// Header fields in arrival order, names lowercased, repeated fields kept apart.
    pub headers: Vec<(Bytes, Bytes)>,
    /// The TLS parameters when the connection is TLS.
    pub tls: Option<TlsInfo>,
    /// Whether the client's request was made over TLS: the connection is (`tls`), or a
    /// trusted proxy says so (`X-Forwarded-Proto: https`). Decides `wsgi.url_scheme` and the
    /// ASGI `scheme`.
    pub secure: bool,
    /// Whether the host can deliver response trailers on this connection (HTTP/2 here:
    /// Pingora drops them on HTTP/1.1). Decides ASGI's `http.response.trailers` extension.
    pub trailers: bool,
    /// Whether the host can send a 103 Early Hints response before the final one (HTTP/1.1:
    /// RFC 9110 section 15.2 forbids 1xx to HTTP/1.0 clients, and Pingora sends none on
    /// HTTP/2). Decides ASGI's `http.response.early_hint` extension.
    pub early_hints: bool,
    /// The peer's address, when the transport has one.
    pub client: Option<SocketAddr>,
    /// The local address the request arrived on.
    pub server: Option<SocketAddr>,
    /// What the framing says about the body.
    pub body: BodyLength,
}

impl RequestHead {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.as_ref() == name.as_bytes())
            .map(|(_, v)| v.as_ref())
    }

    /// The head of a request whose whole body the host has read (`request_buffering`): its
    /// length is known now, so it is said as a `Content-Length` and the chunked framing,
    /// which no longer applies, is dropped, as a buffering proxy forwards it (RFC 9112
    /// section 7.1.3: a recipient that removes the chunked coding sets the length).
    pub fn set_buffered_length(&mut self, len: u64) {
        self.headers.retain(|(name, _)| {
            !name.eq_ignore_ascii_case(b"content-length")
                && !name.eq_ignore_ascii_case(b"transfer-encoding")
        });
        self.headers.push((
            Bytes::from_static(b"content-length"),
            Bytes::from(len.to_string()),
        ));
        self.body = if len == 0 {
            BodyLength::Empty
        } else {
            BodyLength::Known(len)
        };
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        if self.secure {
            "https"
        } else {
            "http"
        }
    }
}

/// What a TLS connection negotiated, as the ASGI TLS extension reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// The server's certificate, PEM-encoded, when the host knows it.
    pub server_cert: Option<std::sync::Arc<str>>,
    /// The protocol version by name (`TLSv1.3`).
    pub protocol: String,
    /// The cipher suite by name (`TLS13_AES_256_GCM_SHA384`).
    pub cipher: String,
    /// The protocol version as its IANA number (`0x0304` for TLS 1.3), if known.
    pub version: Option<u16>,
    /// The cipher suite as its IANA number, if known.
    pub cipher_suite: Option<u16>,
}

/// A response head that has passed the checks of [`ResponseHead::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code, 200-999 (no interim 1xx as a final status).
    pub status: u16,
    /// The reason phrase the app gave, if any.
    pub reason: String,
    /// Header fields, in the app's order, hop-by-hop ones removed.
    pub headers: Vec<(Bytes, Bytes)>,
}

/// Connection-specific fields an app must not set (PEP 3333 "Other HTTP Features";
/// RFC 9110 section 7.6.1): the server owns framing and connection management.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

impl ResponseHead {
    /// Checks a status line (`"200 OK"`) and header list as a gateway app gave them.
    /// Hop-by-hop headers are dropped (they are the server's), and each drop is logged.
    pub fn new(status_line: &str, headers: Vec<(Bytes, Bytes)>) -> Result<ResponseHead, String> {
        let (code, reason) = status_line.split_once(' ').unwrap_or((status_line, ""));
        let status = code
            .parse::<u16>()
            .ok()
            .filter(|s| code.len() == 3 && (200..=999).contains(s))
            .ok_or_else(|| {
                format!("invalid status {status_line:?}: want \"NNN Reason\" with NNN 200-999")
            })?;
        Self::with_status(status, reason, headers)
    }

    /// Checks a numeric status (ASGI's `http.response.start`), an optional reason phrase and
    /// a header list; the same rules as [`ResponseHead::new`].
    pub fn with_status(
        status: u16,
        reason: &str,
        headers: Vec<(Bytes, Bytes)>,
    ) -> Result<ResponseHead, String> {
        if !(200..=999).contains(&status) {
            return Err(format!("invalid status {status}: want 200-999"));
        }
        if !reason
            .bytes()
            .all(|b| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80)
        {
            return Err(format!("invalid reason phrase {reason:?}"));
        }
        let mut kept = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            check_header(&name, &value)?;
            if HOP_BY_HOP
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
            {
                log::warn!(
                    "dropped hop-by-hop response header {:?} set by the app",
                    String::from_utf8_lossy(&name)
                );
                continue;
            }
            kept.push((name, value));
        }
        Ok(ResponseHead {
            status,
            reason: reason.to_owned(),
            headers: kept,
        })
    }

    /// Whether the app set `Content-Length`.
    pub fn has_content_length(&self) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(b"content-length"))
    }

    /// The body length the app's `Content-Length` states, when it gave a valid one.
    pub fn content_length(&self) -> Option<u64> {
        let (_, value) = self
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(b"content-length"))?;
        std::str::from_utf8(value).ok()?.trim().parse().ok()
    }
}

/// Holds a response body to the `Content-Length` its app stated, as PEP 3333 asks ("Buffering
/// and Streaming": no more bytes than the header allows; too few, and the connection is
/// closed and the error reported). Past the stated length the bytes would be read as the next
/// response on the connection (RFC 9112 section 6.3); short of it, the client would wait for
/// the rest. Each host counts its body through one of these.
#[derive(Debug, Default)]
pub struct StatedLength {
    /// The length stated, and how much of it is still to come; `None`: no length to hold to
    /// (none stated, or a response without a body: HEAD, 204, 304).
    stated: Option<(u64, u64)>,
    /// Bytes were dropped already (so that it is told once).
    cut: bool,
}

impl StatedLength {
    /// For a response with `head`; `body_allowed` is false for an answer to HEAD.
    pub fn new(head: &ResponseHead, body_allowed: bool) -> StatedLength {
        let has_body = body_allowed && !matches!(head.status, 204 | 304);
        StatedLength {
            stated: head.content_length().filter(|_| has_body).map(|n| (n, n)),
            cut: false,
        }
    }

    /// How many of the next `len` bytes of the body may go out; the rest are to be dropped.
    /// The first time some are, the error to log comes with it.
    pub fn admit(&mut self, len: u64) -> (u64, Option<DispatchError>) {
        let Some((stated, left)) = self.stated.as_mut() else {
            return (len, None);
        };
        let admitted = len.min(*left);
        *left -= admitted;
        if admitted == len || std::mem::replace(&mut self.cut, true) {
            return (admitted, None);
        }
        let why = format!(
            "the body goes on past the {stated} bytes its Content-Length states; the rest was \
             dropped"
        );
        (admitted, Some(DispatchError::BadResponse(why)))
    }

    /// At the body's end: the error to log when it fell short of the stated length. The
    /// connection must then be closed, not reused.
    pub fn shortfall(&self) -> Option<DispatchError> {
        let (stated, left) = self.stated.filter(|&(_, left)| left > 0)?;
        Some(DispatchError::BadResponse(format!(
            "the body ended after {} of the {stated} bytes its Content-Length states; the \
             connection was closed",
            stated - left
        )))
    }
}

/// RFC 9110 section 5.1 (field names are tokens) and 5.5 (values: no CR, LF, NUL or other
/// controls but HTAB). This is what stops response splitting.
pub fn check_header(name: &[u8], value: &[u8]) -> Result<(), String> {
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(format!(
            "invalid response header name {:?}",
            String::from_utf8_lossy(name)
        ));
    }
    if !value
        .iter()
        .all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80)
    {
        return Err(format!(
            "invalid byte in the value of response header {:?}",
            String::from_utf8_lossy(name)
        ));
    }
    Ok(())
}

/// `tchar` of RFC 9110 section 5.6.2.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: &str, v: &str) -> (Bytes, Bytes) {
        (
            Bytes::copy_from_slice(n.as_bytes()),
            Bytes::copy_from_slice(v.as_bytes()),
        )
    }

    #[test]
    fn valid_head_keeps_order_and_drops_hop_by_hop() {
        let head = ResponseHead::new(
            "201 Created",
            vec![
                h("X-A", "1"),
                h("Connection", "close"),
                h("Set-Cookie", "a=b"),
            ],
        )
        .unwrap();
        assert_eq!(head.status, 201);
        assert_eq!(head.reason, "Created");
        assert_eq!(head.headers, vec![h("X-A", "1"), h("Set-Cookie", "a=b")]);
    }

    #[test]
    fn a_body_is_held_to_its_stated_length() {
        let head = ResponseHead::new("200 OK", vec![h("Content-Length", "10")]).unwrap();
        let mut stated = StatedLength::new(&head, true);
        assert_eq!(stated.admit(4).0, 4);
        assert!(stated.shortfall().is_some(), "6 bytes are still owed");
        let (admitted, cut) = stated.admit(8);
        assert_eq!(admitted, 6);
        assert!(cut.is_some(), "the first cut is told");
        assert!(stated.admit(5) == (0, None), "and only the first");
        assert!(stated.shortfall().is_none());
        // No length stated, or no body allowed: nothing to hold to.
        let free = ResponseHead::new("200 OK", vec![]).unwrap();
        assert_eq!(StatedLength::new(&free, true).admit(99).0, 99);
        assert!(StatedLength::new(&head, false).shortfall().is_none());
        let not_modified = ResponseHead::new("304 Not Modified", vec![h("Content-Length", "10")]);
        assert!(StatedLength::new(&not_modified.unwrap(), true)
            .shortfall()
            .is_none());
    }

    #[test]
    fn splitting_and_bad_status_are_refused() {
        assert!(ResponseHead::new("200 OK", vec![h("X", "a\r\nSet-Cookie: evil=1")]).is_err());
        assert!(ResponseHead::new("200 OK", vec![h("X", "a\nb")]).is_err());
        assert!(ResponseHead::new("200 OK", vec![h("X", "a\0b")]).is_err());
        assert!(ResponseHead::new("200 OK", vec![h("Bad Name", "v")]).is_err());
        assert!(ResponseHead::new("200 OK", vec![h("", "v")]).is_err());
        assert!(ResponseHead::new("OK", vec![]).is_err());
        assert!(ResponseHead::new("2000 OK", vec![]).is_err());
        assert!(ResponseHead::new("100 Continue", vec![]).is_err());
        assert!(ResponseHead::new("200 O\rK", vec![]).is_err());
        assert!(ResponseHead::new("200", vec![]).is_ok());
    }

    #[test]
    fn a_buffered_body_is_told_by_its_length_not_its_chunks() {
        let mut head = RequestHead {
            method: "POST".into(),
            raw_path: Bytes::from_static(b"/"),
            query: Bytes::new(),
            version: HttpVersion::Http11,
            headers: vec![h("host", "x"), h("transfer-encoding", "chunked")],
            tls: None,
            secure: false,
            trailers: false,
            early_hints: true,
            client: None,
            server: None,
            body: BodyLength::Unknown,
        };
        head.set_buffered_length(11);
        assert_eq!(head.body, BodyLength::Known(11));
        assert_eq!(
            head.headers,
            vec![h("host", "x"), h("content-length", "11")]
        );
        head.set_buffered_length(0);
        assert_eq!(head.body, BodyLength::Empty);
        assert_eq!(head.header("content-length"), Some(&b"0"[..]));
    }
}
