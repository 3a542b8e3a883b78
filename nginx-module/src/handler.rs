//! The content handler of a Portico location, on the nginx thread: the transport between
//! nginx's request and the core's [`Exchange`].
//!
//! 1. [`content_handler`] asks nginx for the body and returns `NGX_DONE`. For an app with
//!    `request_buffering` (WSGI apps by default), nginx reads the whole body first (in memory
//!    up to `client_body_buffer_size`, else in its temporary file); for the others it reads
//!    without buffering (`request_body_no_buffering`), and nginx calls [`body_started`]
//!    with what has arrived so far.
//! 2. [`body_started`] submits the request: with the whole body when it is here and in
//!    memory (a small request, the common case), else without, and the app pulls the body
//!    as it reads ([`AppEvent::NeedBody`]): from nginx's temporary file, or from the client,
//!    whom nginx reads on only when the app asks, so a slow app slows the client down
//!    instead of filling memory. An ASGI app gets a WebSocket handshake through
//!    [`crate::websocket`].
//! 3. Whenever the app's thread produces events, [`crate::worker`]'s eventfd handler calls
//!    [`resume`], which polls the exchange. A response whose end is ready at once goes out
//!    with a `Content-Length`; otherwise the head goes out as soon as the app has nothing
//!    more ready, and the body follows piece by piece through nginx's filters (chunked on
//!    HTTP/1.1). While nginx cannot hand what it has to the client, no further events are
//!    taken, so the app's thread waits ([`Exchange`] holds a few events only): a slow client
//!    costs a bounded amount of memory.
//! 4. A client that goes away while the app works is noticed by `ngx_http_test_reading`
//!    (once the body is read) or by a failed write; nginx frees the request, its cleanup
//!    drops the exchange and the app sees `http.disconnect` (ASGI) or its iterable closed
//!    (WSGI).
//!
//! A timer per request keeps a gracefully exiting worker alive until the response is out
//! (nginx waits only for timers) and enforces `request_timeout` (504) until the head is sent.

use crate::request::{read_file_part, request_head, route_of, take_body, BodyPart};
use crate::websocket::{self, WsState};
use crate::worker;
use crate::PorticoModule;
use bytes::Bytes;
use core::ffi::c_void;
use nginx_sys::{
    add_to_ngx_table, ngx_add_timer, ngx_buf_t, ngx_chain_get_free_buf, ngx_chain_t,
    ngx_chain_update_chains, ngx_del_timer, ngx_event_t, ngx_file_t, ngx_handle_write_event,
    ngx_http_finalize_request, ngx_http_output_filter, ngx_http_read_client_request_body,
    ngx_http_read_unbuffered_request_body, ngx_http_request_t, ngx_http_run_posted_requests,
    ngx_http_send_header, ngx_http_send_special, ngx_http_special_response_handler,
    ngx_http_test_reading, ngx_int_t, ngx_list_push, ngx_pcalloc, ngx_pnalloc,
    ngx_pool_cleanup_add, ngx_str_t, ngx_table_elt_t, NGX_DONE, NGX_ERROR, NGX_HTTP_BAD_REQUEST,
    NGX_HTTP_FLUSH, NGX_HTTP_HEAD, NGX_HTTP_INTERNAL_SERVER_ERROR,
    NGX_HTTP_REQUEST_ENTITY_TOO_LARGE, NGX_HTTP_REQUEST_TIME_OUT, NGX_HTTP_SPECIAL_RESPONSE,
    NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_WARN, NGX_OK,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, NgxHttpCoreModule};
use portico_core::exchange::{AppEvent, BodyPiece, Exchange};
use portico_core::model::{BodyLength, ResponseHead, StatedLength};
use portico_core::DispatchError;
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often the keep-alive timer of a request without `request_timeout` fires.
const TICK: Duration = Duration::from_secs(60);

/// Response bytes gathered before they go to nginx in one call; a response that grows past
/// this before its end streams (its head goes out without a `Content-Length`).
const BATCH: usize = 64 * 1024;

/// One request in flight: the exchange with its app, the body reader and the response
/// writer. Boxed; owned by the request pool's cleanup, which drops it when nginx frees the
/// request (after the last byte is out).
pub struct RequestCtx {
    id: u64,
    /// `None` once the request is answered (or abandoned): the app side then sees the host
    /// gone.
    pub(crate) exchange: Option<Exchange>,
    pub(crate) waker: Waker,
    pub(crate) timer: ngx_event_t,
    request_timeout: Option<Duration>,
    /// The app's index among the dispatcher's apps (`None`: the status page), to name it in
    /// the log line of a request past `request_timeout`.
    app: Option<usize>,
    /// The app's `body_timeout`: how long the client may pause while the app waits for body.
    body_timeout: Option<Duration>,
    started: Instant,
    /// The request is answered; later wakeups are ignored.
    pub(crate) finished: bool,
    body: BodyReader,
    out: Output,
    /// A WebSocket handshake or connection (ASGI apps only).
    pub(crate) ws: Option<Box<WsState>>,
}

/// The request body, read as the app asks for it.
#[derive(Default)]
struct BodyReader {
    /// Read but not yet handed to the app.
    ready: VecDeque<BodyPart>,
    /// nginx has more to read (`r->reading_body`).
    more: bool,
    /// The app waits for a piece (it sent [`AppEvent::NeedBody`]).
    wanted: bool,
    /// Reading failed with this nginx status (408, 413, 400...) and error.
    failed: Option<(ngx_int_t, DispatchError)>,
    /// Bytes handed to the app so far, and the app's `max_body_size` (0: none).
    received: u64,
    limit: u64,
}

