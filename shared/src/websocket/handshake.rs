//! The opening handshake, server side (RFC 6455 sections 4.2.1 and 4.2.2).

use super::deflate::{self, DeflateConfig, DeflateParams};
use crate::model::HttpVersion;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use std::fmt;

/// The GUID appended to the client's key before hashing (RFC 6455 section 1.3).
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What a request is, as far as WebSockets go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    /// Not an upgrade to WebSocket (no `Upgrade: websocket` with `Connection: upgrade`):
    /// serve it as plain HTTP.
    NotWebSocket,
    /// An upgrade to WebSocket that is malformed: refuse it with the status its
    /// [`crate::DispatchError`] gives (RFC 6455 section 4.2.1, last paragraph).
    Invalid(HandshakeError),
    /// A valid opening handshake.
    WebSocket(Handshake),
}

/// Why a WebSocket upgrade request must be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// Not HTTP/1.1 or later (RFC 6455 section 4.2.1 item 1).
    HttpVersion,
    /// Not a GET (section 4.2.1 item 1).
    Method,
    /// No `Host` header (section 4.2.1 item 2).
    MissingHost,
    /// `Sec-WebSocket-Key` missing, repeated, or not 16 bytes in base64 (item 5).
    BadKey,
    /// `Sec-WebSocket-Version` missing or not 13 (item 6, section 4.4): 426.
    UnsupportedVersion,
    /// A `Sec-WebSocket-Protocol` element that is not a token (section 4.1, item 10).
    BadSubprotocol,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandshakeError::HttpVersion => "WebSocket needs HTTP/1.1",
            HandshakeError::Method => "WebSocket handshake must be a GET",
            HandshakeError::MissingHost => "WebSocket handshake without Host",
            HandshakeError::BadKey => "missing or invalid Sec-WebSocket-Key",
            HandshakeError::UnsupportedVersion => "unsupported Sec-WebSocket-Version (13 only)",
            HandshakeError::BadSubprotocol => "invalid Sec-WebSocket-Protocol",
        })
    }
}

impl std::error::Error for HandshakeError {}

/// A valid opening handshake: what the 101 response needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The `Sec-WebSocket-Accept` value (RFC 6455 section 4.2.2 item 5.4).
    pub accept: String,
    /// The subprotocols the client offers, in its order, from every
    /// `Sec-WebSocket-Protocol` header (section 4.1 item 10).
    pub subprotocols: Vec<String>,
    /// permessage-deflate, when negotiated (RFC 7692 section 5).
    pub deflate: Option<DeflateParams>,
}

