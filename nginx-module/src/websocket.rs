//! WebSockets on the nginx host (RFC 6455 over HTTP/1.1), for ASGI apps.
//!
//! Until the app accepts, the handshake is an ordinary request in [`crate::handler`] (a
//! denial is an HTTP response; a close before accepting is 403). On accept the module answers
//! 101 through nginx's header filter (which adds `Connection: upgrade`, as for proxied
//! upgrades) and takes the connection over, as nginx's upstream module does for an upgraded
//! connection: raw reads and writes on the client connection (`c->recv`/`c->send`, so TLS
//! works too) driven by the request's read and write events, the protocol itself in the
//! core's [`Relay`], the same as on the `portico` binary.
//!
//! Backpressure both ways: the client is read only while the app's inbound queue has room
//! ([`Relay::wants_read`]); the app's messages are taken only while less than
//! [`OUT_LIMIT`] bytes wait for the client.

use crate::handler::{finish, next_event, set_headers, RequestCtx};
use bytes::{Buf, Bytes, BytesMut};
use nginx_sys::{
    ngx_add_timer, ngx_del_timer, ngx_handle_read_event, ngx_handle_write_event,
    ngx_http_finalize_request, ngx_http_output_filter, ngx_http_request_t, ngx_http_send_header,
    ngx_http_send_special, ngx_int_t, ngx_tcp_nodelay, NGX_AGAIN, NGX_ERROR, NGX_HTTP_FLUSH,
    NGX_HTTP_LAST, NGX_HTTP_REQUEST_TIME_OUT, NGX_LOG_INFO, NGX_OK,
};
use ngx::http::{HttpModuleLocationConf, NgxHttpCoreModule};
use portico_core::model::ResponseHead;
use portico_core::websocket::{Handshake, Relay, CLOSE_WAIT};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Frames for the client beyond which the app's next messages wait.
const OUT_LIMIT: usize = 256 * 1024;

/// How much one read from the client takes.
const READ_SIZE: usize = 16 * 1024;

/// How often the keep-alive timer of an open WebSocket fires.
const TICK: Duration = Duration::from_secs(60);

/// A WebSocket request: the handshake until the app accepts, then the open connection.
pub struct WsState {
    handshake: Handshake,
    relay: Relay,
    /// The 101 is sent; the connection is ours.
    open: bool,
    /// Bytes for the client not yet written.
    out: BytesMut,
    /// The app side has ended (or failed): no more events will come.
    app_gone: bool,
    /// When the app (or its end) started the closing handshake.
    closing_since: Option<Instant>,
}

impl WsState {
    /// A handshake waiting for the app; `relay` speaks the negotiated protocol once it is
    /// accepted.
    pub fn new(handshake: Handshake, relay: Relay) -> WsState {
        WsState {
            handshake,
            relay,
            open: false,
            out: BytesMut::new(),
            app_gone: false,
            closing_since: None,
        }
    }

    /// Whether the connection has been taken over (after the 101).
    pub fn is_open(&self) -> bool {
        self.open
    }
}

/// The app accepted: 101 with the handshake's headers and the app's, then the relay.
///
/// # Safety
/// `r` is live and `ctx` its state, with a WebSocket handshake; nginx thread only. `r` may
/// be freed on return.
pub unsafe fn accept(
    r: *mut ngx_http_request_t,
    ctx: *mut RequestCtx,
    subprotocol: Option<String>,
    extra: Vec<(Bytes, Bytes)>,
) {
    // SAFETY: the caller's.
    unsafe {
        let Some(ws) = (*ctx).ws.as_mut() else {
            return;
        };
        let mut headers: Vec<(Bytes, Bytes)> = ws
            .handshake
            .response_headers(subprotocol.as_deref())
            .into_iter()
            // nginx's header filter writes `Connection: upgrade` for every 101 itself.
            .filter(|(name, _)| !name.eq_ignore_ascii_case("connection"))
            .map(|(name, value)| (Bytes::from_static(name.as_bytes()), Bytes::from(value)))
            .collect();
        headers.extend(extra);
        let head = ResponseHead {
            status: 101,
            reason: "Switching Protocols".into(),
            headers,
        };
        (*r).set_keepalive(0);
        let c = (*r).connection;
        let mut rc = set_headers(r, &head);
        if rc == NGX_OK as ngx_int_t {
            rc = ngx_http_send_header(r);
        }
        if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t {
            finish(ctx);
            ngx_http_finalize_request(r, rc);
            return;
        }
        if ngx_http_send_special(r, NGX_HTTP_FLUSH as _) == NGX_ERROR as ngx_int_t {
            finish(ctx);
            ngx_http_finalize_request(r, NGX_ERROR as ngx_int_t);
            return;
        }
        if let Some(clcf) = NgxHttpCoreModule::location_conf(&*r) {
            if clcf.tcp_nodelay != 0 {
                ngx_tcp_nodelay(c);
            }
        }
        let ws = (*ctx).ws.as_mut().expect("checked above");
        ws.open = true;
        // Frames the client sent right behind its handshake are already in nginx's buffer.
        let preread = (*r).header_in;
        if !preread.is_null() && (*preread).last > (*preread).pos {
            let len = (*preread).last.offset_from((*preread).pos) as usize;
            let data = core::slice::from_raw_parts((*preread).pos, len);
            if let Some(exchange) = (*ctx).exchange.as_ref() {
                ws.relay.client_bytes(data, exchange, &mut ws.out);
            }
            (*preread).pos = (*preread).last;
        }
        (*r).read_event_handler = Some(on_event);
        // The request_timeout no longer applies: the timer only keeps the worker alive now.
        let timer = &mut (*ctx).timer;
        ngx_add_timer(timer, TICK.as_millis() as usize);
        pump(r, ctx);
    }
}

