//! The Pingora transport: turns a Pingora session into a core request, and the app's events
//! back into HTTP on the wire.

use crate::Portico;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Version};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::time::fast_timeout::fast_timeout;
use portico_core::exchange::{AppEvent, BodyPiece, Exchange, FileBody};
use portico_core::model::{BodyLength, HttpVersion, RequestHead, ResponseHead};
use portico_core::{App, DispatchError};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest piece of a file read at once for `wsgi.file_wrapper`.
const FILE_CHUNK: usize = 64 * 1024;

/// Bodies with a `Content-Length` up to this size are read before the app is called, so it
/// gets them whole without a round trip per piece (nginx buffers small bodies the same way).
/// Larger and chunked bodies stream to the app as it reads.
const BUFFERED_BODY_LIMIT: u64 = 64 * 1024;

pub(crate) async fn serve(portico: &Portico, session: &mut Session) -> Result<bool> {
    let raw_path = path_of(session.req_header().raw_path());
    let Some((app, route)) = portico.dispatcher.route(raw_path) else {
        return Ok(false);
    };
    if session.get_keepalive().is_some() {
        session.set_keepalive(Some(portico.keepalive_timeout.as_secs().max(1)));
    }
    let head = request_head(session);
    let limit = app.config().max_body_size.0;
    if let BodyLength::Known(len) = head.body {
        if limit > 0 && len > limit {
            // RFC 9110 section 15.5.14 (respond_error closes the connection: the body is unread).
            respond_error(session, &DispatchError::BodyTooLarge { limit }).await?;
            return Ok(true);
        }
    }
    let mut transfer = Transfer::new(app, session);
    let body = match head.body {
        BodyLength::Known(len) if len <= BUFFERED_BODY_LIMIT && !transfer.expect_continue => {
            match transfer.read_small_body().await {
                Ok(body) => Some(body),
                Err(e) => {
                    transfer.fail(e).await?;
                    return Ok(true);
                }
            }
        }
        _ => None,
    };
    match app.submit(head, route, body) {
        Ok(exchange) => transfer.run(exchange).await?,
        Err(e) => transfer.fail(e).await?,
    }
    Ok(true)
}

/// The request target without its query.
fn path_of(target: &[u8]) -> &[u8] {
    let end = target
        .iter()
        .position(|&b| b == b'?')
        .unwrap_or(target.len());
    let path = &target[..end];
    // An absolute-form target (RFC 9112 section 3.2.2): keep the path part only.
    if let Some(rest) = path
        .strip_prefix(b"http://")
        .or_else(|| path.strip_prefix(b"https://"))
    {
        return rest
            .iter()
            .position(|&b| b == b'/')
            .map_or(b"/".as_slice(), |i| &rest[i..]);
    }
    path
}

fn request_head(session: &mut Session) -> RequestHead {
    let body = if session.is_body_empty() {
        BodyLength::Empty
    } else {
        match session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            // A repeated identical length arrives as "3, 3" (RFC 9110 section 8.6).
            .and_then(|v| {
                v.to_str()
                    .ok()?
                    .split(',')
                    .next()?
                    .trim()
                    .parse::<u64>()
                    .ok()
            }) {
            Some(n) => BodyLength::Known(n),
            None => BodyLength::Unknown,
        }
    };
    let req = session.req_header();
    let target = req.raw_path();
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], &target[i + 1..]),
        None => (target, &b""[..]),
    };
    let version = match req.version {
        Version::HTTP_10 | Version::HTTP_09 => HttpVersion::Http10,
        Version::HTTP_2 => HttpVersion::Http2,
        _ => HttpVersion::Http11,
    };
    RequestHead {
        method: req.method.as_str().to_owned(),
        raw_path: Bytes::copy_from_slice(path_of(path)),
        query: Bytes::copy_from_slice(query),
        version,
        headers: req
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    Bytes::copy_from_slice(n.as_str().as_bytes()),
                    Bytes::copy_from_slice(v.as_bytes()),
                )
            })
            .collect(),
        tls: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
        client: session.client_addr().and_then(|a| a.as_inet()).copied(),
        server: session.server_addr().and_then(|a| a.as_inet()).copied(),
        body,
    }
}

