//! The Pingora transport: turns a Pingora session into a core request, and the app's events
//! back into HTTP on the wire.

use crate::spool::{Buffered, Spool, SpooledFile};
use crate::Portico;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Version};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::time::fast_timeout::fast_timeout;
use portico_core::exchange::{AppEvent, BodyPiece, Exchange, FileBody};
use portico_core::model::{
    BodyLength, HttpVersion, RequestHead, ResponseHead, StatedLength, TlsInfo,
};
use portico_core::{App, DispatchError};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an ASGI app may sit on a request before Portico also watches the client's
/// socket for a disconnect (which the app hears as `http.disconnect`).
const WATCH_AFTER: Duration = Duration::from_millis(20);

/// Largest piece of a file read at once for `wsgi.file_wrapper`.
const FILE_CHUNK: usize = 64 * 1024;

/// The most one write to the client carries: Pingora's `send_timeout` bounds each write as a
/// whole, so that in slices it bounds a stall, not a slow but steady client (nginx's counts
/// from the last progress). 256 KiB in 60 s is about 4 KiB/s.
const SEND_SLICE: usize = 256 * 1024;

/// Bodies with a `Content-Length` up to this size are read before the app is called, so it
/// gets them whole without a round trip per piece (nginx buffers small bodies the same way).
/// Larger and chunked bodies stream to the app as it reads, unless the app buffers them all
/// (`request_buffering`, [`crate::spool`]).
const BUFFERED_BODY_LIMIT: u64 = 64 * 1024;