/// The client's side is readable or writable again.
unsafe extern "C" fn on_event(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls request event handlers with the live request; our state is attached
    // before this handler is set.
    unsafe {
        let ctx = crate::handler::ctx_of(r);
        if ctx.is_null() || (*ctx).finished {
            return;
        }
        pump(r, ctx);
    }
}

/// The request's timer fired on a WebSocket; returns whether it was handled here (the
/// handshake phase is left to the request's own handling).
///
/// # Safety
/// `r` is live and `ctx` its state; nginx thread only. `r` may be freed on return.
pub unsafe fn on_timer(r: *mut ngx_http_request_t, ctx: *mut RequestCtx) -> bool {
    // SAFETY: the caller's.
    unsafe {
        let Some(ws) = (*ctx).ws.as_ref() else {
            return false;
        };
        if !ws.open {
            return false;
        }
        match ws.closing_since {
            Some(since) if since.elapsed() >= CLOSE_WAIT => close(r, ctx, NGX_OK as ngx_int_t),
            Some(since) => ngx_add_timer(
                &mut (*ctx).timer,
                (CLOSE_WAIT.saturating_sub(since.elapsed()).as_millis() as usize).max(1),
            ),
            None => ngx_add_timer(&mut (*ctx).timer, TICK.as_millis() as usize),
        }
        true
    }
}

