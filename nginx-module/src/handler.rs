//! The content handler of a `portico_app` location, on the nginx thread.
//!
//! 1. [`content_handler`] has nginx read the whole request body
//!    (`ngx_http_read_client_request_body`) and returns `NGX_DONE`;
//! 2. [`body_ready`] (nginx's body callback) copies the request head and body into owned
//!    data, submits them to the app ([`portico_core::App::submit`]) and polls the exchange;
//! 3. whenever the app's thread produces events, [`crate::worker`]'s eventfd handler calls
//!    [`resume`], which polls again; once the response is complete (head, body, end) it is
//!    written in one go and the request finalized.
//!
//! A timer per waiting request keeps a gracefully exiting worker alive until the response is
//! out (nginx waits only for timers) and enforces `request_timeout` (504).

use crate::worker;
use crate::PorticoModule;
use bytes::Bytes;
use core::ffi::c_void;
use nginx_sys::{
    add_to_ngx_table, ngx_add_timer, ngx_alloc_chain_link, ngx_buf_t, ngx_chain_t,
    ngx_connection_local_sockaddr, ngx_del_timer, ngx_event_t, ngx_http_finalize_request,
    ngx_http_output_filter, ngx_http_read_client_request_body, ngx_http_request_t,
    ngx_http_run_posted_requests, ngx_http_send_header, ngx_int_t, ngx_list_push, ngx_pcalloc,
    ngx_pnalloc, ngx_pool_cleanup_add, ngx_str_t, ngx_table_elt_t, NGX_DONE, NGX_ERROR,
    NGX_HTTP_HEAD, NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_SPECIAL_RESPONSE, NGX_HTTP_VERSION_10,
    NGX_HTTP_VERSION_20, NGX_LOG_ERR, NGX_OK,
};
use ngx::http::{HttpModule, HttpModuleLocationConf};
use portico_core::exchange::{AppEvent, BodyPiece, Exchange};
use portico_core::model::{BodyLength, HttpVersion, RequestHead, ResponseHead};
use portico_core::router::Route;
use portico_core::DispatchError;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::unix::fs::FileExt;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often the keep-alive timer of a request without `request_timeout` fires.
const TICK: Duration = Duration::from_secs(60);

/// One request waiting for (or being answered by) its app. Boxed; owned by the request's
/// pool cleanup, which drops it when nginx frees the request.
struct RequestCtx {
    id: u64,
    exchange: Option<Exchange>,
    waker: Waker,
    head: Option<ResponseHead>,
    /// The response body, in the app's pieces; nginx's buffers point into them until the
    /// request is freed.
    body: Vec<Bytes>,
    timer: ngx_event_t,
    request_timeout: Option<Duration>,
    started: Instant,
    /// The response has been handed to nginx; later wakeups are ignored.
    finished: bool,
}

/// The app index of the location `r` runs in.
///
/// # Safety
/// `r` must be a live request.
unsafe fn app_index(r: *mut ngx_http_request_t) -> Option<usize> {
    // SAFETY: the request's location configuration array holds ours at our index.
    unsafe { PorticoModule::location_conf(&*r) }.and_then(|c| c.app)
}

/// The content handler of every location with `portico_app`.
///
/// # Safety
/// Called by nginx on the nginx thread with a live request.
pub unsafe extern "C" fn content_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls content handlers with a live request.
    let Some(index) = (unsafe { app_index(r) }) else {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    };
    let Some(limit) = worker::with(|w| w.dispatcher.apps()[index].config().max_body_size.0) else {
        // SAFETY: the request's connection and its log are live.
        let log = unsafe { (*(*r).connection).log };
        ngx::ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "portico: the apps are not loaded in this process"
        );
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    };
    // SAFETY: reading a field of the live request.
    let length = unsafe { (*r).headers_in.content_length_n };
    if limit > 0 && length > 0 && length as u64 > limit {
        // nginx's own client_max_body_size usually answers first.
        return DispatchError::BodyTooLarge { limit }.status() as ngx_int_t;
    }
    // SAFETY: the request is live; nginx calls `body_ready` once the body is read (perhaps
    // before this returns) and keeps the request alive until we finalize it.
    let rc = unsafe { ngx_http_read_client_request_body(r, Some(body_ready)) };
    if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
        return rc;
    }
    NGX_DONE as ngx_int_t
}