/// The response on its way to nginx.
struct Output {
    head: Option<ResponseHead>,
    /// Whether the head went to nginx's header filters.
    head_sent: bool,
    /// Body pieces not yet given to nginx.
    batch: Vec<Piece>,
    batch_len: usize,
    /// Body pieces nginx's buffers point into, with the buffer of each: released once nginx
    /// has consumed the buffer.
    in_nginx: VecDeque<(*mut ngx_buf_t, Bytes)>,
    /// Files nginx's buffers read from (`wsgi.file_wrapper`), open until the request is freed.
    files: Vec<std::fs::File>,
    /// Our buffers that nginx has finished with, for reuse, and those it still holds.
    free: *mut ngx_chain_t,
    busy: *mut ngx_chain_t,
    /// nginx holds unsent bytes of ours: no more events are taken until it has sent them.
    blocked: bool,
    /// The app gave head and whole body at once (`Whole`): its length is known, and sent
    /// as `Content-Length`. A body streamed in pieces keeps the app's framing (chunked on
    /// HTTP/1.1 without a length of the app's), even when every piece came before the head
    /// went out: which one it gets must not depend on how fast the app was.
    complete: bool,
    /// The body held to the app's `Content-Length`, once the head went out.
    stated: StatedLength,
}

impl Default for Output {
    fn default() -> Output {
        Output {
            head: None,
            head_sent: false,
            complete: false,
            batch: Vec::new(),
            batch_len: 0,
            in_nginx: VecDeque::new(),
            files: Vec::new(),
            free: core::ptr::null_mut(),
            busy: core::ptr::null_mut(),
            blocked: false,
            stated: StatedLength::default(),
        }
    }
}

/// A piece of the response body.
enum Piece {
    /// Bytes from the app.
    Bytes(Bytes),
    /// A region of a file, `len` bytes long: nginx sends it itself (with `sendfile` where it
    /// is on), without it passing through memory here.
    File(portico_core::exchange::FileBody, u64),
}

/// The name nginx gives a file region in its messages.
static FILE_NAME: &[u8] = b"wsgi.file_wrapper";

/// Tags our buffers, so `ngx_chain_update_chains` hands them back for reuse.
static BUF_TAG: u8 = 0;

fn buf_tag() -> *mut c_void {
    core::ptr::addr_of!(BUF_TAG).cast_mut().cast()
}

/// The app index of the location `r` runs in.
///
/// # Safety
/// `r` must be a live request.
unsafe fn app_index(r: *mut ngx_http_request_t) -> Option<usize> {
    // SAFETY: the request's location configuration array holds ours at our index.
    unsafe { PorticoModule::location_conf(&*r) }.and_then(|c| c.app)
}

/// Whether the location `r` runs in has `portico_status`.
///
/// # Safety
/// `r` must be a live request.
unsafe fn is_status(r: *mut ngx_http_request_t) -> bool {
    // SAFETY: the request's location configuration array holds ours at our index.
    unsafe { PorticoModule::location_conf(&*r) }.is_some_and(|c| c.status)
}

/// The content handler of every location with `portico_app` or `portico_pass`.
///
/// # Safety
/// Called by nginx on the nginx thread with a live request.
pub unsafe extern "C" fn content_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls content handlers with a live request.
    let (index, status) = unsafe { (app_index(r), is_status(r)) };
    if index.is_none() && !status {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    }
    let settings = worker::with(|w| match index {
        Some(index) => {
            let config = w.dispatcher.apps()[index].config();
            (config.max_body_size.0, config.buffers_request_body())
        }
        None => (0, false),
    });
    let Some((limit, buffered)) = settings else {
        // SAFETY: the request's connection and its log are live.
        let log = unsafe { (*(*r).connection).log };
        ngx::ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "portico: the apps are not loaded in this process"
        );
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    };
    // SAFETY: the request is live; nginx calls `body_started` once the first part of the body
    // is in (perhaps before this returns) and keeps the request alive until we finalize it.
    unsafe {
        let length = (*r).headers_in.content_length_n;
        if limit > 0 && length > 0 && length as u64 > limit {
            // nginx's own client_max_body_size usually answers first.
            return DispatchError::BodyTooLarge { limit }.status() as ngx_int_t;
        }
        // Buffered (`request_buffering`), nginx reads the whole body first, spilling a large
        // one to `client_body_temp_path`, as `uwsgi_request_buffering` does; else the app
        // reads it as it comes.
        if !buffered {
            (*r).set_request_body_no_buffering(1);
        }
        let rc = ngx_http_read_client_request_body(r, Some(body_started));
        if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
            return rc;
        }
    }
    NGX_DONE as ngx_int_t
}