/// Writes the error response for `e`: its status from [`DispatchError::status`], a short
/// text body, and any headers the error carries (`Retry-After`).
pub(crate) async fn respond_error(session: &mut Session, e: &DispatchError) -> Result<()> {
    let status = e.status();
    let body = Bytes::from(format!(
        "{} {}\n",
        status,
        http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error")
    ));
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    for (name, value) in e.extra_headers() {
        resp.insert_header(*name, *value)?;
    }
    if status == 413 || status == 408 {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// One request's response in flight.
struct Transfer<'a> {
    session: &'a mut Session,
    is_head: bool,
    expect_continue: bool,
    body_limit: u64,
    body_read: u64,
    body_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
    /// Why the request body could not be read, if it could not: it decides the status when
    /// the app then fails (413 rather than 500).
    body_error: Option<DispatchError>,
    head_sent: bool,
}

impl<'a> Transfer<'a> {
    fn new(app: &App, session: &'a mut Session) -> Transfer<'a> {
        let req = session.req_header();
        let is_head = req.method == Method::HEAD;
        let expect_continue = req.version == Version::HTTP_11
            && req
                .headers
                .get(http::header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let config = app.config();
        Transfer {
            session,
            is_head,
            expect_continue,
            body_limit: config.max_body_size.0,
            body_read: 0,
            body_timeout: config.body_timeout.as_limit(),
            request_timeout: config.request_timeout.as_limit(),
            body_error: None,
            head_sent: false,
        }
    }

    async fn run(mut self, mut exchange: Exchange) -> Result<()> {
        let deadline = self
            .request_timeout
            .and_then(|t| Instant::now().checked_add(t));
        loop {
            let event = match deadline {
                Some(deadline) if !self.head_sent => {
                    // Pingora's shared timer wheel: no timer at all when the event is ready.
                    let left = deadline.saturating_duration_since(Instant::now());
                    match fast_timeout(left, exchange.next()).await {
                        Ok(event) => event,
                        Err(_) => return self.fail(DispatchError::AppTimeout).await,
                    }
                }
                _ => exchange.next().await,
            };
            match event {
                Some(AppEvent::NeedBody) => {
                    let piece = self.read_body_piece().await;
                    exchange.send_body(piece);
                }
                Some(AppEvent::Head(head)) => self.write_head(head, false).await?,
                Some(AppEvent::Whole(head, body)) => {
                    let empty = body.is_empty();
                    self.write_head(head, empty).await?;
                    if !empty {
                        self.write_body(body, true).await?;
                    }
                    return Ok(());
                }
                Some(AppEvent::Body(chunk)) => self.write_body(chunk, false).await?,
                Some(AppEvent::File(file)) => self.send_file(file).await?,
                Some(AppEvent::End) => {
                    return self.session.write_response_body(None, true).await;
                }
                Some(AppEvent::Failed(e)) => return self.fail(e).await,
                None => {
                    return self
                        .fail(DispatchError::BadResponse("the app thread stopped".into()))
                        .await
                }
            }
        }
    }

    /// Before the head: answer with the error's status (the body's error first, if reading
    /// the body is what made the app fail). After: cut the connection.
    async fn fail(&mut self, e: DispatchError) -> Result<()> {
        if self.head_sent {
            return Error::e_explain(ErrorType::InternalError, format!("response aborted: {e}"));
        }
        let e = self.body_error.take().unwrap_or(e);
        self.head_sent = true;
        respond_error(self.session, &e).await
    }

    /// Reads a whole small body (see [`BUFFERED_BODY_LIMIT`]), in the pieces it arrives in.
    async fn read_small_body(&mut self) -> Result<Vec<Bytes>, DispatchError> {
        let mut pieces = Vec::new();
        loop {
            match self.read_body_piece().await {
                BodyPiece::Data(data) => pieces.push(data),
                BodyPiece::End => return Ok(pieces),
                BodyPiece::Failed(e) => return Err(e),
            }
        }
    }

    async fn read_body_piece(&mut self) -> BodyPiece {
        if let Some(e) = &self.body_error {
            return BodyPiece::Failed(e.clone());
        }
        if std::mem::take(&mut self.expect_continue) {
            // RFC 9110 section 10.1.1: the app is reading, so the client may send.
            if let Err(e) = self
                .session
                .as_downstream_mut()
                .write_continue_response()
                .await
            {
                return self.body_failed(DispatchError::BadRequest(e.to_string()));
            }
        }
        loop {
            let read = self.session.downstream_session.read_request_body();
            let result = match self.body_timeout {
                Some(t) => match fast_timeout(t, read).await {
                    Ok(result) => result,
                    Err(_) => return self.body_failed(DispatchError::BodyTimeout),
                },
                None => read.await,
            };
            match result {
                Ok(Some(data)) if data.is_empty() => continue,
                Ok(Some(data)) => {
                    self.body_read += data.len() as u64;
                    if self.body_limit > 0 && self.body_read > self.body_limit {
                        return self.body_failed(DispatchError::BodyTooLarge {
                            limit: self.body_limit,
                        });
                    }
                    return BodyPiece::Data(data);
                }
                Ok(None) => return BodyPiece::End,
                Err(e) => return self.body_failed(DispatchError::BadRequest(e.to_string())),
            }
        }
    }

    fn body_failed(&mut self, e: DispatchError) -> BodyPiece {
        // The rest of the body is unread: the connection cannot carry another request.
        self.session.set_keepalive(None);
        self.body_error = Some(e.clone());
        BodyPiece::Failed(e)
    }

    async fn write_head(&mut self, head: ResponseHead, end: bool) -> Result<()> {
        let mut resp = ResponseHeader::build_no_case(head.status, Some(head.headers.len() + 1))?;
        if !head.reason.is_empty() {
            // Keep the app's own phrase; one Pingora refuses falls back to the canonical one.
            let _ = resp.set_reason_phrase(Some(&head.reason));
        }
        let chunked = !end
            && !self.is_head
            && self.session.req_header().version == Version::HTTP_11
            && !head.has_content_length()
            && !matches!(head.status, 204 | 304);
        for (name, value) in head.headers {
            let name = HeaderName::from_bytes(&name)
                .or_err(ErrorType::InternalError, "response header name")?;
            let value = HeaderValue::from_maybe_shared(value)
                .or_err(ErrorType::InternalError, "response header value")?;
            resp.append_header(name, value)?;
        }
        if chunked {
            // Pingora sends a length-less HTTP/1.1 body close-delimited; chunked keeps the
            // connection reusable (RFC 9112 section 7.1).
            resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        }
        self.head_sent = true;
        self.session
            .write_response_header(Box::new(resp), end)
            .await
    }

    async fn write_body(&mut self, chunk: Bytes, end: bool) -> Result<()> {
        if self.is_head {
            // RFC 9110 section 9.3.2: same head as GET, no content.
            return if end {
                self.session.write_response_body(None, true).await
            } else {
                Ok(())
            };
        }
        self.session.write_response_body(Some(chunk), end).await
    }

    async fn send_file(&mut self, file: FileBody) -> Result<()> {
        if self.is_head {
            return Ok(());
        }
        // Positioned reads (pread) on a blocking thread: the descriptor shares its file offset
        // with the app's file object, which the app may go on using.
        let f = Arc::new(file.file);
        let mut offset = file.offset;
        let mut left = file.len.unwrap_or(u64::MAX);
        while left > 0 {
            let want = FILE_CHUNK.min(usize::try_from(left).unwrap_or(FILE_CHUNK));
            let f = f.clone();
            let buf = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; want];
                let n = f.read_at(&mut buf, offset)?;
                buf.truncate(n);
                Ok::<_, std::io::Error>(buf)
            })
            .await
            .or_err(ErrorType::InternalError, "reading the response file")?
            .or_err(ErrorType::InternalError, "reading the response file")?;
            if buf.is_empty() {
                break;
            }
            let n = buf.len() as u64;
            offset += n;
            left -= n;
            self.session
                .write_response_body(Some(Bytes::from(buf)), false)
                .await?;
        }
        Ok(())
    }
}