/// nginx has read the whole request body: submit the request to its app.
unsafe extern "C" fn body_ready(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls the body handler with the live request.
    let Some(index) = (unsafe { app_index(r) }) else {
        // SAFETY: as above.
        unsafe { ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t) };
        return;
    };
    // SAFETY: the request is live and its body has been read.
    let (head, body) = match unsafe { request_head(r) } {
        Ok(parts) => parts,
        Err(e) => {
            // SAFETY: the request's connection and its log are live.
            let log = unsafe { (*(*r).connection).log };
            ngx::ngx_log_error!(
                NGX_LOG_ERR,
                log,
                "portico: cannot read the request body: {}",
                e
            );
            // SAFETY: the request is live; we own its finalization.
            unsafe { ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t) };
            return;
        }
    };
    let submitted = worker::with(|w| {
        let app = &w.dispatcher.apps()[index];
        // SAFETY: `r` is live (its URI is read).
        let route = unsafe { route_of(r, index, &app.config().mount) };
        let timeout = app.config().request_timeout.as_limit();
        app.submit(head, route, Some(body)).map(|exchange| {
            let (id, waker) = w.register(r);
            (exchange, id, waker, timeout)
        })
    });
    let (exchange, id, waker, request_timeout) = match submitted {
        Some(Ok(parts)) => parts,
        Some(Err(e)) => {
            // SAFETY: the request is live; nothing of ours is attached to it yet.
            unsafe { finalize_error(r, &e) };
            return;
        }
        None => {
            // SAFETY: as above.
            unsafe { ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t) };
            return;
        }
    };
    let ctx = Box::into_raw(Box::new(RequestCtx {
        id,
        exchange: Some(exchange),
        waker,
        head: None,
        body: Vec::new(),
        // SAFETY: an all-zero ngx_event_t is nginx's own initial state (ngx_pcalloc'd).
        timer: unsafe { core::mem::zeroed() },
        request_timeout,
        started: Instant::now(),
        finished: false,
    }));
    // SAFETY: the request and its pool are live; the cleanup takes ownership of `ctx` and
    // runs when nginx frees the request, on this thread.
    unsafe {
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
        poll(r, ctx);
    }
}

fn first_interval(timeout: Option<Duration>) -> usize {
    timeout.unwrap_or(TICK).as_millis().max(1) as usize
}

/// Drops a request's state when nginx frees the request: stops its timer, forgets it, and
/// drops its exchange (which tells the app side the host is gone).
unsafe extern "C" fn cleanup_ctx(data: *mut c_void) {
    // SAFETY: `data` is the `RequestCtx` leaked in `body_ready`; this cleanup runs once.
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
unsafe fn ctx_of(r: *mut ngx_http_request_t) -> *mut RequestCtx {
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

/// The request's timer: `request_timeout` passed (504), or a keep-alive tick.
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
        match (*ctx).request_timeout {
            Some(limit) if (*ctx).started.elapsed() >= limit => {
                ngx::ngx_log_error!(
                    NGX_LOG_ERR,
                    (*c).log,
                    "portico: the app did not respond within {:?}",
                    limit
                );
                finish(ctx);
                finalize_error(r, &DispatchError::AppTimeout);
            }
            Some(limit) => {
                let left = limit.saturating_sub((*ctx).started.elapsed());
                ngx_add_timer(ev, left.as_millis().max(1) as usize);
            }
            None => ngx_add_timer(ev, TICK.as_millis() as usize),
        }
        ngx_http_run_posted_requests(c);
    }
}