/// nginx has the first part of the body (or all of it): submit the request to its app.
unsafe extern "C" fn body_started(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls the body handler with the live request, on the nginx thread.
    unsafe {
        let index = app_index(r);
        if index.is_none() && !is_status(r) {
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t);
            return;
        }
        let mut first = Vec::new();
        take_body(r, &mut first);
        let more = (*r).reading_body() != 0;
        let mut head = request_head(r);
        let submitted = worker::with(|w| {
            let Some(index) = index else {
                // `portico_status`: the page is the exchange's one event.
                let text = query_is(r, b"format=text");
                let exchange = w.dispatcher.status_exchange(&head.method, text);
                let (id, waker) = w.register(r);
                return Ok((exchange, None, id, waker, (None, None, 0, None)));
            };
            let app = &w.dispatcher.apps()[index];
            let route = route_of(r, index, &app.config().mount);
            let limit = app.config().max_body_size.0;
            let timeout = (
                app.config().request_timeout.as_limit(),
                app.config().body_timeout.as_limit(),
                limit,
                Some(index),
            );
            let whole: u64 = first.iter().map(BodyPart::size).sum();
            if !more && limit > 0 && whole > limit {
                // A chunked body, all here already, over the app's max_body_size.
                return Err(DispatchError::BodyTooLarge { limit });
            }
            if !more && head.body != BodyLength::Empty && app.config().buffers_request_body() {
                // Read whole by nginx: the app gets it with its length.
                head.set_buffered_length(whole);
            }
            let in_memory = first.iter().all(|p| matches!(p, BodyPart::Bytes(_)));
            let submitted: Result<_, DispatchError> = match app.websocket_handshake(&head) {
                Some(Ok(handshake)) => app.submit_websocket(head, route).map(|exchange| {
                    let relay = app.websocket_relay(&handshake);
                    (exchange, Some(Box::new(WsState::new(handshake, relay))))
                }),
                Some(Err(e)) => Err(e),
                // The whole body is here: it goes with the request (no round trip per piece).
                None if !more && in_memory => {
                    let pieces = std::mem::take(&mut first)
                        .into_iter()
                        .filter_map(|part| match part {
                            BodyPart::Bytes(data) => Some(data),
                            BodyPart::File { .. } => None,
                        })
                        .collect();
                    app.submit(head, route, Some(pieces))
                        .map(|exchange| (exchange, None))
                }
                None => app
                    .submit(head, route, None)
                    .map(|exchange| (exchange, None)),
            };
            submitted.map(|(exchange, ws)| {
                let (id, waker) = w.register(r);
                (exchange, ws, id, waker, timeout)
            })
        });
        let (exchange, ws, id, waker, (request_timeout, body_timeout, limit, app)) = match submitted
        {
            Some(Ok(parts)) => parts,
            Some(Err(e)) => {
                // Nothing of ours is attached to the request yet.
                finalize_error(r, &e);
                return;
            }
            None => {
                ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t);
                return;
            }
        };
        let ctx = Box::into_raw(Box::new(RequestCtx {
            id,
            exchange: Some(exchange),
            waker,
            // An all-zero ngx_event_t is nginx's own initial state (ngx_pcalloc'd).
            timer: core::mem::zeroed(),
            request_timeout,
            app,
            body_timeout,
            started: Instant::now(),
            finished: false,
            body: BodyReader {
                ready: first.into(),
                more,
                limit,
                ..BodyReader::default()
            },
            out: Output::default(),
            ws,
        }));
        // The cleanup takes ownership of `ctx` and runs when nginx frees the request, on this
        // thread.
        let cleanup = ngx_pool_cleanup_add((*r).pool, 0);
        if cleanup.is_null() {
            worker::with(|w| w.unregister(id));
            drop(Box::from_raw(ctx));
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t);
            return;
        }
        (*cleanup).handler = Some(cleanup_ctx);
        (*cleanup).data = ctx.cast();
        *(*r).ctx.add(PorticoModule::module().ctx_index) = ctx.cast();
        let timer = &mut (*ctx).timer;
        timer.handler = Some(on_timer);
        timer.data = r.cast();
        timer.log = (*(*r).connection).log;
        ngx_add_timer(timer, first_interval(request_timeout));
        (*r).read_event_handler = Some(if more { on_body_read } else { watch_client });
        (*r).write_event_handler = Some(on_write);
        poll(r, ctx);
    }
}

/// Whether the request's query string is exactly `query`.
///
/// # Safety
/// `r` must be a live request.
unsafe fn query_is(r: *mut ngx_http_request_t, query: &[u8]) -> bool {
    // SAFETY: `args` is the query string in the request's pool (or empty).
    unsafe {
        let args = &(*r).args;
        if args.len == 0 || args.data.is_null() {
            return query.is_empty();
        }
        args.len == query.len() && core::slice::from_raw_parts(args.data, args.len) == query
    }
}

/// Once the body is read, the client's side of the connection is watched: nginx's
/// `ngx_http_test_reading` finalizes the request when the client closes it, which drops the
/// exchange and tells the app.
unsafe extern "C" fn watch_client(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls request event handlers with the live request.
    unsafe { ngx_http_test_reading(r) }
}

fn first_interval(timeout: Option<Duration>) -> usize {
    timeout.unwrap_or(TICK).as_millis().max(1) as usize
}

/// Drops a request's state when nginx frees the request: stops its timer, forgets it, and
/// drops its exchange (which tells the app side the host is gone).
unsafe extern "C" fn cleanup_ctx(data: *mut c_void) {
    // SAFETY: `data` is the `RequestCtx` leaked in `body_started`; this cleanup runs once.
    let mut ctx = unsafe { Box::from_raw(data.cast::<RequestCtx>()) };
    if ctx.timer.timer_set() != 0 {
        // SAFETY: the timer is in nginx's timer tree; it must leave before its memory does.
        unsafe { ngx_del_timer(&mut ctx.timer) };
    }
    worker::with(|w| w.unregister(ctx.id));
}

/// The request's state, if it has one.
///
/// # Safety
/// `r` must be a live request.
pub(crate) unsafe fn ctx_of(r: *mut ngx_http_request_t) -> *mut RequestCtx {
    // SAFETY: the request's module context array has a slot for every HTTP module.
    unsafe { (*(*r).ctx.add(PorticoModule::module().ctx_index)).cast() }
}

/// The app has produced events for `r` (called from the eventfd handler).
///
/// # Safety
/// `r` must be a live request registered with the worker; nginx thread only.
pub unsafe fn resume(r: *mut ngx_http_request_t) {
    // SAFETY: `r` is live; its connection outlives it in the connection array.
    unsafe {
        let c = (*r).connection;
        let ctx = ctx_of(r);
        if ctx.is_null() || (*ctx).finished {
            return;
        }
        poll(r, ctx);
        // As nginx's own handlers do after work on a request from a foreign event.
        ngx_http_run_posted_requests(c);
    }
}

/// The request's timer: `request_timeout` passed before the head (504), the WebSocket's
/// closing handshake waited long enough, or a keep-alive tick.
unsafe extern "C" fn on_timer(ev: *mut ngx_event_t) {
    // SAFETY: the timer's data is its live request (the cleanup deletes the timer before the
    // request is freed).
    unsafe {
        let r: *mut ngx_http_request_t = (*ev).data.cast();
        let c = (*r).connection;
        let ctx = ctx_of(r);
        if ctx.is_null() || (*ctx).finished {
            return;
        }
        if (*ctx).ws.is_some() && websocket::on_timer(r, ctx) {
            ngx_http_run_posted_requests(c);
            return;
        }
        match (*ctx).request_timeout {
            Some(limit) if !(*ctx).out.head_sent => {
                let left = limit.saturating_sub((*ctx).started.elapsed());
                if !left.is_zero() {
                    ngx_add_timer(ev, left.as_millis().max(1) as usize);
                } else if (*ctx).body.wanted {
                    // The app waits for the client's body: the client is the slow one, and
                    // its own timeouts apply; look again shortly.
                    ngx_add_timer(ev, 100);
                } else if (*ctx).body.failed.is_some() {
                    // The client's body failed first and the app has been told, but has not
                    // answered yet: the client's failure (408, 413...) is the answer, not the
                    // app's timeout, as the Pingora host decides.
                    fail(r, ctx, app_timeout((*ctx).app, limit));
                } else {
                    finish(ctx);
                    finalize_error(r, &app_timeout((*ctx).app, limit));
                }
            }
            _ => ngx_add_timer(ev, TICK.as_millis() as usize),
        }
        ngx_http_run_posted_requests(c);
    }
}