impl Handshake {
    /// The headers of the 101 response besides the app's own (RFC 6455 section 4.2.2 item
    /// 5): `Upgrade`, `Connection`, `Sec-WebSocket-Accept`, the chosen subprotocol and the
    /// extensions. A subprotocol the client did not offer is left out, since the client
    /// would fail the connection on it (section 4.1, checks of the response, item 6).
    pub fn response_headers(&self, subprotocol: Option<&str>) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            ("Upgrade", "websocket".to_string()),
            ("Connection", "Upgrade".to_string()),
            ("Sec-WebSocket-Accept", self.accept.clone()),
        ];
        if let Some(chosen) = subprotocol {
            if self.subprotocols.iter().any(|offered| offered == chosen) {
                headers.push(("Sec-WebSocket-Protocol", chosen.to_string()));
            } else {
                log::warn!("WebSocket subprotocol {chosen:?} was not offered by the client");
            }
        }
        if let Some(deflate) = &self.deflate {
            headers.push(("Sec-WebSocket-Extensions", deflate.response_header()));
        }
        headers
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` value: base64 of the SHA-1 of the key
/// and the GUID (RFC 6455 section 4.2.2 item 5.4).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key);
    sha1.update(GUID);
    BASE64.encode(sha1.digest().bytes())
}

/// Header values named `name`, any case.
fn values<'a>(headers: &'a [(Bytes, Bytes)], name: &'a str) -> impl Iterator<Item = &'a [u8]> {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| trim(v))
}

fn trim(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// Whether any `name` header, as a comma-separated list, has `token` (any case).
fn has_token(headers: &[(Bytes, Bytes)], name: &str, token: &str) -> bool {
    values(headers, name)
        .flat_map(|v| v.split(|&b| b == b','))
        .any(|t| trim(t).eq_ignore_ascii_case(token.as_bytes()))
}

/// Reads an opening handshake (RFC 6455 section 4.2.1) from the request line and headers
/// (names in any case), and negotiates permessage-deflate with `deflate` (RFC 7692).
///
/// A request is an upgrade when an `Upgrade` header lists `websocket` and a `Connection`
/// header lists `upgrade` (both token lists, any case); anything else is
/// [`Upgrade::NotWebSocket`]. HTTP/2 never is: it has no `Upgrade` (RFC 9113 section 8.2.2).
pub fn parse_handshake(
    method: &str,
    version: HttpVersion,
    headers: &[(Bytes, Bytes)],
    deflate: &DeflateConfig,
) -> Upgrade {
    if version == HttpVersion::Http2
        || !has_token(headers, "upgrade", "websocket")
        || !has_token(headers, "connection", "upgrade")
    {
        return Upgrade::NotWebSocket;
    }
    match check(method, version, headers, deflate) {
        Ok(handshake) => Upgrade::WebSocket(handshake),
        Err(e) => Upgrade::Invalid(e),
    }
}

fn check(
    method: &str,
    version: HttpVersion,
    headers: &[(Bytes, Bytes)],
    deflate: &DeflateConfig,
) -> Result<Handshake, HandshakeError> {
    if version == HttpVersion::Http10 {
        return Err(HandshakeError::HttpVersion);
    }
    if method != "GET" {
        return Err(HandshakeError::Method);
    }
    if values(headers, "host").next().is_none() {
        return Err(HandshakeError::MissingHost);
    }
    let mut versions = values(headers, "sec-websocket-version");
    if versions.next() != Some(&b"13"[..]) || versions.next().is_some() {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let mut keys = values(headers, "sec-websocket-key");
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) => key,
        _ => return Err(HandshakeError::BadKey),
    };
    match BASE64.decode(key) {
        Ok(nonce) if nonce.len() == 16 => {}
        _ => return Err(HandshakeError::BadKey),
    }
    let mut subprotocols: Vec<String> = Vec::new();
    for element in values(headers, "sec-websocket-protocol").flat_map(|v| v.split(|&b| b == b',')) {
        let element = trim(element);
        if element.is_empty() {
            continue;
        }
        if !element.iter().all(|&b| deflate::is_tchar(b)) {
            return Err(HandshakeError::BadSubprotocol);
        }
        let element = String::from_utf8_lossy(element);
        if !subprotocols.iter().any(|seen| *seen == element) {
            subprotocols.push(element.into_owned());
        }
    }
    Ok(Handshake {
        accept: accept_key(key),
        subprotocols,
        deflate: deflate::negotiate(headers, deflate),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: &[(&str, &str)]) -> Vec<(Bytes, Bytes)> {
        let mut headers: Vec<(Bytes, Bytes)> = [
            ("Host", "server.example.com"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ]
        .iter()
        .chain(extra)
        .map(|(n, v)| {
            (
                Bytes::copy_from_slice(n.as_bytes()),
                Bytes::copy_from_slice(v.as_bytes()),
            )
        })
        .collect();
        headers.retain(|(_, v)| !v.is_empty());
        headers
    }

    fn parse(headers: &[(Bytes, Bytes)]) -> Upgrade {
        parse_handshake(
            "GET",
            HttpVersion::Http11,
            headers,
            &DeflateConfig::default(),
        )
    }

    fn without(name: &str) -> Vec<(Bytes, Bytes)> {
        let mut headers = request(&[]);
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name.as_bytes()));
        headers
    }

    #[test]
    fn accept_key_of_the_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn valid_handshake() {
        let Upgrade::WebSocket(hs) = parse(&request(&[])) else {
            panic!("not accepted");
        };
        assert_eq!(hs.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert!(hs.subprotocols.is_empty());
        assert_eq!(hs.deflate, None);
        assert_eq!(
            hs.response_headers(Some("chat")),
            vec![
                ("Upgrade", "websocket".to_string()),
                ("Connection", "Upgrade".to_string()),
                (
                    "Sec-WebSocket-Accept",
                    "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_string()
                ),
            ]
        );
    }

    #[test]
    fn token_lists_any_case_and_subprotocols() {
        let mut headers = request(&[
            ("sec-websocket-protocol", " chat, superchat ,,"),
            ("SEC-WEBSOCKET-PROTOCOL", "v2.json , chat"),
            (
                "sec-websocket-extensions",
                "permessage-deflate; client_max_window_bits",
            ),
        ]);
        for (name, value) in &mut headers {
            if name.eq_ignore_ascii_case(b"connection") {
                *value = Bytes::from_static(b"keep-alive, UPGRADE");
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                *value = Bytes::from_static(b"WebSocket");
            }
        }
        let Upgrade::WebSocket(hs) = parse(&headers) else {
            panic!("not accepted");
        };
        assert_eq!(hs.subprotocols, ["chat", "superchat", "v2.json"]);
        let response = hs.response_headers(Some("superchat"));
        assert!(response.contains(&("Sec-WebSocket-Protocol", "superchat".to_string())));
        assert!(response.contains(&("Sec-WebSocket-Extensions", "permessage-deflate".to_string())));
    }

    #[test]
    fn not_an_upgrade() {
        assert_eq!(parse(&without("upgrade")), Upgrade::NotWebSocket);
        assert_eq!(parse(&without("connection")), Upgrade::NotWebSocket);
        assert_eq!(parse(&request(&[]).split_off(5)), Upgrade::NotWebSocket);
        let mut h2c = request(&[]);
        h2c[1].1 = Bytes::from_static(b"h2c");
        assert_eq!(parse(&h2c), Upgrade::NotWebSocket);
        let h2 = parse_handshake(
            "GET",
            HttpVersion::Http2,
            &request(&[]),
            &Default::default(),
        );
        assert_eq!(h2, Upgrade::NotWebSocket);
    }

    #[test]
    fn malformed_upgrades() {
        let config = DeflateConfig::default();
        let post = parse_handshake("POST", HttpVersion::Http11, &request(&[]), &config);
        assert_eq!(post, Upgrade::Invalid(HandshakeError::Method));
        let old = parse_handshake("GET", HttpVersion::Http10, &request(&[]), &config);
        assert_eq!(old, Upgrade::Invalid(HandshakeError::HttpVersion));
        assert_eq!(
            parse(&without("host")),
            Upgrade::Invalid(HandshakeError::MissingHost)
        );
        assert_eq!(
            parse(&without("sec-websocket-key")),
            Upgrade::Invalid(HandshakeError::BadKey)
        );
        for key in [
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZTE=",
            "!!!!",
            "",
        ] {
            let mut headers = without("sec-websocket-key");
            headers.push((
                Bytes::from_static(b"Sec-WebSocket-Key"),
                Bytes::copy_from_slice(key.as_bytes()),
            ));
            assert_eq!(
                parse(&headers),
                Upgrade::Invalid(HandshakeError::BadKey),
                "{key}"
            );
        }
        let two_keys = request(&[("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]);
        assert_eq!(parse(&two_keys), Upgrade::Invalid(HandshakeError::BadKey));
        for version in ["8", "", "13, 8"] {
            let mut headers = without("sec-websocket-version");
            if !version.is_empty() {
                headers.push((
                    Bytes::from_static(b"Sec-WebSocket-Version"),
                    Bytes::copy_from_slice(version.as_bytes()),
                ));
            }
            let Upgrade::Invalid(e) = parse(&headers) else {
                panic!("version {version} accepted");
            };
            assert_eq!(e, HandshakeError::UnsupportedVersion);
            assert_eq!(crate::DispatchError::from(e).status(), 426);
        }
        assert_eq!(
            crate::DispatchError::from(HandshakeError::BadKey).status(),
            400
        );
        let bad_protocol = request(&[("Sec-WebSocket-Protocol", "chat, a b")]);
        assert_eq!(
            parse(&bad_protocol),
            Upgrade::Invalid(HandshakeError::BadSubprotocol)
        );
    }
}