/// Moves everything that can move: the app's messages out, the client's frames in, until
/// nothing more can happen now; closes the connection once both sides are done.
///
/// # Safety
/// `r` is live and `ctx` its state, with an open WebSocket; nginx thread only. `r` may be
/// freed on return.
pub unsafe fn pump(r: *mut ngx_http_request_t, ctx: *mut RequestCtx) {
    // SAFETY: the caller's; `ctx` lives until the request is freed, which only `close`
    // below causes, after which we return at once.
    unsafe {
        let c = (*r).connection;
        let rev = (*c).read;
        let wev = (*c).write;
        if (*wev).timedout() != 0 {
            (*c).set_timedout(1);
            ngx::ngx_log_error!(
                NGX_LOG_INFO,
                (*c).log,
                "portico: WebSocket client timed out"
            );
            close(r, ctx, NGX_HTTP_REQUEST_TIME_OUT as ngx_int_t);
            return;
        }
        // The 101 may still sit in nginx's buffers: raw frames must not overtake it.
        if !(*r).out.is_null() {
            let rc = ngx_http_output_filter(r, core::ptr::null_mut());
            if rc == NGX_ERROR as ngx_int_t {
                close(r, ctx, NGX_ERROR as ngx_int_t);
                return;
            }
            if !(*r).out.is_null() {
                arm(r, ctx);
                return;
            }
        }
        let mut buf = vec![0u8; READ_SIZE];
        loop {
            let state = &mut *ctx;
            let Some(exchange) = state.exchange.as_ref() else {
                return;
            };
            let Some(ws) = state.ws.as_mut() else {
                return;
            };
            let mut progress = false;

            // The app's messages, while the client keeps up.
            while !ws.app_gone && ws.out.len() < OUT_LIMIT {
                let Some(event) = next_event(exchange, &state.waker) else {
                    break;
                };
                progress = true;
                use portico_core::exchange::AppEvent;
                if matches!(event, None | Some(AppEvent::End | AppEvent::Failed(_))) {
                    ws.app_gone = true;
                }
                if matches!(
                    event,
                    None | Some(AppEvent::WsClose { .. } | AppEvent::End | AppEvent::Failed(_))
                ) && ws.closing_since.is_none()
                {
                    ws.closing_since = Some(Instant::now());
                    ngx_add_timer(&mut state.timer, CLOSE_WAIT.as_millis() as usize);
                }
                ws.relay.app_event(event, &mut ws.out);
            }

            // A message that waited for room in the app's queue.
            if ws.relay.is_blocked() {
                let mut cx = Context::from_waker(&state.waker);
                let mut room = pin!(exchange.has_room());
                if room.as_mut().poll(&mut cx) == Poll::Ready(()) {
                    ws.relay.retry(exchange, &mut ws.out);
                    progress = true;
                }
            }

            // The client's frames, while the app keeps up.
            while ws.relay.wants_read() && (*rev).ready() != 0 {
                let Some(recv) = (*c).recv else { break };
                let n = recv(c, buf.as_mut_ptr(), buf.len());
                if n > 0 {
                    ws.relay
                        .client_bytes(&buf[..n as usize], exchange, &mut ws.out);
                    progress = true;
                } else if n == NGX_AGAIN as isize {
                    break;
                } else {
                    // 0: the client closed its side; NGX_ERROR: the connection broke.
                    ws.relay.client_gone(exchange);
                    progress = true;
                    break;
                }
            }

            // Frames to the client.
            while !ws.out.is_empty() && (*wev).ready() != 0 {
                let Some(send) = (*c).send else { break };
                let n = send(c, ws.out.as_mut_ptr(), ws.out.len());
                if n > 0 {
                    ws.out.advance(n as usize);
                    progress = true;
                } else if n == NGX_AGAIN as isize {
                    break;
                } else {
                    close(r, ctx, NGX_ERROR as ngx_int_t);
                    return;
                }
            }

            let ws = (*ctx).ws.as_ref().expect("checked above");
            let over = ws.relay.finished()
                || (ws.app_gone && !ws.relay.wants_read() && !ws.relay.is_blocked());
            if over && ws.out.is_empty() {
                close(r, ctx, NGX_OK as ngx_int_t);
                return;
            }
            if !progress {
                break;
            }
        }
        arm(r, ctx);
    }
}

/// Waits for the client: its read event (always, to notice a close) and, with frames
/// waiting, its write event under `send_timeout`.
///
/// # Safety
/// `r` is live and `ctx` its state; nginx thread only. `r` may be freed on return.
unsafe fn arm(r: *mut ngx_http_request_t, ctx: *mut RequestCtx) {
    // SAFETY: the caller's.
    unsafe {
        let c = (*r).connection;
        let waiting =
            (*ctx).ws.as_ref().is_some_and(|ws| !ws.out.is_empty()) || !(*r).out.is_null();
        let Some(clcf) = NgxHttpCoreModule::location_conf(&*r) else {
            return;
        };
        if ngx_handle_write_event((*c).write, clcf.send_lowat) != NGX_OK as ngx_int_t
            || ngx_handle_read_event((*c).read, 0) != NGX_OK as ngx_int_t
        {
            close(r, ctx, NGX_ERROR as ngx_int_t);
            return;
        }
        let wev = (*c).write;
        if waiting && (*wev).ready() == 0 {
            ngx_add_timer(wev, clcf.send_timeout);
        } else if (*wev).timer_set() != 0 {
            ngx_del_timer(wev);
        }
    }
}

/// Ends the WebSocket: the exchange goes (the app sees the close), and nginx closes the
/// connection (it is not kept alive).
///
/// # Safety
/// `r` is live and `ctx` its state; nginx thread only. `r` is freed on return.
unsafe fn close(r: *mut ngx_http_request_t, ctx: *mut RequestCtx, rc: ngx_int_t) {
    // SAFETY: the caller's.
    unsafe {
        finish(ctx);
        let rc = if rc == NGX_OK as ngx_int_t {
            ngx_http_send_special(r, NGX_HTTP_LAST as _)
        } else {
            rc
        };
        ngx_http_finalize_request(r, rc);
    }
}