/// Takes the app's events while nginx can take the response; sends what they make.
///
/// # Safety
/// `r` is live and `ctx` is its state; nginx thread only. Neither may be used after this
/// returns having finalized the request.
unsafe fn poll(r: *mut ngx_http_request_t, ctx: *mut RequestCtx) {
    // SAFETY: the caller's.
    unsafe {
        if (*ctx).ws.as_ref().is_some_and(|ws| ws.is_open()) {
            websocket::pump(r, ctx);
            return;
        }
    }
    loop {
        // SAFETY: `ctx` is live until the request is freed, which only a finalize below can
        // cause, after which we return at once.
        let state = unsafe { &mut *ctx };
        if state.out.blocked || state.finished {
            return;
        }
        let Some(exchange) = state.exchange.as_ref() else {
            return;
        };
        let Some(event) = next_event(exchange, &state.waker) else {
            // Nothing more for now: what the app has produced goes to the client.
            // SAFETY: as this function's.
            unsafe { flush(r, ctx) };
            return;
        };
        let failure = match event {
            Some(AppEvent::NeedBody) => {
                state.body.wanted = true;
                // SAFETY: as this function's.
                unsafe { deliver_body(r, ctx) };
                continue;
            }
            Some(AppEvent::Head(head)) => {
                state.out.head = Some(head);
                continue;
            }
            Some(AppEvent::Body(piece)) => {
                // SAFETY: as this function's.
                unsafe { add_body(r, ctx, piece) };
                continue;
            }
            Some(AppEvent::File(file)) => match file_length(&file) {
                Ok(0) => continue,
                Ok(len) => {
                    // SAFETY: as this function's.
                    unsafe { add_piece(r, ctx, Piece::File(file, len), len as usize) };
                    continue;
                }
                Err(e) => DispatchError::BadResponse(format!("cannot read the app's file: {e}")),
            },
            // RFC 9110 section 6.5, on HTTP/2 only (the request head offers them there):
            // nginx's HTTP/2 filter sends them in a HEADERS frame after the last DATA.
            Some(AppEvent::Trailers(fields)) => {
                // SAFETY: as this function's.
                if unsafe { add_trailers(r, &fields) } {
                    continue;
                }
                DispatchError::BadResponse("cannot store the trailers".into())
            }
            // Not offered: nginx 1.22 sends no 103 from a content handler.
            Some(AppEvent::EarlyHint(_)) => continue,
            Some(AppEvent::Whole(head, body)) => {
                state.out.head = Some(head);
                state.out.complete = true;
                if !body.is_empty() {
                    state.out.batch_len += body.len();
                    state.out.batch.push(Piece::Bytes(body));
                }
                // SAFETY: as this function's.
                unsafe { end_response(r, ctx) };
                return;
            }
            Some(AppEvent::End) if state.out.head.is_some() || state.out.head_sent => {
                // SAFETY: as this function's.
                unsafe { end_response(r, ctx) };
                return;
            }
            Some(AppEvent::End) => {
                DispatchError::BadResponse("response ended without a head".into())
            }
            Some(AppEvent::WsAccept {
                subprotocol,
                headers,
            }) if state.ws.is_some() && !state.out.head_sent && state.out.head.is_none() => {
                // SAFETY: as this function's.
                unsafe { websocket::accept(r, ctx, subprotocol, headers) };
                return;
            }
            Some(AppEvent::WsClose { .. })
                if state.ws.is_some() && !state.out.head_sent && state.out.head.is_none() =>
            {
                DispatchError::WebSocketDenied
            }
            Some(AppEvent::Failed(e)) => e,
            Some(AppEvent::WsAccept { .. } | AppEvent::WsSend(_) | AppEvent::WsClose { .. }) => {
                DispatchError::BadResponse("WebSocket event out of place".into())
            }
            None => DispatchError::BadResponse("the app thread stopped".into()),
        };
        // SAFETY: as this function's.
        unsafe { fail(r, ctx, failure) };
        return;
    }
}

/// The app's next event, if one is ready (`Some(None)`: the app side is gone). Arms the
/// request's waker when none is.
pub(crate) fn next_event(exchange: &Exchange, waker: &Waker) -> Option<Option<AppEvent>> {
    let mut cx = Context::from_waker(waker);
    let mut next = pin!(exchange.next());
    match next.as_mut().poll(&mut cx) {
        // The waker stays armed in the exchange: the app's next event wakes us.
        Poll::Pending => None,
        Poll::Ready(event) => Some(event),
    }
}

/// The response failed. Before its head: the error's status (the body's own failure first,
/// if reading the body is what made the app fail). After: the connection is cut, so the
/// client sees a truncated response.
///
/// # Safety
/// As [`poll`]'s.
unsafe fn fail(r: *mut ngx_http_request_t, ctx: *mut RequestCtx, e: DispatchError) {
    // SAFETY: the caller's.
    unsafe {
        if (*ctx).out.head_sent {
            // The app's last pieces came with its failure (as a pool worker's frames
            // arrive): they go out before the cut, behind a flush buffer, since nginx holds
            // small output back (postpone_output) and the abort below would discard it.
            if write_body(r, ctx, false) == NGX_ERROR as ngx_int_t {
                finish(ctx);
                ngx_http_finalize_request(r, NGX_ERROR as ngx_int_t);
                return;
            }
        } else if (*ctx).out.head.is_some() && !(*ctx).out.batch.is_empty() {
            // The app started its response and sent some of the body before it failed, all
            // in one batch: the client gets what the app sent, then the cut, as when the head
            // had gone out before.
            flush(r, ctx);
            if (*ctx).finished {
                return;
            }
        }
        let head_sent = (*ctx).out.head_sent;
        let body_failure = (*ctx).body.failed.take();
        finish(ctx);
        if head_sent {
            ngx::ngx_log_error!(
                NGX_LOG_ERR,
                (*(*r).connection).log,
                "portico: response aborted: {}",
                e
            );
            ngx_http_finalize_request(r, NGX_ERROR as ngx_int_t);
        } else if let Some((rc, body_error)) = body_failure {
            if let Some(level) = body_error.log_level() {
                log_for_request(r, level, &body_error);
            }
            // Answered, not just closed as nginx's finalize would for 408: the client that
            // paused gets told why (and error_page applies).
            (*(*r).connection).set_timedout(0);
            let rc = ngx_http_special_response_handler(r, rc);
            ngx_http_finalize_request(r, rc);
        } else {
            finalize_error(r, &e);
        }
    }
}