/// Takes every event the app has ready; writes the response when it is complete.
///
/// # Safety
/// `r` is live and `ctx` is its state; nginx thread only. Neither may be used after this
/// returns having finalized the request.
unsafe fn poll(r: *mut ngx_http_request_t, ctx: *mut RequestCtx) {
    loop {
        // SAFETY: `ctx` is live until the request is freed, which only a finalize below can
        // cause, after which we return at once.
        let state = unsafe { &mut *ctx };
        let Some(exchange) = state.exchange.as_ref() else {
            return;
        };
        let event = {
            let mut cx = Context::from_waker(&state.waker);
            let mut next = pin!(exchange.next());
            match next.as_mut().poll(&mut cx) {
                // The waker stays armed in the exchange: the app's next event wakes us.
                Poll::Pending => return,
                Poll::Ready(event) => event,
            }
        };
        let failure = match event {
            Some(AppEvent::NeedBody) => {
                // The whole body went with the request.
                exchange.send_body(BodyPiece::End);
                continue;
            }
            Some(AppEvent::Head(head)) => {
                state.head = Some(head);
                continue;
            }
            Some(AppEvent::Body(piece)) => {
                state.body.push(piece);
                continue;
            }
            Some(AppEvent::File(file)) => match read_file(&file) {
                Ok(piece) => {
                    state.body.push(piece);
                    continue;
                }
                Err(e) => DispatchError::BadResponse(format!("cannot read the app's file: {e}")),
            },
            Some(AppEvent::EarlyHint(_)) | Some(AppEvent::Trailers(_)) => continue,
            Some(AppEvent::Whole(head, body)) => {
                state.head = Some(head);
                state.body.push(body);
                // SAFETY: as this function's.
                unsafe { finish_response(r, ctx) };
                return;
            }
            Some(AppEvent::End) if state.head.is_some() => {
                // SAFETY: as this function's.
                unsafe { finish_response(r, ctx) };
                return;
            }
            Some(AppEvent::End) => {
                DispatchError::BadResponse("response ended without a head".into())
            }
            Some(AppEvent::Failed(e)) => e,
            Some(AppEvent::WsAccept { .. } | AppEvent::WsSend(_) | AppEvent::WsClose { .. }) => {
                DispatchError::BadResponse("WebSocket event on an HTTP request".into())
            }
            None => DispatchError::BadResponse("the app thread stopped".into()),
        };
        // SAFETY: as this function's.
        unsafe {
            finish(ctx);
            finalize_error(r, &failure);
        }
        return;
    }
}

/// Reads a `wsgi.file_wrapper` region into memory (buffered responses only, for now).
fn read_file(file: &portico_core::exchange::FileBody) -> std::io::Result<Bytes> {
    let len = match file.len {
        Some(len) => len,
        None => file.file.metadata()?.len().saturating_sub(file.offset),
    };
    let mut data = vec![0; len as usize];
    let mut done = 0;
    while done < data.len() {
        let n = file
            .file
            .read_at(&mut data[done..], file.offset + done as u64)?;
        if n == 0 {
            data.truncate(done);
            break;
        }
        done += n;
    }
    Ok(Bytes::from(data))
}

