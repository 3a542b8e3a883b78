//! WebSockets on the Pingora host (RFC 6455 over HTTP/1.1): the handshake is handed to the
//! ASGI app, and once it accepts, Pingora's upgraded connection carries raw bytes both ways
//! through the core's [`Relay`].

use crate::serve::{append_headers, respond_error};
use bytes::BytesMut;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::time::fast_timeout::fast_timeout;
use portico_core::exchange::{AppEvent, Exchange};
use portico_core::model::RequestHead;
use portico_core::router::Route;
use portico_core::websocket::{Handshake, Relay, CLOSE_WAIT};
use portico_core::{App, DispatchError};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Serves an upgrade request: the app accepts (101, then messages), closes (403) or answers
/// with an HTTP response of its own (`websocket.http.response`).
pub(crate) async fn serve(
    session: &mut Session,
    app: &App,
    head: RequestHead,
    route: Route,
    handshake: Handshake,
    stopping: watch::Receiver<bool>,
) -> Result<()> {
    let exchange = match app.submit_websocket(head, route) {
        Ok(exchange) => exchange,
        Err(e) => return respond_error(session, &e).await,
    };
    let deadline = app
        .config()
        .request_timeout
        .as_limit()
        .and_then(|t| Instant::now().checked_add(t));
    // The handshake: until the app accepts, this is an HTTP request.
    let mut denial_started = false;
    loop {
        let event = match deadline {
            Some(deadline) if !denial_started => {
                let left = deadline.saturating_duration_since(Instant::now());
                match fast_timeout(left, exchange.next()).await {
                    Ok(event) => event,
                    Err(_) => {
                        let config = app.config();
                        let e = DispatchError::app_timeout(&config.name, config.request_timeout.0);
                        return respond_error(session, &e).await;
                    }
                }
            }
            _ => exchange.next().await,
        };
        match event {
            Some(AppEvent::WsAccept {
                subprotocol,
                headers,
            }) => {
                let mut resp = ResponseHeader::build(101, Some(6 + headers.len()))?;
                for (name, value) in handshake.response_headers(subprotocol.as_deref()) {
                    resp.append_header(name, value)?;
                }
                append_headers(&mut resp, headers)?;
                session.write_response_header(Box::new(resp), false).await?;
                return relay(session, exchange, app.websocket_relay(&handshake), stopping).await;
            }
            Some(AppEvent::WsClose { .. }) if !denial_started => {
                return respond_error(session, &DispatchError::WebSocketDenied).await
            }
            Some(AppEvent::Head(head)) if !denial_started => {
                denial_started = true;
                let mut resp =
                    ResponseHeader::build_no_case(head.status, Some(head.headers.len()))?;
                append_headers(&mut resp, head.headers)?;
                // The upgrade is refused, so the connection is not reused: close-delimited.
                session.set_keepalive(None);
                session.write_response_header(Box::new(resp), false).await?;
            }
            Some(AppEvent::Body(data)) if denial_started => {
                session.write_response_body(Some(data), false).await?;
            }
            Some(AppEvent::End) if denial_started => {
                return session.write_response_body(None, true).await;
            }
            Some(AppEvent::Failed(e)) if !denial_started => {
                return respond_error(session, &e).await
            }
            None if !denial_started => {
                return respond_error(
                    session,
                    &DispatchError::BadResponse("the app stopped".into()),
                )
                .await
            }
            other => {
                return Error::e_explain(
                    ErrorType::InternalError,
                    format!("WebSocket handshake cut short by the app: {other:?}"),
                )
            }
        }
    }
}

/// The open connection: client bytes to the app, app messages to the client, until both
/// sides have closed, or the server stops (`stopping`: then a close with 1012).
async fn relay(
    session: &mut Session,
    exchange: Exchange,
    mut relay: Relay,
    mut stopping: watch::Receiver<bool>,
) -> Result<()> {
    // A WebSocket may sit idle for as long as both ends like.
    session.downstream_session.set_read_timeout(None);
    let mut out = BytesMut::new();
    let mut app_gone = false;
    let mut closing_since: Option<Instant> = None;
    let mut told_stopping = false;
    while !relay.finished() {
        if !out.is_empty() {
            session
                .write_response_body(Some(out.split().freeze()), false)
                .await?;
        }
        if relay.finished() {
            break;
        }
        let close_left = closing_since.map(|t| CLOSE_WAIT.saturating_sub(t.elapsed()));
        if close_left == Some(Duration::ZERO) {
            break;
        }
        let step = tokio::select! {
            biased;
            event = exchange.next(), if !app_gone => Step::App(event),
            _ = exchange.has_room(), if relay.is_blocked() => Step::Room,
            read = session.downstream_session.read_request_body(), if relay.wants_read() => {
                Step::Client(read.ok().flatten())
            }
            _ = tokio::time::sleep(close_left.unwrap_or(CLOSE_WAIT)), if close_left.is_some() => {
                break
            }
            Ok(_) = stopping.wait_for(|stop| *stop), if !told_stopping => Step::Stopping,
        };
        match step {
            Step::App(event) => {
                if matches!(event, None | Some(AppEvent::End | AppEvent::Failed(_))) {
                    app_gone = true;
                }
                if matches!(
                    event,
                    None | Some(AppEvent::WsClose { .. } | AppEvent::End | AppEvent::Failed(_))
                ) {
                    closing_since.get_or_insert_with(Instant::now);
                }
                relay.app_event(event, &mut out);
            }
            Step::Room => relay.retry(&exchange, &mut out),
            Step::Client(Some(data)) => relay.client_bytes(&data, &exchange, &mut out),
            Step::Client(None) => relay.client_gone(&exchange),
            Step::Stopping => {
                told_stopping = true;
                relay.server_stopping(&exchange, &mut out);
                closing_since.get_or_insert_with(Instant::now);
            }
        }
        if app_gone && !relay.wants_read() && !relay.is_blocked() {
            break;
        }
    }
    if !out.is_empty() {
        session
            .write_response_body(Some(out.split().freeze()), false)
            .await?;
    }
    // The server closes the TCP connection first (RFC 6455 section 7.1.1).
    session.set_keepalive(None);
    Ok(())
}

/// What woke the relay loop.
enum Step {
    App(Option<AppEvent>),
    Room,
    Client(Option<bytes::Bytes>),
    /// The server is stopping.
    Stopping,
}