/// Hands the app the next body piece it asked for, reading from the client when nothing is
/// ready; if nothing can be read now, the read handler comes back here.
///
/// # Safety
/// As [`poll`]'s.
unsafe fn deliver_body(r: *mut ngx_http_request_t, ctx: *mut RequestCtx) {
    // SAFETY: the caller's.
    unsafe {
        let state = &mut *ctx;
        if !state.body.wanted {
            return;
        }
        if state.body.ready.is_empty() && state.body.more && state.body.failed.is_none() {
            let rc = ngx_http_read_unbuffered_request_body(r);
            let mut read = Vec::new();
            take_body(r, &mut read);
            state.body.ready.extend(read);
            if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
                state.body.failed = Some((rc, body_error(rc)));
                state.body.more = false;
            } else if (*r).reading_body() == 0 {
                state.body.more = false;
            }
        }
        let body = &mut state.body;
        let over = |part: &BodyPart| body.limit > 0 && body.received + part.size() > body.limit;
        if body.ready.front().is_some_and(over) {
            // The app's max_body_size, for a body whose length was not announced.
            body.ready.clear();
            body.more = false;
            body.failed = Some((
                NGX_HTTP_REQUEST_ENTITY_TOO_LARGE as ngx_int_t,
                DispatchError::BodyTooLarge { limit: body.limit },
            ));
        }
        let piece = if let Some(part) = state.body.ready.pop_front() {
            let read = match part {
                BodyPart::Bytes(data) => Ok(data),
                BodyPart::File { fd, at, end } => {
                    // SAFETY: the part came from this request, which is live.
                    read_file_part(fd, at, end).map(|(data, rest)| {
                        if let Some(rest) = rest {
                            state.body.ready.push_front(rest);
                        }
                        data
                    })
                }
            };
            match read {
                Ok(data) => {
                    state.body.received += data.len() as u64;
                    BodyPiece::Data(data)
                }
                Err(e) => {
                    let e = DispatchError::BodyStore(format!("reading nginx's body file: {e}"));
                    state.body.ready.clear();
                    state.body.failed = Some((e.status() as ngx_int_t, e.clone()));
                    BodyPiece::Failed(e)
                }
            }
        } else if let Some((_, e)) = &state.body.failed {
            BodyPiece::Failed(e.clone())
        } else if !state.body.more {
            BodyPiece::End
        } else {
            // Nothing yet: nginx has armed the read event and client_body_timeout; the app's
            // body_timeout applies if it is shorter.
            let rev = (*(*r).connection).read;
            if let (Some(limit), Some(clcf)) =
                (state.body_timeout, NgxHttpCoreModule::location_conf(&*r))
            {
                let limit = limit.as_millis().max(1) as usize;
                if (*rev).timer_set() != 0 && limit < clcf.client_body_timeout {
                    ngx_add_timer(rev, limit);
                }
            }
            return;
        };
        state.body.wanted = false;
        if let Some(exchange) = &state.exchange {
            exchange.send_body(piece);
        }
        let c = (*r).connection;
        if state.body.more {
            // The app is busy with what it got: a client pausing now is not timing out.
            if (*(*c).read).timer_set() != 0 {
                ngx_del_timer((*c).read);
            }
        } else {
            (*r).read_event_handler = Some(watch_client);
        }
    }
}

/// The error the app sees for an nginx status from reading the body.
fn body_error(rc: ngx_int_t) -> DispatchError {
    match rc as u32 {
        NGX_HTTP_REQUEST_TIME_OUT => DispatchError::BodyTimeout,
        NGX_HTTP_REQUEST_ENTITY_TOO_LARGE => DispatchError::BodyTooLarge { limit: 0 },
        NGX_HTTP_BAD_REQUEST => DispatchError::BadRequest("the request body is malformed".into()),
        _ => DispatchError::BadRequest(format!("reading the request body failed ({rc})")),
    }
}

/// The client sent more of the body (or the read timed out): give it to the app if it waits.
unsafe extern "C" fn on_body_read(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls request event handlers with the live request; our state is attached
    // before this handler is set.
    unsafe {
        let ctx = ctx_of(r);
        if ctx.is_null() || (*ctx).finished {
            return;
        }
        if (*ctx).body.wanted {
            deliver_body(r, ctx);
            poll(r, ctx);
        } else {
            let c = (*r).connection;
            if (*(*c).read).timer_set() != 0 {
                ngx_del_timer((*c).read);
            }
        }
    }
}

/// A piece of the response body: gathered, and sent once enough has gathered.
///
/// # Safety
/// As [`poll`]'s.
unsafe fn add_body(r: *mut ngx_http_request_t, ctx: *mut RequestCtx, piece: Bytes) {
    if !piece.is_empty() {
        let len = piece.len();
        // SAFETY: the caller's.
        unsafe { add_piece(r, ctx, Piece::Bytes(piece), len) };
    }
}

/// Gathers a piece of `len` bytes; sends what has gathered once it is enough.
///
/// # Safety
/// As [`poll`]'s.
unsafe fn add_piece(r: *mut ngx_http_request_t, ctx: *mut RequestCtx, piece: Piece, len: usize) {
    // SAFETY: the caller's.
    unsafe {
        let out = &mut (*ctx).out;
        out.batch_len += len;
        out.batch.push(piece);
        if out.batch_len >= BATCH {
            flush(r, ctx);
        }
    }
}