pub(crate) async fn serve(portico: &Portico, session: &mut Session) -> Result<bool> {
    let raw_path = path_of(session.req_header().raw_path());
    if portico
        .status_path
        .as_deref()
        .is_some_and(|p| p.as_bytes() == raw_path)
    {
        let text = session.req_header().uri.query() == Some("format=text");
        // Pools in other processes are asked off this thread; the page is one event.
        let exchange = portico
            .dispatcher
            .status_exchange(session.req_header().method.as_str(), text);
        match exchange.next().await {
            Some(AppEvent::Whole(head, body)) => {
                let mut resp = ResponseHeader::build(head.status, Some(head.headers.len() + 1))?;
                append_headers(&mut resp, head.headers)?;
                resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
                session.write_response_header(Box::new(resp), false).await?;
                session.write_response_body(Some(body), true).await?;
            }
            Some(AppEvent::Failed(e)) => respond_error(session, &e).await?,
            _ => {
                let e = DispatchError::BadResponse("the status page failed".into());
                respond_error(session, &e).await?;
            }
        }
        return Ok(true);
    }
    let Some((app, route)) = portico.dispatcher.route(raw_path) else {
        return Ok(false);
    };
    // HTTP/1.1 pipelining (RFC 9112 section 9.3): bytes of the next request read along with
    // this one's body are kept for it, not treated as garbage (for a proxy that mixes
    // Portico in as for `PorticoProxy`).
    session.as_downstream_mut().set_pipelining_enabled(true);
    // A client that takes none of the response frees the app's thread after this, rather
    // than hold it for as long as it keeps the connection open.
    session.set_write_timeout(portico.send_timeout);
    if session.get_keepalive().is_some() {
        session.set_keepalive(Some(portico.keepalive_timeout.as_secs().max(1)));
    }
    let mut head = request_head(portico, session);
    if let Some(handshake) = app.websocket_handshake(&head) {
        match handshake {
            Ok(handshake) => {
                let stopping = portico.stopping.subscribe();
                crate::websocket::serve(session, app, head, route, handshake, stopping).await?
            }
            Err(e) => respond_error(session, &e).await?,
        }
        return Ok(true);
    }
    let limit = app.config().max_body_size.0;
    if let BodyLength::Known(len) = head.body {
        if limit > 0 && len > limit {
            // RFC 9110 section 15.5.14 (respond_error closes the connection: the body is unread).
            respond_error(session, &DispatchError::BodyTooLarge { limit }).await?;
            return Ok(true);
        }
    }
    let mut transfer = Transfer::new(app, session);
    let buffer_all = app.config().buffers_request_body();
    let small = matches!(head.body, BodyLength::Known(len) if len <= BUFFERED_BODY_LIMIT)
        && !transfer.expect_continue;
    let body = if head.body == BodyLength::Empty || !(buffer_all || small) {
        None
    } else {
        match transfer.buffer_body().await {
            Ok((len, body)) => {
                if buffer_all {
                    // As a buffering proxy forwards it: whole, with its length.
                    head.set_buffered_length(len);
                }
                match body {
                    Buffered::Memory(pieces) => Some(pieces),
                    Buffered::File(file) => {
                        transfer.spooled = Some(file);
                        None
                    }
                }
            }
            Err(e) => {
                transfer.fail(e).await?;
                return Ok(true);
            }
        }
    };
    match app.submit(head, route, body) {
        Ok(exchange) => match transfer.run(exchange).await {
            // The client took none of the response for send_timeout: its request ends (the
            // app's part dropped with the exchange), told at info level as nginx tells it.
            Err(e) if e.etype() == &ErrorType::WriteTimedout => {
                let req = session.req_header();
                log::info!(
                    "{} {}: the client took none of the response for send_timeout ({}s); \
                     closed",
                    req.method,
                    req.uri.path(),
                    session.get_write_timeout().unwrap_or_default().as_secs()
                );
                session.set_keepalive(None);
            }
            result => result?,
        },
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

fn request_head(portico: &Portico, session: &mut Session) -> RequestHead {
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
    let mut headers: Vec<(Bytes, Bytes)> = Vec::with_capacity(req.headers.len() + 1);
    if version == HttpVersion::Http2 && !req.headers.contains_key(http::header::HOST) {
        // RFC 9113 section 8.3.1: `:authority` stands in for Host; apps (Django's
        // ALLOWED_HOSTS, URL building) expect to find it as `host`.
        if let Some(authority) = req.uri.authority() {
            headers.push((
                Bytes::from_static(b"host"),
                Bytes::copy_from_slice(authority.as_str().as_bytes()),
            ));
        }
    }
    headers.extend(req.headers.iter().map(|(n, v)| {
        (
            Bytes::copy_from_slice(n.as_str().as_bytes()),
            Bytes::copy_from_slice(v.as_bytes()),
        )
    }));
    let tls = session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .map(|ssl| TlsInfo {
            server_cert: portico.server_cert.clone(),
            protocol: ssl.version.replace('_', "."),
            cipher: ssl.cipher.to_string(),
            version: tls_version_number(&ssl.version),
            cipher_suite: cipher_suite_number(&ssl.cipher),
        });
    let mut head = RequestHead {
        method: req.method.as_str().to_owned(),
        raw_path: Bytes::copy_from_slice(path_of(path)),
        query: Bytes::copy_from_slice(query),
        version,
        headers,
        secure: tls.is_some(),
        tls,
        // Pingora writes trailers on HTTP/2 only (its HTTP/1 writer drops them).
        trailers: version == HttpVersion::Http2,
        early_hints: version == HttpVersion::Http11,
        client: session.client_addr().and_then(|a| a.as_inet()).copied(),
        server: session.server_addr().and_then(|a| a.as_inet()).copied(),
        body,
    };
    portico_core::forwarded::apply(&mut head, &portico.trusted_proxies);
    head
}

/// Appends app headers (already checked by the core) to a Pingora response head.
pub(crate) fn append_headers(
    resp: &mut ResponseHeader,
    headers: Vec<(Bytes, Bytes)>,
) -> Result<()> {
    for (name, value) in headers {
        let name = HeaderName::from_bytes(&name)
            .or_err(ErrorType::InternalError, "response header name")?;
        let value = HeaderValue::from_maybe_shared(value)
            .or_err(ErrorType::InternalError, "response header value")?;
        resp.append_header(name, value)?;
    }
    Ok(())
}

/// The IANA number of a TLS version as rustls names it (`TLSv1_3`, `TLSv1.3`).
fn tls_version_number(name: &str) -> Option<u16> {
    let name = name.replace('_', ".");
    if name.contains("1.3") {
        Some(0x0304)
    } else if name.contains("1.2") {
        Some(0x0303)
    } else {
        None
    }
}

/// The IANA number (RFC 8446 appendix B.4, RFC 5289, RFC 7905) of the cipher suites rustls
/// offers, from its name.
fn cipher_suite_number(name: &str) -> Option<u16> {
    const SUITES: [(&str, u16); 9] = [
        ("TLS13_AES_128_GCM_SHA256", 0x1301),
        ("TLS13_AES_256_GCM_SHA384", 0x1302),
        ("TLS13_CHACHA20_POLY1305_SHA256", 0x1303),
        ("ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", 0xC02B),
        ("ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", 0xC02C),
        ("ECDHE_RSA_WITH_AES_128_GCM_SHA256", 0xC02F),
        ("ECDHE_RSA_WITH_AES_256_GCM_SHA384", 0xC030),
        ("ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", 0xCCA8),
        ("ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", 0xCCA9),
    ];
    let name = name.to_ascii_uppercase().replace('-', "_");
    SUITES
        .iter()
        .find(|(suffix, _)| name.ends_with(suffix))
        .map(|(_, n)| *n)
}

/// Writes the error response for `e`: its status from [`DispatchError::status`], a short
/// text body, and any headers the error carries (`Retry-After`).
pub(crate) async fn respond_error(session: &mut Session, e: &DispatchError) -> Result<()> {
    if let Some(level) = e.log_level() {
        // Which request, as the app's own lines name it (and nginx's error log does).
        let req = session.req_header();
        log::log!(level, "{} {}: {e}", req.method, req.uri.path());
    }
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
    /// The app's name, for the log line of a request past `request_timeout`.
    app_name: &'a str,
    /// Why the request body could not be read, if it could not: it decides the status when
    /// the app then fails (413 rather than 500).
    body_error: Option<DispatchError>,
    head_sent: bool,
    /// The whole request body has been read (or there was none).
    body_done: bool,
    /// Watch the client while waiting for the app, so that an ASGI app waiting in
    /// `receive()` hears `http.disconnect` when the client goes away.
    watch_client: bool,
    /// Trailers went out: on HTTP/2 they end the stream.
    trailers_sent: bool,
    /// The body held to the app's `Content-Length`, once the head is out.
    stated: StatedLength,
    /// The body, read whole into a file before the app was called: the app reads it from
    /// there.
    spooled: Option<SpooledFile>,
}

impl<'a> Transfer<'a> {
    fn new(app: &'a App, session: &'a mut Session) -> Transfer<'a> {
        let body_empty = session.is_body_empty();
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
            app_name: &config.name,
            body_error: None,
            head_sent: false,
            body_done: body_empty,
            watch_client: app.accepts_websockets(),
            trailers_sent: false,
            stated: StatedLength::default(),
            spooled: None,
        }
    }

    async fn run(mut self, exchange: Exchange) -> Result<()> {
        let deadline = self
            .request_timeout
            .and_then(|t| Instant::now().checked_add(t));
        loop {
            let left = || {
                deadline
                    .filter(|_| !self.head_sent)
                    .map(|d| d.saturating_duration_since(Instant::now()))
            };
            let mut waited = None;
            if self.watch_client && self.body_done {
                // Most responses come at once; only a request the app sits on is worth a read
                // on the client's socket (a system call per request otherwise).
                let quick = left().map_or(WATCH_AFTER, |l| l.min(WATCH_AFTER));
                if let Ok(event) = fast_timeout(quick, exchange.next()).await {
                    waited = Some(Some(event));
                }
            }
            let waited = match waited {
                Some(event) => event,
                None => {
                    let left = left();
                    let next = async {
                        match left {
                            // Pingora's shared timer wheel: no timer at all when the event is
                            // ready.
                            Some(left) => fast_timeout(left, exchange.next()).await.ok(),
                            None => Some(exchange.next().await),
                        }
                    };
                    if self.watch_client && self.body_done {
                        tokio::select! {
                            biased;
                            event = next => event,
                            gone = self.session.downstream_session.read_body_or_idle(true) => {
                                // Only an error ends the idle read: the client has gone.
                                // Dropping the exchange tells the app (`http.disconnect`).
                                let why = gone
                                    .err()
                                    .map_or_else(|| "client went away".to_owned(), |e| e.to_string());
                                return Error::e_explain(ErrorType::ConnectionClosed, why);
                            }
                        }
                    } else {
                        next.await
                    }
                }
            };
            let Some(event) = waited else {
                let limit = self.request_timeout.unwrap_or_default();
                return self
                    .fail(DispatchError::app_timeout(self.app_name, limit))
                    .await;
            };
            match event {
                Some(AppEvent::NeedBody) if self.spooled.is_some() => {
                    let piece = self.read_spooled_piece().await;
                    exchange.send_body(piece);
                }
                Some(AppEvent::NeedBody) => {
                    let piece = self.read_body_piece().await;
                    // A Content-Length body is complete with its last byte: the app will not
                    // ask again, so watching the client can start now.
                    if !matches!(piece, BodyPiece::Data(_)) || self.session.is_body_done() {
                        self.body_done = true;
                    }
                    exchange.send_body(piece);
                }
                Some(AppEvent::Trailers(fields)) => self.write_trailers(fields).await?,
                Some(AppEvent::EarlyHint(links)) if !self.head_sent && !self.is_head => {
                    // RFC 8297: an interim 103 with the Link fields; the final head follows.
                    let mut hint = ResponseHeader::build(103, Some(links.len()))?;
                    for link in links {
                        let value = HeaderValue::from_maybe_shared(link)
                            .or_err(ErrorType::InternalError, "early hint link")?;
                        hint.append_header(http::header::LINK, value)?;
                    }
                    self.session
                        .write_response_header(Box::new(hint), false)
                        .await?;
                }
                Some(AppEvent::EarlyHint(_)) => {}
                Some(AppEvent::Head(head)) => {
                    self.write_head(head, false).await?;
                }
                Some(AppEvent::Whole(head, body)) => {
                    if !self.write_head(head, body.is_empty()).await? {
                        self.write_body(body, true).await?;
                    }
                    return Ok(());
                }
                Some(AppEvent::Body(chunk)) => self.write_body(chunk, false).await?,
                Some(AppEvent::File(file)) => self.send_file(file).await?,
                Some(AppEvent::End) if self.trailers_sent => return Ok(()),
                Some(AppEvent::End) => return self.write_body(Bytes::new(), true).await,
                Some(
                    AppEvent::WsAccept { .. } | AppEvent::WsSend(_) | AppEvent::WsClose { .. },
                ) => {
                    return self
                        .fail(DispatchError::BadResponse(
                            "WebSocket event on an HTTP request".into(),
                        ))
                        .await
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

    /// Reads the whole body before the app is called (`request_buffering`, or a small one):
    /// its length, and the body in memory or, past [`crate::spool::IN_MEMORY`], in a file.
    /// `max_body_size` and `body_timeout` apply as when the app reads it.
    async fn buffer_body(&mut self) -> Result<(u64, Buffered), DispatchError> {
        let mut spool = Spool::default();
        loop {
            match self.read_body_piece().await {
                BodyPiece::Data(data) => {
                    if let Err(e) = spool.push(data).await {
                        self.session.set_keepalive(None);
                        return Err(DispatchError::BodyStore(e.to_string()));
                    }
                }
                BodyPiece::End => break,
                BodyPiece::Failed(e) => return Err(e),
            }
        }
        self.body_done = true;
        Ok((spool.len(), spool.finish()))
    }

    /// The next piece of a body read into a file.
    async fn read_spooled_piece(&mut self) -> BodyPiece {
        let Some(file) = &mut self.spooled else {
            return BodyPiece::End;
        };
        match file.next_piece().await {
            Ok(Some(data)) => BodyPiece::Data(data),
            Ok(None) => BodyPiece::End,
            Err(e) => {
                let e = DispatchError::BodyStore(e.to_string());
                self.body_error = Some(e.clone());
                BodyPiece::Failed(e)
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

    /// Sends the head; `end` if the app's body is empty. Returns whether the head ended the
    /// response (not when the app's `Content-Length` stated a body).
    async fn write_head(&mut self, head: ResponseHead, end: bool) -> Result<bool> {
        self.stated = StatedLength::new(&head, !self.is_head);
        let end = end && self.stated.shortfall().is_none();
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
        append_headers(&mut resp, head.headers)?;
        if chunked {
            // Pingora sends a length-less HTTP/1.1 body close-delimited; chunked keeps the
            // connection reusable (RFC 9112 section 7.1).
            resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        }
        self.head_sent = true;
        self.session
            .write_response_header(Box::new(resp), end)
            .await?;
        Ok(end)
    }

    /// Response trailers (RFC 9110 section 6.5), sent after the body; they end the stream.
    async fn write_trailers(&mut self, fields: Vec<(Bytes, Bytes)>) -> Result<()> {
        let mut map = http::HeaderMap::with_capacity(fields.len());
        for (name, value) in fields {
            let name = HeaderName::from_bytes(&name)
                .or_err(ErrorType::InternalError, "response trailer name")?;
            let value = HeaderValue::from_maybe_shared(value)
                .or_err(ErrorType::InternalError, "response trailer value")?;
            map.append(name, value);
        }
        self.trailers_sent = true;
        self.session
            .downstream_session
            .write_response_trailers(map)
            .await
    }

    /// Sends a piece of the body, held to the app's `Content-Length`; `end` ends the body.
    async fn write_body(&mut self, mut chunk: Bytes, end: bool) -> Result<()> {
        if self.is_head {
            // RFC 9110 section 9.3.2: same head as GET, no content.
            chunk.clear();
        } else {
            let (admitted, cut) = self.stated.admit(chunk.len() as u64);
            if let Some(e) = cut {
                self.log_bad_framing(&e);
            }
            chunk.truncate(admitted as usize);
        }
        while chunk.len() > SEND_SLICE {
            let slice = chunk.split_to(SEND_SLICE);
            self.session.write_response_body(Some(slice), false).await?;
        }
        if let Some(e) = self.stated.shortfall().filter(|_| end) {
            self.log_bad_framing(&e);
            // Not ended: Pingora then closes the connection rather than reuse it, and the
            // client sees the body cut short (PEP 3333).
            self.session.set_keepalive(None);
            if !chunk.is_empty() {
                self.session.write_response_body(Some(chunk), false).await?;
            }
            return Ok(());
        }
        match (chunk.is_empty(), end) {
            (true, false) => Ok(()),
            (true, true) => self.session.write_response_body(None, true).await,
            (false, end) => self.session.write_response_body(Some(chunk), end).await,
        }
    }

    /// Logs a body that does not match its `Content-Length`, naming the request and the app.
    fn log_bad_framing(&self, e: &DispatchError) {
        let req = self.session.req_header();
        log::error!(
            "{} {}: app `{}`: {e}",
            req.method,
            req.uri.path(),
            self.app_name
        );
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
            self.write_body(Bytes::from(buf), false).await?;
        }
        Ok(())
    }
}