/// Marks the request answered: no more polling, no timer, no exchange (the app side sees
/// the host leave if it had not finished).
///
/// # Safety
/// `ctx` is a live request state; nginx thread only.
unsafe fn finish(ctx: *mut RequestCtx) {
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

/// Writes the buffered response and finalizes the request.
///
/// # Safety
/// As [`poll`]'s.
unsafe fn finish_response(r: *mut ngx_http_request_t, ctx: *mut RequestCtx) {
    // SAFETY: the caller's.
    unsafe {
        finish(ctx);
        let rc = send_response(r, ctx);
        // The last use of `r`: finalizing may free it, and `ctx` with it.
        ngx_http_finalize_request(r, rc);
    }
}

/// Answers with the error's status (nginx's error page, so `error_page` applies) and the
/// headers that go with it.
///
/// # Safety
/// `r` is live and has no response head sent; nginx thread only. `r` may be freed on return.
unsafe fn finalize_error(r: *mut ngx_http_request_t, e: &DispatchError) {
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
unsafe fn push_header(
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

/// Status, headers and body to nginx's filters; returns what to finalize with.
///
/// # Safety
/// As [`poll`]'s; `ctx` holds a head.
unsafe fn send_response(r: *mut ngx_http_request_t, ctx: *mut RequestCtx) -> ngx_int_t {
    // SAFETY: the caller's. The body pieces stay in `ctx` (freed with the request), so
    // nginx's buffers may point into them.
    unsafe {
        let state = &mut *ctx;
        let Some(head) = state.head.take() else {
            return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        };
        let out = &mut (*r).headers_out;
        out.status = head.status as usize;
        if !head.reason.is_empty() {
            let line = format!("{} {}", head.status, head.reason);
            match pool_str(r, line.as_bytes()) {
                Some(s) => (*r).headers_out.status_line = s,
                None => return NGX_ERROR as ngx_int_t,
            }
        }
        let mut app_length = None;
        for (name, value) in &head.headers {
            if name.eq_ignore_ascii_case(b"content-length") {
                app_length = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse::<i64>().ok());
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
        let body_len: usize = state.body.iter().map(Bytes::len).sum();
        let is_head = (*r).method == NGX_HTTP_HEAD as usize;
        (*r).headers_out.content_length_n = match app_length {
            // A HEAD answer announces the length a GET would have.
            Some(n) if is_head && body_len == 0 => n,
            _ => body_len as i64,
        };

        let rc = ngx_http_send_header(r);
        if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t || (*r).header_only() != 0 {
            return rc;
        }

        let pool = (*r).pool;
        let mut first: *mut ngx_chain_t = core::ptr::null_mut();
        let mut last: *mut ngx_chain_t = core::ptr::null_mut();
        let pieces: Vec<&Bytes> = state.body.iter().filter(|b| !b.is_empty()).collect();
        let count = pieces.len().max(1);
        for i in 0..count {
            let buf: *mut ngx_buf_t = ngx_pcalloc(pool, core::mem::size_of::<ngx_buf_t>()).cast();
            let link = ngx_alloc_chain_link(pool);
            if buf.is_null() || link.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            if let Some(piece) = pieces.get(i) {
                let start = piece.as_ptr().cast_mut();
                (*buf).start = start;
                (*buf).pos = start;
                (*buf).last = start.add(piece.len());
                (*buf).end = (*buf).last;
                (*buf).set_memory(1);
            }
            if i + 1 == count {
                (*buf).set_last_buf(if (*r).main == r { 1 } else { 0 });
                (*buf).set_last_in_chain(1);
            }
            (*link).buf = buf;
            (*link).next = core::ptr::null_mut();
            if last.is_null() {
                first = link;
            } else {
                (*last).next = link;
            }
            last = link;
        }
        ngx_http_output_filter(r, first)
    }
}

/// The route of `r` under `mount`: nginx picked the location; the path below the mount is
/// `PATH_INFO` (nginx's decoded, normalized URI).
///
/// # Safety
/// `r` is live.
unsafe fn route_of(r: *mut ngx_http_request_t, app: usize, mount: &str) -> Route {
    // SAFETY: the request's URI is in its pool.
    let uri = unsafe { bytes_of(&(*r).uri) };
    let mount = mount.trim_end_matches('/');
    let m = mount.as_bytes();
    if uri.starts_with(m) && (uri.len() == m.len() || uri[m.len()] == b'/') {
        Route {
            app,
            script_name: mount.to_owned(),
            path_info: uri[m.len()..].to_vec(),
        }
    } else {
        Route {
            app,
            script_name: String::new(),
            path_info: uri.to_vec(),
        }
    }
}

/// The bytes of an nginx string.
///
/// # Safety
/// `s` must point to `len` readable bytes (or have `len` 0).
unsafe fn bytes_of(s: &ngx_str_t) -> &[u8] {
    if s.len == 0 || s.data.is_null() {
        &[]
    } else {
        // SAFETY: the caller's.
        unsafe { core::slice::from_raw_parts(s.data, s.len) }
    }
}

/// A socket address nginx holds, as Rust's.
///
/// # Safety
/// `sa` is null or points to a socket address of its family's size.
unsafe fn socket_addr(sa: *const libc::sockaddr) -> Option<SocketAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller's; the family says which structure it is.
    unsafe {
        match (*sa).sa_family as i32 {
            libc::AF_INET => {
                let sin = &*sa.cast::<libc::sockaddr_in>();
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// What the connection's TLS negotiated, if it is TLS (`https` for the app).
///
/// # Safety
/// `r` is live.
#[cfg(ngx_feature = "http_ssl")]
unsafe fn tls_info(r: *mut ngx_http_request_t) -> Option<portico_core::model::TlsInfo> {
    // SAFETY: the caller's; nginx's getters write pool strings into `s`.
    unsafe {
        let c = (*r).connection;
        if (*c).ssl.is_null() {
            return None;
        }
        let get = |f: unsafe extern "C" fn(
            *mut nginx_sys::ngx_connection_t,
            *mut nginx_sys::ngx_pool_t,
            *mut ngx_str_t,
        ) -> ngx_int_t| {
            let mut s = ngx_str_t {
                len: 0,
                data: core::ptr::null_mut(),
            };
            if f(c, (*r).pool, &mut s) == NGX_OK as ngx_int_t {
                String::from_utf8_lossy(bytes_of(&s)).into_owned()
            } else {
                String::new()
            }
        };
        let protocol = get(nginx_sys::ngx_ssl_get_protocol);
        let version = match protocol.as_str() {
            "TLSv1.3" => Some(0x0304),
            "TLSv1.2" => Some(0x0303),
            _ => None,
        };
        Some(portico_core::model::TlsInfo {
            server_cert: None,
            cipher: get(nginx_sys::ngx_ssl_get_cipher_name),
            protocol,
            version,
            cipher_suite: None,
        })
    }
}

#[cfg(not(ngx_feature = "http_ssl"))]
unsafe fn tls_info(_r: *mut ngx_http_request_t) -> Option<portico_core::model::TlsInfo> {
    None
}

/// The request head and the whole body, owned.
///
/// # Safety
/// `r` is live and its body has been read.
unsafe fn request_head(r: *mut ngx_http_request_t) -> std::io::Result<(RequestHead, Vec<Bytes>)> {
    // SAFETY: the caller's; everything read here lives in the request or its connection.
    unsafe {
        let req = &*r;
        let c = req.connection;
        let unparsed = bytes_of(&req.unparsed_uri);
        let path_end = unparsed
            .iter()
            .position(|&b| b == b'?')
            .unwrap_or(unparsed.len());
        let version = match req.http_version as u32 {
            v if v >= NGX_HTTP_VERSION_20 => HttpVersion::Http2,
            v if v <= NGX_HTTP_VERSION_10 => HttpVersion::Http10,
            _ => HttpVersion::Http11,
        };
        let request = ngx::http::Request::from_ngx_http_request(r);
        let mut headers: Vec<(Bytes, Bytes)> = request
            .headers_in_iterator()
            .map(|(name, value)| {
                (
                    Bytes::from(name.as_bytes().to_ascii_lowercase()),
                    Bytes::copy_from_slice(value.as_bytes()),
                )
            })
            .collect();
        if !headers.iter().any(|(n, _)| n.as_ref() == b"host") && req.headers_in.server.len > 0 {
            // HTTP/2's `:authority` stands in for Host (RFC 9113 section 8.3.1).
            headers.insert(
                0,
                (
                    Bytes::from_static(b"host"),
                    Bytes::copy_from_slice(bytes_of(&req.headers_in.server)),
                ),
            );
        }
        let client = socket_addr((*c).sockaddr.cast());
        let server =
            if ngx_connection_local_sockaddr(c, core::ptr::null_mut(), 0) == NGX_OK as ngx_int_t {
                socket_addr((*c).local_sockaddr.cast())
            } else {
                None
            };

        let mut body = Vec::new();
        let rb = req.request_body;
        if !rb.is_null() {
            let mut cl = (*rb).bufs;
            while !cl.is_null() {
                let b = &*(*cl).buf;
                if b.in_file() != 0 && !b.file.is_null() {
                    let len = (b.file_last - b.file_pos).max(0) as usize;
                    let mut data = vec![0u8; len];
                    let mut done = 0;
                    while done < len {
                        let n = libc::pread(
                            (*b.file).fd,
                            data[done..].as_mut_ptr().cast(),
                            len - done,
                            b.file_pos + done as i64,
                        );
                        if n < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        if n == 0 {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "request body file is short",
                            ));
                        }
                        done += n as usize;
                    }
                    body.push(Bytes::from(data));
                } else if (b.temporary() != 0 || b.memory() != 0 || b.mmap() != 0) && b.last > b.pos
                {
                    let len = b.last.offset_from(b.pos) as usize;
                    body.push(Bytes::copy_from_slice(core::slice::from_raw_parts(
                        b.pos, len,
                    )));
                }
                cl = (*cl).next;
            }
        }
        let total: usize = body.iter().map(Bytes::len).sum();
        let length = req.headers_in.content_length_n;
        let body_length = if length > 0 {
            BodyLength::Known(length as u64)
        } else if total > 0 {
            // Chunked (HTTP/1.1) or a length-less HTTP/2 stream.
            BodyLength::Unknown
        } else {
            BodyLength::Empty
        };

        let head = RequestHead {
            method: String::from_utf8_lossy(bytes_of(&req.method_name)).into_owned(),
            raw_path: Bytes::copy_from_slice(&unparsed[..path_end]),
            query: Bytes::copy_from_slice(bytes_of(&req.args)),
            version,
            headers,
            tls: tls_info(r),
            trailers: false,
            early_hints: false,
            client,
            server,
            body: body_length,
        };
        Ok((head, body))
    }
}