/// Sends the head (if the app gave one and it has not gone yet) and the gathered body, and
/// has nginx write it out now.
///
/// # Safety
/// As [`poll`]'s.
unsafe fn flush(r: *mut ngx_http_request_t, ctx: *mut RequestCtx) {
    // SAFETY: the caller's.
    unsafe {
        let state = &mut *ctx;
        if state.finished {
            return;
        }
        if !state.out.head_sent {
            if state.out.head.is_none() {
                return;
            }
            let rc = send_head(r, ctx, None);
            if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t {
                finish(ctx);
                ngx_http_finalize_request(r, rc);
                return;
            }
            if (*ctx).out.batch.is_empty() {
                if (*r).header_only() != 0 {
                    return;
                }
                // A head with no body yet (server-sent events before their first event):
                // nginx's write filter would hold it back until enough body follows.
                if ngx_http_send_special(r, NGX_HTTP_FLUSH as _) == NGX_ERROR as ngx_int_t {
                    finish(ctx);
                    ngx_http_finalize_request(r, NGX_ERROR as ngx_int_t);
                }
                return;
            }
        }
        if (*ctx).out.batch.is_empty() {
            return;
        }
        let rc = write_body(r, ctx, false);
        if rc == NGX_ERROR as ngx_int_t {
            finish(ctx);
            ngx_http_finalize_request(r, NGX_ERROR as ngx_int_t);
        }
    }
}

/// The app's response is complete: the rest goes out and the request is finalized (nginx
/// finishes writing on its own if the client is slow).
///
/// # Safety
/// As [`poll`]'s.
unsafe fn end_response(r: *mut ngx_http_request_t, ctx: *mut RequestCtx) {
    // SAFETY: the caller's.
    unsafe {
        finish(ctx);
        if !(*ctx).out.head_sent {
            let length = (*ctx).out.complete.then_some((*ctx).out.batch_len);
            let rc = send_head(r, ctx, length);
            if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t || (*r).header_only() != 0 {
                ngx_http_finalize_request(r, rc);
                return;
            }
        }
        let rc = write_body(r, ctx, true);
        if let Some(e) = (*ctx).out.stated.shortfall() {
            // PEP 3333: the client sees the body cut short, and the connection goes, rather
            // than wait for bytes that never come (or read the next response as them).
            log_for_request(r, log::Level::Error, &e);
            (*r).set_keepalive(0);
        }
        // The last use of `r`: finalizing may free it, and `ctx` with it.
        ngx_http_finalize_request(r, rc);
    }
}

/// How many bytes of its file a `wsgi.file_wrapper` region covers.
fn file_length(file: &portico_core::exchange::FileBody) -> std::io::Result<u64> {
    let size = file.file.metadata()?.len().saturating_sub(file.offset);
    Ok(file.len.map_or(size, |len| len.min(size)))
}

/// Marks the request answered: no more polling, no timer, no exchange (the app side sees
/// the host leave if it had not finished).
///
/// # Safety
/// `ctx` is a live request state; nginx thread only.
pub(crate) unsafe fn finish(ctx: *mut RequestCtx) {
    // SAFETY: the caller's.
    let state = unsafe { &mut *ctx };
    state.finished = true;
    state.exchange = None;
    if state.timer.timer_set() != 0 {
        // SAFETY: the timer is in nginx's timer tree.
        unsafe { ngx_del_timer(&mut state.timer) };
    }
    worker::with(|w| w.unregister(state.id));
}

/// The error `request_timeout` gives for the app at `index` among the dispatcher's apps.
fn app_timeout(index: Option<usize>, limit: Duration) -> DispatchError {
    let name = index
        .and_then(|i| {
            worker::with(|w| {
                w.dispatcher
                    .apps()
                    .get(i)
                    .map(|app| app.config().name.clone())
            })
        })
        .flatten()
        .unwrap_or_default();
    DispatchError::app_timeout(&name, limit)
}

/// Logs `e` at `level` on the request's connection log, so that nginx adds the client, the
/// server and the request line, as it does to its own lines about a request.
///
/// # Safety
/// `r` is live; nginx thread only.
unsafe fn log_for_request(r: *mut ngx_http_request_t, level: log::Level, e: &DispatchError) {
    let level = match level {
        log::Level::Error => NGX_LOG_ERR,
        log::Level::Warn => NGX_LOG_WARN,
        _ => NGX_LOG_INFO,
    };
    // SAFETY: the caller's: a live request has its connection and that connection's log.
    unsafe {
        ngx::ngx_log_error!(level, (*(*r).connection).log, "portico: {}", e);
    }
}

/// Answers with the error's status (nginx's error page, so `error_page` applies) and the
/// headers that go with it.
///
/// # Safety
/// `r` is live and has no response head sent; nginx thread only. `r` may be freed on return.
pub(crate) unsafe fn finalize_error(r: *mut ngx_http_request_t, e: &DispatchError) {
    if let Some(level) = e.log_level() {
        // SAFETY: the caller's; the request's log names the client and the request line.
        unsafe { log_for_request(r, level, e) };
    }
    // SAFETY: the caller's.
    unsafe {
        for (name, value) in e.extra_headers() {
            push_header(r, name.as_bytes(), value.as_bytes());
        }
        ngx_http_finalize_request(r, e.status() as ngx_int_t);
    }
}

/// Adds a response header; returns it, or null when out of memory.
///
/// # Safety
/// `r` is live; nginx thread only.
pub(crate) unsafe fn push_header(
    r: *mut ngx_http_request_t,
    name: &[u8],
    value: &[u8],
) -> *mut ngx_table_elt_t {
    // SAFETY: the header list and pool belong to the live request.
    unsafe {
        let elt: *mut ngx_table_elt_t = ngx_list_push(&mut (*r).headers_out.headers).cast();
        if elt.is_null() || add_to_ngx_table(elt, (*r).pool, name, value).is_none() {
            if !elt.is_null() {
                // A pushed but unfilled element must not be sent.
                (*elt).hash = 0;
            }
            return core::ptr::null_mut();
        }
        #[cfg(nginx1_23_0)]
        {
            (*elt).next = core::ptr::null_mut();
        }
        elt
    }
}

/// Adds response trailers to `headers_out.trailers`; false when out of memory.
///
/// # Safety
/// `r` is live; nginx thread only.
unsafe fn add_trailers(r: *mut ngx_http_request_t, fields: &[(Bytes, Bytes)]) -> bool {
    // SAFETY: the trailer list and pool belong to the live request.
    unsafe {
        for (name, value) in fields {
            let elt: *mut ngx_table_elt_t = ngx_list_push(&mut (*r).headers_out.trailers).cast();
            if elt.is_null() || add_to_ngx_table(elt, (*r).pool, name, value).is_none() {
                if !elt.is_null() {
                    (*elt).hash = 0;
                }
                return false;
            }
        }
        true
    }
}

/// Copies bytes into the request pool as an nginx string.
///
/// # Safety
/// `r` is live.
unsafe fn pool_str(r: *mut ngx_http_request_t, bytes: &[u8]) -> Option<ngx_str_t> {
    // SAFETY: the pool is the live request's; we write `len` bytes into `len` allocated.
    unsafe {
        let data: *mut u8 = ngx_pnalloc((*r).pool, bytes.len().max(1)).cast();
        if data.is_null() {
            return None;
        }
        core::ptr::copy_nonoverlapping(bytes.as_ptr(), data, bytes.len());
        Some(ngx_str_t {
            len: bytes.len(),
            data,
        })
    }
}

/// Status and headers to nginx's header filters. `whole` is the length of a body that is
/// complete already (`Content-Length`); for a streamed body the app's own `Content-Length`
/// is kept, else nginx frames it (chunked on HTTP/1.1). Returns nginx's code.
///
/// # Safety
/// As [`poll`]'s; `ctx` holds a head.
unsafe fn send_head(
    r: *mut ngx_http_request_t,
    ctx: *mut RequestCtx,
    whole: Option<usize>,
) -> ngx_int_t {
    // SAFETY: the caller's.
    unsafe {
        let state = &mut *ctx;
        let Some(head) = state.out.head.take() else {
            return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        };
        state.out.head_sent = true;
        let rc = set_headers(r, &head);
        if rc != NGX_OK as ngx_int_t {
            return rc;
        }
        let app_length = head.content_length().and_then(|n| i64::try_from(n).ok());
        let is_head = (*r).method == NGX_HTTP_HEAD as usize;
        (*r).headers_out.content_length_n = match (whole, app_length) {
            // RFC 9110 sections 8.6, 15.3.5: no Content-Length with 204; a 304 keeps only
            // what the app said.
            _ if head.status == 204 => -1,
            (_, app) if head.status == 304 => app.unwrap_or(-1),
            // The app's own length, which its body is held to (PEP 3333), as `portico serve`
            // does; a HEAD answer announces the length a GET would have (RFC 9110 9.3.2).
            (_, Some(n)) => n,
            // With no body and no length from the app, that length is unknown.
            (Some(0), None) if is_head => -1,
            (Some(n), None) => n as i64,
            (None, None) => -1,
        };
        if matches!(head.status, 204 | 304) {
            // RFC 9112 section 6.3: they end at their head. nginx's header filter knows
            // that only when it writes the status line itself, not the app's own.
            (*r).set_header_only(1);
        }
        state.out.stated = StatedLength::new(&head, !is_head);
        ngx_http_send_header(r)
    }
}

/// Puts the app's status and headers into `headers_out`.
///
/// # Safety
/// `r` is live; nginx thread only.
pub(crate) unsafe fn set_headers(r: *mut ngx_http_request_t, head: &ResponseHead) -> ngx_int_t {
    // SAFETY: the caller's.
    unsafe {
        (*r).headers_out.status = head.status as usize;
        if !head.reason.is_empty() {
            let line = format!("{} {}", head.status, head.reason);
            match pool_str(r, line.as_bytes()) {
                Some(s) => (*r).headers_out.status_line = s,
                None => return NGX_ERROR as ngx_int_t,
            }
        }
        for (name, value) in &head.headers {
            if name.eq_ignore_ascii_case(b"content-length") {
                continue;
            }
            if name.eq_ignore_ascii_case(b"content-type") {
                let Some(s) = pool_str(r, value) else {
                    return NGX_ERROR as ngx_int_t;
                };
                // The media type without parameters, as nginx's charset filter wants it.
                let type_len = value
                    .iter()
                    .position(|&b| b == b';' || b == b' ')
                    .unwrap_or(value.len());
                (*r).headers_out.content_type = s;
                (*r).headers_out.content_type_len = type_len;
                (*r).headers_out.content_type_lowcase = core::ptr::null_mut();
                continue;
            }
            let elt = push_header(r, name, value);
            if elt.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            // nginx adds its own Server and Date unless these are set.
            if name.eq_ignore_ascii_case(b"server") {
                (*r).headers_out.server = elt;
            } else if name.eq_ignore_ascii_case(b"date") {
                (*r).headers_out.date = elt;
            }
        }
        NGX_OK as ngx_int_t
    }
}

/// Gives the gathered body to nginx's body filters, without copying: nginx's buffers point
/// into the pieces, which are kept until nginx has consumed them. `last` ends the response.
/// Afterwards, if nginx could not write everything, the request is `blocked` until the
/// client takes more ([`on_write`]). Returns nginx's code.
///
/// # Safety
/// As [`poll`]'s; the head has been sent.
unsafe fn write_body(r: *mut ngx_http_request_t, ctx: *mut RequestCtx, last: bool) -> ngx_int_t {
    // SAFETY: the caller's; buffers come from the request pool and point into pieces that
    // `ctx` keeps until nginx is done with them (or the request is freed, after the last
    // byte is out).
    unsafe {
        let out = &mut (*ctx).out;
        let pieces = std::mem::take(&mut out.batch);
        out.batch_len = 0;
        if (*r).header_only() != 0 {
            // HEAD, or a status without a body: nginx sends no body.
            return NGX_OK as ngx_int_t;
        }
        let pieces = held_to_stated_length(r, &mut out.stated, pieces);
        // One filter call per piece, so that each of the app's pieces is one chunk on
        // HTTP/1.1, as the app sent it; nginx's write filter still gathers them into one
        // write, which the closing flush (or last) buffer sets off.
        let count = pieces.len();
        let mut pieces = pieces.into_iter();
        for i in 0..=count {
            let cl = ngx_chain_get_free_buf((*r).pool, &mut (*ctx).out.free);
            if cl.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            let b = (*cl).buf;
            *b = core::mem::zeroed();
            (*b).tag = buf_tag();
            (*cl).next = core::ptr::null_mut();
            match pieces.next() {
                Some(Piece::Bytes(piece)) => {
                    let start = piece.as_ptr().cast_mut();
                    (*b).start = start;
                    (*b).pos = start;
                    (*b).last = start.add(piece.len());
                    (*b).end = (*b).last;
                    (*b).set_memory(1);
                    (*ctx).out.in_nginx.push_back((b, piece));
                }
                Some(Piece::File(body, len)) => {
                    let file: *mut ngx_file_t =
                        ngx_pcalloc((*r).pool, core::mem::size_of::<ngx_file_t>()).cast();
                    if file.is_null() {
                        return NGX_ERROR as ngx_int_t;
                    }
                    (*file).fd = body.file.as_raw_fd();
                    (*file).name = ngx_str_t {
                        len: FILE_NAME.len(),
                        data: FILE_NAME.as_ptr().cast_mut(),
                    };
                    (*file).log = (*(*r).connection).log;
                    (*b).file = file;
                    (*b).file_pos = body.offset as i64;
                    (*b).file_last = (body.offset + len) as i64;
                    (*b).set_in_file(1);
                    (*ctx).out.files.push(body.file);
                }
                None if last => {
                    (*b).set_last_buf(if (*r).main == r { 1 } else { 0 });
                    (*b).set_last_in_chain(1);
                }
                None => (*b).set_flush(1),
            }
            let rc = ngx_http_output_filter(r, cl);
            let out = &mut (*ctx).out;
            let mut sent = cl;
            ngx_chain_update_chains(
                (*r).pool,
                &mut out.free,
                &mut out.busy,
                &mut sent,
                buf_tag(),
            );
            if rc == NGX_ERROR as ngx_int_t || i == count {
                settle(r, ctx);
                return rc;
            }
        }
        NGX_OK as ngx_int_t
    }
}

/// The pieces as far as the app's `Content-Length` allows; the first cut is logged.
///
/// # Safety
/// `r` is live; nginx thread only.
unsafe fn held_to_stated_length(
    r: *mut ngx_http_request_t,
    stated: &mut StatedLength,
    pieces: Vec<Piece>,
) -> Vec<Piece> {
    let mut kept = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let len = match &piece {
            Piece::Bytes(bytes) => bytes.len() as u64,
            Piece::File(_, len) => *len,
        };
        let (admitted, cut) = stated.admit(len);
        if let Some(e) = cut {
            // SAFETY: the caller's.
            unsafe { log_for_request(r, log::Level::Error, &e) };
        }
        match piece {
            _ if admitted == 0 => {}
            Piece::Bytes(mut bytes) => {
                bytes.truncate(admitted as usize);
                kept.push(Piece::Bytes(bytes));
            }
            Piece::File(body, _) => kept.push(Piece::File(body, admitted)),
        }
    }
    kept
}

/// After nginx took buffers: the pieces of those it has consumed are dropped (the buffers
/// went back to the free list); if it still holds some, the request waits for the client.
///
/// # Safety
/// As [`write_body`]'s.
unsafe fn settle(r: *mut ngx_http_request_t, ctx: *mut RequestCtx) {
    // SAFETY: the caller's.
    unsafe {
        let out = &mut (*ctx).out;
        let mut held = Vec::new();
        let mut cl = out.busy;
        while !cl.is_null() {
            held.push((*cl).buf);
            cl = (*cl).next;
        }
        out.in_nginx.retain(|(b, _)| held.contains(b));
        out.blocked = !out.busy.is_null();
        if out.blocked {
            wait_for_client(r);
        }
    }
}

/// Arms the client's write event and `send_timeout`, as nginx's own writers do.
///
/// # Safety
/// `r` is live; nginx thread only.
unsafe fn wait_for_client(r: *mut ngx_http_request_t) {
    // SAFETY: the caller's.
    unsafe {
        let c = (*r).connection;
        let wev = (*c).write;
        let Some(clcf) = NgxHttpCoreModule::location_conf(&*r) else {
            return;
        };
        if (*c).data == r.cast()
            && ngx_handle_write_event(wev, clcf.send_lowat) != NGX_OK as ngx_int_t
        {
            return;
        }
        if (*wev).active() != 0 && (*wev).ready() == 0 {
            ngx_add_timer(wev, clcf.send_timeout);
        } else if (*wev).timer_set() != 0 {
            ngx_del_timer(wev);
        }
    }
}

/// The client can take more of the response (or `send_timeout` passed).
unsafe extern "C" fn on_write(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls request event handlers with the live request; our state is attached
    // before this handler is set.
    unsafe {
        let ctx = ctx_of(r);
        if ctx.is_null() || (*ctx).finished {
            return;
        }
        if (*ctx).ws.as_ref().is_some_and(|ws| ws.is_open()) {
            websocket::pump(r, ctx);
            return;
        }
        let c = (*r).connection;
        let wev = (*c).write;
        if (*wev).timedout() != 0 {
            (*c).set_timedout(1);
            ngx::ngx_log_error!(NGX_LOG_INFO, (*c).log, "portico: client timed out");
            finish(ctx);
            ngx_http_finalize_request(r, NGX_HTTP_REQUEST_TIME_OUT as ngx_int_t);
            return;
        }
        if !(*ctx).out.blocked {
            return;
        }
        let rc = ngx_http_output_filter(r, core::ptr::null_mut());
        if rc == NGX_ERROR as ngx_int_t {
            finish(ctx);
            ngx_http_finalize_request(r, NGX_ERROR as ngx_int_t);
            return;
        }
        let out = &mut (*ctx).out;
        let mut none = core::ptr::null_mut();
        ngx_chain_update_chains(
            (*r).pool,
            &mut out.free,
            &mut out.busy,
            &mut none,
            buf_tag(),
        );
        settle(r, ctx);
        if !(*ctx).out.blocked {
            if (*wev).timer_set() != 0 {
                ngx_del_timer(wev);
            }
            poll(r, ctx);
        }
    }
}
