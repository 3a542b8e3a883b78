//! The ASGI 3 adapter (HTTP and WebSocket spec 2.5, lifespan 2.0), run on an app's event-loop
//! thread (see [`super::event_loop`]).
//!
//! Each request gets a connection object written in Rust whose bound `receive` and `send`
//! methods are the ASGI callables. They never block: a message that is already there (a body
//! read before dispatch, room in the response mailbox) completes at once through a finished
//! future; otherwise the call arms the request's waker on the exchange and returns a pending
//! future that the loop resolves when the host changes something.

use super::event_loop::{self, LoopShared};
use super::format_exception;
use super::threads::{Job, JobKind};
use crate::error::DispatchError;
use crate::exchange::{AppEvent, AppWaker, BodyPiece, FileBody, Inbound, Responder, WsMessage};
use crate::model::{BodyLength, RequestHead, ResponseHead};
use bytes::Bytes;
use percent_encoding::percent_decode;
use portico_config::{AppConfig, LifespanMode, LoopKind};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

pyo3::create_exception!(
    portico,
    ClientDisconnected,
    PyOSError,
    "The client has gone away: raised by ASGI `send()` after a disconnect (ASGI HTTP spec, \
     \"Disconnected Client - send exception\")."
);

/// What every request of one ASGI app shares; lives on the loop thread's side.
pub(crate) struct AsgiContext {
    pub(crate) name: String,
    app: Py<PyAny>,
    pub(crate) event_loop: Py<PyAny>,
    create_future: Py<PyAny>,
    create_task: Py<PyAny>,
    /// The loop's `call_soon`.
    call_soon: Py<PyAny>,
    /// A [`HeldHeads`], to give `call_soon`.
    flush_held_heads: Py<PyAny>,
    /// A finished future whose result is `None`: what a `send()` that did not have to wait
    /// returns (a done future can be awaited any number of times).
    done: Py<PyAny>,
    /// The `asgi` scope key for http scopes.
    http_asgi_version: Py<PyDict>,
    /// The `asgi` scope key for websocket scopes.
    websocket_asgi_version: Py<PyDict>,
    /// The lifespan state; each request's scope gets a shallow copy (lifespan spec, "State").
    state: Py<PyDict>,
    lifespan: LifespanMode,
}

/// How the lifespan startup went.
#[derive(Debug)]
pub(crate) enum LifespanOutcome {
    /// `lifespan.startup.complete`.
    Started,
    /// The app does not speak lifespan (it raised on the scope, with `lifespan = "auto"`).
    Unsupported,
    /// `lifespan.startup.failed`, or an error with `lifespan = "on"`: the server must not start.
    Failed(String),
}

impl AsgiContext {
    /// Builds the context and the app's event loop (on the calling thread; the loop thread
    /// runs it). Fails when `loop = "uvloop"` and uvloop is not importable.
    pub(crate) fn new(
        py: Python<'_>,
        config: &AppConfig,
        app: Py<PyAny>,
    ) -> Result<AsgiContext, String> {
        let build = || -> PyResult<Result<AsgiContext, String>> {
            let event_loop = match config.event_loop {
                LoopKind::Asyncio => py.import("asyncio")?.call_method0("new_event_loop")?,
                LoopKind::Uvloop => match py.import("uvloop") {
                    Ok(uvloop) => uvloop.call_method0("new_event_loop")?,
                    Err(e) => {
                        return Ok(Err(format!(
                            "loop = \"uvloop\" but uvloop cannot be imported: {e}"
                        )))
                    }
                },
                LoopKind::Auto => match py.import("uvloop") {
                    Ok(uvloop) => uvloop.call_method0("new_event_loop")?,
                    Err(_) => py.import("asyncio")?.call_method0("new_event_loop")?,
                },
            };
            // `run_in_executor(None, ...)` and `asyncio.to_thread` run on `threads` threads.
            let executor = py
                .import("concurrent.futures")?
                .getattr("ThreadPoolExecutor")?
                .call(
                    (),
                    Some(&{
                        let kw = PyDict::new(py);
                        kw.set_item("max_workers", config.threads)?;
                        // Executor threads are the app's blocking work, not the loop: give
                        // them back the normal policy (they inherit the loop's SCHED_BATCH).
                        let os = py.import("os")?;
                        let reset = py.import("functools")?.getattr("partial")?.call1((
                            os.getattr("sched_setscheduler")?,
                            0,
                            os.getattr("SCHED_OTHER")?,
                            os.getattr("sched_param")?.call1((0,))?,
                        ))?;
                        kw.set_item("initializer", reset)?;
                        kw.set_item("thread_name_prefix", format!("py-{}-executor", config.name))?;
                        kw
                    }),
                )?;
            event_loop.call_method1("set_default_executor", (executor,))?;
            let done = event_loop.call_method0("create_future")?;
            done.call_method1("set_result", (py.None(),))?;
            // HTTP scopes say 2.3, as uvicorn's and granian's do, though `send()` does raise
            // after a disconnect (2.4): told 2.4, Starlette stops watching `receive()` for
            // `http.disconnect` and counts on `send()` raising, so a streaming response whose
            // generator is waiting for its next event would never learn that its client left.
            let http_asgi_version = PyDict::new(py);
            http_asgi_version.set_item("version", "3.0")?;
            http_asgi_version.set_item("spec_version", "2.3")?;
            let websocket_asgi_version = PyDict::new(py);
            websocket_asgi_version.set_item("version", "3.0")?;
            websocket_asgi_version.set_item("spec_version", "2.5")?;
            Ok(Ok(AsgiContext {
                name: config.name.clone(),
                app,
                create_future: event_loop.getattr("create_future")?.unbind(),
                create_task: event_loop.getattr("create_task")?.unbind(),
                call_soon: event_loop.getattr("call_soon")?.unbind(),
                flush_held_heads: Py::new(py, HeldHeads)?.into_any(),
                event_loop: event_loop.unbind(),
                done: done.unbind(),
                http_asgi_version: http_asgi_version.unbind(),
                websocket_asgi_version: websocket_asgi_version.unbind(),
                state: PyDict::new(py).unbind(),
                lifespan: config.lifespan,
            }))
        };
        build().map_err(|e| format_exception(py, &e))?
    }

    pub(crate) fn lifespan(&self) -> LifespanMode {
        self.lifespan
    }

    fn ready<'py>(&self, py: Python<'py>, value: Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let fut = self.create_future.bind(py).call0()?;
        fut.call_method1(intern!(py, "set_result"), (value,))?;
        Ok(fut)
    }

    fn pending<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.create_future.bind(py).call0()
    }
}

/// Completes `fut` with `value` unless the awaiting task was cancelled meanwhile.
fn resolve(py: Python<'_>, fut: &Py<PyAny>, value: Bound<'_, PyAny>) -> PyResult<()> {
    let fut = fut.bind(py);
    if !fut.call_method0(intern!(py, "done"))?.is_truthy()? {
        fut.call_method1(intern!(py, "set_result"), (value,))?;
    }
    Ok(())
}

/// Whether a future is finished (a waiter whose task was cancelled is): such a waiter must
/// not be handed a message, which would be lost with it.
fn is_done(py: Python<'_>, fut: &Py<PyAny>) -> PyResult<bool> {
    fut.bind(py).call_method0(intern!(py, "done"))?.is_truthy()
}

fn reject(py: Python<'_>, fut: &Py<PyAny>, err: PyErr) -> PyResult<()> {
    let fut = fut.bind(py);
    if !fut.call_method0(intern!(py, "done"))?.is_truthy()? {
        fut.call_method1(intern!(py, "set_exception"), (err.value(py),))?;
    }
    Ok(())
}

fn disconnected() -> PyErr {
    ClientDisconnected::new_err("the client has disconnected")
}

/// A live connection object in the loop thread's registry.
pub(crate) enum Conn {
    Http(Py<HttpConn>),
    Ws(Py<WsConn>),
    Lifespan(Py<LifespanConn>),
}

impl Conn {
    pub(crate) fn clone_ref(&self, py: Python<'_>) -> Conn {
        match self {
            Conn::Http(c) => Conn::Http(c.clone_ref(py)),
            Conn::Ws(c) => Conn::Ws(c.clone_ref(py)),
            Conn::Lifespan(c) => Conn::Lifespan(c.clone_ref(py)),
        }
    }

    fn object<'py>(&self, py: Python<'py>) -> &Bound<'py, PyAny> {
        match self {
            Conn::Http(c) => c.bind(py).as_any(),
            Conn::Ws(c) => c.bind(py).as_any(),
            Conn::Lifespan(c) => c.bind(py).as_any(),
        }
    }

    /// Something this connection armed for has happened: retry its waiting calls.
    pub(crate) fn wake(&self, py: Python<'_>) -> PyResult<()> {
        match self {
            Conn::Http(c) => c.bind(py).borrow_mut().on_wake(py),
            Conn::Ws(c) => c.bind(py).borrow_mut().on_wake(py),
            Conn::Lifespan(_) => Ok(()),
        }
    }

    pub(crate) fn request_shutdown(&self, py: Python<'_>, reply: mpsc::Sender<()>) -> PyResult<()> {
        match self {
            Conn::Lifespan(c) => c.bind(py).borrow_mut().request_shutdown(py, reply),
            _ => {
                let _ = reply.send(());
                Ok(())
            }
        }
    }

    /// Cancels the task running the app's call for this request (none for the lifespan,
    /// whose shutdown follows).
    pub(crate) fn cancel(&self, py: Python<'_>) -> PyResult<()> {
        let task = match self {
            Conn::Http(c) => c.bind(py).borrow().link.task_ref(py),
            Conn::Ws(c) => c.bind(py).borrow().link.task_ref(py),
            Conn::Lifespan(_) => None,
        };
        if let Some(task) = task {
            task.bind(py).call_method0(intern!(py, "cancel"))?;
        }
        Ok(())
    }

    /// Calls the app with `scope` and this connection's `receive`/`send`, and runs the
    /// coroutine as an asyncio task, wrapped so that its end reaches this connection at once.
    fn run_app(&self, py: Python<'_>, ctx: &AsgiContext, scope: Bound<'_, PyDict>) -> PyResult<()> {
        let object = self.object(py);
        let receive = object.getattr(intern!(py, "receive"))?;
        let send = object.getattr(intern!(py, "send"))?;
        let task = ctx
            .app
            .bind(py)
            .call1((scope, receive, send))
            .and_then(|coro| {
                // ASGI 3 asks for an awaitable: a coroutine usually, but any object with
                // `__await__` will do; drive its iterator then.
                // SAFETY: `coro` is a live object and the GIL is held; the check only reads
                // its type.
                let native = unsafe { pyo3::ffi::PyCoro_CheckExact(coro.as_ptr()) } != 0;
                let coro = if native {
                    coro
                } else {
                    coro.call_method0(intern!(py, "__await__"))?
                };
                let wrapped = AppCoroutine {
                    inner: coro.unbind(),
                    conn: Some(self.clone_ref(py)),
                };
                ctx.create_task.bind(py).call1((wrapped,))
            });
        match task {
            Ok(task) => {
                // asyncio keeps only weak references to tasks: the connection holds it.
                match self {
                    Conn::Http(c) => c.bind(py).borrow_mut().link.task = Some(task.unbind()),
                    Conn::Ws(c) => c.bind(py).borrow_mut().link.task = Some(task.unbind()),
                    Conn::Lifespan(c) => c.bind(py).borrow_mut().task = Some(task.unbind()),
                }
            }
            // The callable raised before it produced a coroutine.
            Err(e) => self.ended(py, Some(e)),
        }
        Ok(())
    }

    /// The app's coroutine has returned (`None`) or raised.
    fn ended(&self, py: Python<'_>, err: Option<PyErr>) {
        match self {
            Conn::Http(c) => c.bind(py).borrow_mut().ended(py, err),
            Conn::Ws(c) => c.bind(py).borrow_mut().ended(py, err),
            Conn::Lifespan(c) => c.bind(py).borrow_mut().report_end(py, err),
        }
    }
}

/// The app's coroutine as the task runs it: every step is forwarded, and the step that ends
/// it (a return or an exception) is reported to the connection right there, with no done
/// callback and no extra turn of the loop. An exception is logged and swallowed here, so the
/// task itself always ends cleanly (no "exception was never retrieved" noise).
#[pyclass(module = "portico", name = "AppCoroutine")]
struct AppCoroutine {
    inner: Py<PyAny>,
    conn: Option<Conn>,
}

impl AppCoroutine {
    fn step(&mut self, py: Python<'_>, result: PyResult<Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        match result {
            Ok(yielded) => Ok(yielded.unbind()),
            Err(e) => {
                let err = if e.is_instance_of::<pyo3::exceptions::PyStopIteration>(py) {
                    None
                } else {
                    Some(e)
                };
                if let Some(conn) = self.conn.take() {
                    conn.ended(py, err);
                }
                Err(pyo3::exceptions::PyStopIteration::new_err(()))
            }
        }
    }
}

#[pymethods]
impl AppCoroutine {
    fn send(&mut self, py: Python<'_>, value: Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let result = self
            .inner
            .bind(py)
            .call_method1(intern!(py, "send"), (value,));
        self.step(py, result)
    }

    #[pyo3(signature = (*args))]
    fn throw(&mut self, py: Python<'_>, args: Bound<'_, PyTuple>) -> PyResult<Py<PyAny>> {
        let result = self.inner.bind(py).call_method1(intern!(py, "throw"), args);
        self.step(py, result)
    }

    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        self.inner.bind(py).call_method0(intern!(py, "close"))?;
        Ok(())
    }

    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.send(py, py.None().into_bound(py))
    }
}

/// The request-side plumbing every connection object has.
struct Link {
    id: u64,
    ctx: Arc<AsgiContext>,
    shared: Arc<LoopShared>,
    responder: Option<Responder>,
    waker: Arc<dyn AppWaker>,
    task: Option<Py<PyAny>>,
    /// A `receive()` waiting for the host.
    recv_waiter: Option<Py<PyAny>>,
    /// `send()` calls waiting for room, in order, with the events still to deliver.
    send_waiters: VecDeque<(Py<PyAny>, VecDeque<AppEvent>)>,
    /// `METHOD path`, for log lines.
    what: String,
    /// The app was told its client left (`http.disconnect`, or `send()` raising) before its
    /// response ended.
    told_gone: bool,
}

impl Link {
    /// The task running the app's call, once it runs.
    fn task_ref(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.task.as_ref().map(|task| task.clone_ref(py))
    }

    fn new(
        id: u64,
        waker: Arc<dyn AppWaker>,
        ctx: &Arc<AsgiContext>,
        shared: &Arc<LoopShared>,
        responder: Responder,
        head: &RequestHead,
    ) -> Link {
        Link {
            id,
            ctx: ctx.clone(),
            shared: shared.clone(),
            responder: Some(responder),
            waker,
            task: None,
            recv_waiter: None,
            send_waiters: VecDeque::new(),
            what: format!(
                "{} {}",
                head.method,
                String::from_utf8_lossy(&head.raw_path)
            ),
            told_gone: false,
        }
    }

    fn responder(&self) -> PyResult<&Responder> {
        self.responder.as_ref().ok_or_else(disconnected)
    }

    /// Refuses a second concurrent `receive()`, forgetting an earlier one that was cancelled
    /// (a timeout, a cancel scope).
    fn check_no_waiter(&mut self, py: Python<'_>) -> PyResult<()> {
        if let Some(waiter) = &self.recv_waiter {
            if !is_done(py, waiter)? {
                return Err(PyRuntimeError::new_err(
                    "receive() called while another receive() is still waiting",
                ));
            }
            self.recv_waiter = None;
        }
        Ok(())
    }

    /// What `receive()` returns: a finished future with the message when there is one, else
    /// a pending future that the next wakeup resolves.
    fn receive_result<'py>(
        &mut self,
        py: Python<'py>,
        message: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match message {
            Some(message) => self.ctx.ready(py, message),
            None => {
                let fut = self.ctx.pending(py)?;
                self.recv_waiter = Some(fut.clone().unbind());
                Ok(fut)
            }
        }
    }

    /// Takes the waiting `receive()` future if its task still waits for it.
    fn live_waiter(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self.recv_waiter.take() {
            Some(fut) if !is_done(py, &fut)? => Ok(Some(fut)),
            _ => Ok(None),
        }
    }

    /// Delivers `events` in order: returns the shared finished future when they all fit,
    /// else a pending future resolved once the rest are delivered.
    fn send_events<'py>(
        &mut self,
        py: Python<'py>,
        mut events: VecDeque<AppEvent>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if self.send_waiters.is_empty() {
            if let Err(e) = self.deliver(&mut events) {
                self.told_gone = true;
                return Err(e);
            }
            if events.is_empty() {
                return Ok(self.ctx.done.bind(py).clone());
            }
        }
        let fut = self.ctx.pending(py)?;
        self.send_waiters.push_back((fut.clone().unbind(), events));
        Ok(fut)
    }

    /// Pushes events until the mailbox is full (the waker is then armed).
    fn deliver(&self, events: &mut VecDeque<AppEvent>) -> PyResult<()> {
        let responder = self.responder()?;
        while let Some(event) = events.pop_front() {
            match responder.try_send_or_arm(event, &self.waker) {
                Ok(()) => {}
                Err(Ok(event)) => {
                    events.push_front(event);
                    return Ok(());
                }
                Err(Err(_gone)) => return Err(disconnected()),
            }
        }
        Ok(())
    }

    /// Retries waiting sends after a wakeup.
    fn flush(&mut self, py: Python<'_>) -> PyResult<()> {
        while let Some((fut, mut events)) = self.send_waiters.pop_front() {
            match self.deliver(&mut events) {
                Ok(()) if events.is_empty() => resolve(py, &fut, py.None().into_bound(py))?,
                Ok(()) => {
                    self.send_waiters.push_front((fut, events));
                    return Ok(());
                }
                Err(e) => {
                    self.told_gone = true;
                    reject(py, &fut, e)?
                }
            }
        }
        Ok(())
    }

    /// Logs how the app's task ended; returns the failure to report, if it failed.
    /// `cut_short` says why the response could not be finished, when the app was told so
    /// before it raised: what it raised then is its way of giving up (Starlette turns our
    /// disconnect into its own `ClientDisconnect`), worth one line, not a traceback, as
    /// uvicorn logs nothing for it.
    fn task_failure(
        &self,
        py: Python<'_>,
        err: Option<PyErr>,
        cut_short: Option<&str>,
    ) -> Option<String> {
        let err = err?;
        let gone = self.responder.as_ref().is_none_or(|r| r.host_gone());
        if gone && err.is_instance_of::<ClientDisconnected>(py) {
            // The app let our own disconnect signal escape: nothing worth a traceback.
            log::info!(
                "app `{}`: {}: the client went away",
                self.ctx.name,
                self.what
            );
            return Some("client went away".into());
        }
        if let Some(why) = cut_short {
            let raised = err
                .get_type(py)
                .fully_qualified_name()
                .map_or_else(|_| "an exception".to_owned(), |name| name.to_string());
            log::info!(
                "app `{}`: {}: {why}, and the app ended with {raised}",
                self.ctx.name,
                self.what
            );
            log::debug!("{}", format_exception(py, &err));
            return Some(why.to_owned());
        }
        let traceback = format_exception(py, &err);
        log::error!(
            "app `{}`: exception in ASGI app for {}:\n{}",
            self.ctx.name,
            self.what,
            traceback
        );
        Some(traceback.lines().last().unwrap_or_default().to_owned())
    }

    /// The app is done with this request: tell the host if it must fail, drop our half and
    /// forget the connection.
    fn finish(&mut self, py: Python<'_>, failure: Option<AppEvent>) {
        if let (Some(event), Some(responder)) = (failure, &self.responder) {
            // If the mailbox is full the host still sees the failure: our half closes below
            // without an `End`.
            let _ = responder.try_send(event);
        }
        self.responder = None;
        self.task = None;
        if let Some(fut) = self.recv_waiter.take() {
            let _ = reject(py, &fut, disconnected());
        }
        for (fut, _) in std::mem::take(&mut self.send_waiters) {
            let _ = reject(py, &fut, disconnected());
        }
        if event_loop::unregister(self.id).is_some() {
            self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn message_type<'py>(message: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyString>> {
    let py = message.py();
    let message = message
        .cast::<PyDict>()
        .map_err(|_| PyTypeError::new_err("an ASGI message must be a dict"))?;
    message
        .get_item(intern!(py, "type"))?
        .ok_or_else(|| PyValueError::new_err("an ASGI message needs a \"type\" key"))?
        .cast_into::<PyString>()
        .map_err(|_| PyTypeError::new_err("an ASGI message's \"type\" must be a str"))
}

fn get<'py>(
    message: &Bound<'py, PyAny>,
    key: &Bound<'py, PyString>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    message
        .cast::<PyDict>()?
        .get_item(key)
        .map(|v| v.filter(|v| !v.is_none()))
}

fn get_bool(message: &Bound<'_, PyAny>, key: &Bound<'_, PyString>) -> PyResult<bool> {
    get(message, key)?.map_or(Ok(false), |v| v.is_truthy())
}

fn get_bytes(message: &Bound<'_, PyAny>, key: &Bound<'_, PyString>) -> PyResult<Bytes> {
    match get(message, key)? {
        None => Ok(Bytes::new()),
        Some(v) => v
            .cast::<PyBytes>()
            .map(|b| Bytes::copy_from_slice(b.as_bytes()))
            .map_err(|_| {
                PyTypeError::new_err(format!("\"{}\" must be bytes", key.to_string_lossy()))
            }),
    }
}

/// ASGI headers: an iterable of `[name, value]` byte-string pairs.
fn asgi_headers(value: Option<Bound<'_, PyAny>>) -> PyResult<Vec<(Bytes, Bytes)>> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for pair in value.try_iter()? {
        let pair = pair?;
        let mut items = pair.try_iter()?;
        let mut next = || -> PyResult<Bytes> {
            let item = items.next().ok_or_else(|| {
                PyValueError::new_err("each header must be a [name, value] pair")
            })??;
            item.cast::<PyBytes>()
                .map(|b| Bytes::copy_from_slice(b.as_bytes()))
                .map_err(|_| PyTypeError::new_err("header names and values must be bytes"))
        };
        let (name, value) = (next()?, next()?);
        if items.next().is_some() {
            return Err(PyValueError::new_err(
                "each header must be a [name, value] pair",
            ));
        }
        out.push((name, value));
    }
    Ok(out)
}

fn checked_head(
    status: Option<Bound<'_, PyAny>>,
    headers: Vec<(Bytes, Bytes)>,
) -> PyResult<ResponseHead> {
    let status: u16 = status
        .ok_or_else(|| PyValueError::new_err("http.response.start needs a \"status\""))?
        .extract()
        .map_err(|_| PyValueError::new_err("\"status\" must be an int from 200 to 999"))?;
    ResponseHead::with_status(status, "", headers).map_err(PyValueError::new_err)
}

/// Builds the scope shared by http and websocket connections (ASGI HTTP spec,
/// "HTTP Connection Scope" / "Websocket Connection Scope").
fn connection_scope<'py>(
    py: Python<'py>,
    ctx: &AsgiContext,
    job: &Job,
    websocket: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let head = &job.head;
    let scope = PyDict::new(py);
    let secure = head.secure;
    scope.set_item(
        intern!(py, "type"),
        if websocket {
            intern!(py, "websocket")
        } else {
            intern!(py, "http")
        },
    )?;
    let asgi_version = if websocket {
        &ctx.websocket_asgi_version
    } else {
        &ctx.http_asgi_version
    };
    scope.set_item(intern!(py, "asgi"), asgi_version.bind(py))?;
    scope.set_item(intern!(py, "http_version"), head.version.short())?;
    let scheme = match (websocket, secure) {
        (false, false) => intern!(py, "http"),
        (false, true) => intern!(py, "https"),
        (true, false) => intern!(py, "ws"),
        (true, true) => intern!(py, "wss"),
    };
    scope.set_item(intern!(py, "scheme"), scheme)?;
    if !websocket {
        let method = match head.method.as_str() {
            "GET" => intern!(py, "GET").clone(),
            "POST" => intern!(py, "POST").clone(),
            other => PyString::new(py, other),
        };
        scope.set_item(intern!(py, "method"), method)?;
    }
    // `path` is the whole decoded path, `root_path` the mount (as uvicorn and Starlette have
    // it since the spec's clarification of root_path).
    let decoded = percent_decode(&head.raw_path).decode_utf8_lossy();
    scope.set_item(intern!(py, "path"), decoded.as_ref())?;
    scope.set_item(intern!(py, "raw_path"), PyBytes::new(py, &head.raw_path))?;
    scope.set_item(intern!(py, "query_string"), PyBytes::new(py, &head.query))?;
    scope.set_item(intern!(py, "root_path"), job.route.script_name.as_str())?;
    let headers = PyList::empty(py);
    for (name, value) in &head.headers {
        headers.append(PyTuple::new(
            py,
            [PyBytes::new(py, name), PyBytes::new(py, value)],
        )?)?;
    }
    scope.set_item(intern!(py, "headers"), headers)?;
    match head.client {
        Some(a) => scope.set_item(intern!(py, "client"), (super::ip_text(a.ip()), a.port()))?,
        None => scope.set_item(intern!(py, "client"), py.None())?,
    }
    match head.server {
        Some(a) => scope.set_item(intern!(py, "server"), (super::ip_text(a.ip()), a.port()))?,
        None => scope.set_item(intern!(py, "server"), py.None())?,
    }
    scope.set_item(intern!(py, "state"), ctx.state.bind(py).copy()?)?;
    // Only what works on this connection is offered.
    let extensions = PyDict::new(py);
    if websocket {
        extensions.set_item("websocket.http.response", PyDict::new(py))?;
        let subprotocols = PyList::empty(py);
        for (name, value) in &head.headers {
            if name.as_ref() == b"sec-websocket-protocol" {
                for p in String::from_utf8_lossy(value).split(',') {
                    let p = p.trim();
                    if !p.is_empty() {
                        subprotocols.append(p)?;
                    }
                }
            }
        }
        scope.set_item(intern!(py, "subprotocols"), subprotocols)?;
    } else {
        extensions.set_item("http.response.pathsend", PyDict::new(py))?;
        if head.early_hints {
            extensions.set_item("http.response.early_hint", PyDict::new(py))?;
        }
        // Only for clients that said they take trailers (RFC 9110 section 10.1.4, `TE:
        // trailers`; what gRPC clients send), and only where the host can send them.
        if head.trailers
            && head.headers.iter().any(|(n, v)| {
                n.as_ref() == b"te"
                    && v.split(|&b| b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
            })
        {
            extensions.set_item("http.response.trailers", PyDict::new(py))?;
        }
    }
    if let Some(info) = &head.tls {
        let tls = PyDict::new(py);
        tls.set_item("server_cert", info.server_cert.as_deref())?;
        tls.set_item("client_cert_chain", PyList::empty(py))?;
        tls.set_item("client_cert_name", py.None())?;
        tls.set_item("client_cert_error", py.None())?;
        tls.set_item("tls_version", info.version)?;
        tls.set_item("cipher_suite", info.cipher_suite)?;
        extensions.set_item("tls", tls)?;
    }
    scope.set_item(intern!(py, "extensions"), extensions)?;
    Ok(scope)
}

/// On the loop thread: starts the app on a new request.
pub(crate) fn start_request(
    py: Python<'_>,
    ctx: &Arc<AsgiContext>,
    shared: &Arc<LoopShared>,
    mut job: Job,
) -> PyResult<()> {
    if job.responder.host_gone() {
        // Timed out or abandoned while queued: the app never sees it.
        shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        return Ok(());
    }
    let websocket = job.kind == JobKind::WebSocket;
    let scope = match connection_scope(py, ctx, &job, websocket) {
        Ok(scope) => scope,
        Err(e) => {
            shared.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
    };
    let responder = job.responder.clone();
    let body = job.body.take();
    let conn = event_loop::register(py, shared, |id, waker| {
        let link = Link::new(id, waker, ctx, shared, responder, &job.head);
        Ok(if websocket {
            Conn::Ws(Py::new(
                py,
                WsConn {
                    link,
                    phase: WsPhase::Handshake,
                    connect_sent: false,
                    close: None,
                },
            )?)
        } else {
            let request_body = match (body, job.head.body) {
                (Some(pieces), _) => RequestBody::Whole(pieces),
                (None, BodyLength::Empty) => RequestBody::Whole(Vec::new()),
                (None, BodyLength::Known(n)) => RequestBody::Stream {
                    asked: false,
                    received: 0,
                    known: Some(n),
                },
                (None, BodyLength::Unknown) => RequestBody::Stream {
                    asked: false,
                    received: 0,
                    known: None,
                },
            };
            Conn::Http(Py::new(
                py,
                HttpConn {
                    link,
                    body: request_body,
                    is_head: job.head.method == "HEAD",
                    early_hints_ok: job.head.early_hints,
                    trailers_ok: job.head.trailers,
                    phase: Phase::Start,
                    body_refused: false,
                },
            )?)
        })
    });
    match conn {
        Ok(conn) => conn.run_app(py, ctx, scope),
        Err(e) => {
            shared.in_flight.fetch_sub(1, Ordering::AcqRel);
            Err(e)
        }
    }
}

/// The request body as the app receives it.
enum RequestBody {
    /// All of it, read before dispatch: one `http.request` message.
    Whole(Vec<Bytes>),
    /// Pulled from the host piece by piece as the app calls `receive()`.
    Stream {
        /// A [`AppEvent::NeedBody`] is outstanding.
        asked: bool,
        received: u64,
        known: Option<u64>,
    },
    /// Delivered to the end; `receive()` now waits for the disconnect.
    Done,
}

/// Where the response is.
enum Phase {
    Start,
    /// After `http.response.start`; the head is held until the first body message so that a
    /// one-message body goes out with it.
    Body {
        head: Option<ResponseHead>,
        trailers: bool,
    },
    /// Body sent, collecting `http.response.trailers`.
    Trailers(Vec<(Bytes, Bytes)>),
    Done,
}

/// One HTTP request's connection object: `receive`, `send` and the task's end.
#[pyclass(module = "portico", name = "HttpConnection")]
pub(crate) struct HttpConn {
    link: Link,
    body: RequestBody,
    is_head: bool,
    early_hints_ok: bool,
    trailers_ok: bool,
    phase: Phase,
    /// The host refused the rest of the request body (over `max_body_size`, or cut off),
    /// and the app was told with `http.disconnect`.
    body_refused: bool,
}

fn request_message<'py>(py: Python<'py>, body: &[u8], more: bool) -> PyResult<Bound<'py, PyAny>> {
    let m = PyDict::new(py);
    m.set_item(intern!(py, "type"), intern!(py, "http.request"))?;
    m.set_item(intern!(py, "body"), PyBytes::new(py, body))?;
    m.set_item(intern!(py, "more_body"), more)?;
    Ok(m.into_any())
}

fn disconnect_message(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let m = PyDict::new(py);
    m.set_item(intern!(py, "type"), intern!(py, "http.disconnect"))?;
    Ok(m.into_any())
}

impl HttpConn {
    /// The next `receive()` message if one is ready; otherwise the waker is armed.
    fn poll_receive<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let finished = matches!(self.phase, Phase::Done);
        let Some(responder) = self.link.responder.as_ref() else {
            self.link.told_gone |= !finished;
            return disconnect_message(py).map(Some);
        };
        match &mut self.body {
            RequestBody::Whole(pieces) => {
                let msg = match pieces.len() {
                    0 => request_message(py, b"", false)?,
                    1 => request_message(py, &pieces[0], false)?,
                    _ => request_message(py, &pieces.concat(), false)?,
                };
                self.body = RequestBody::Done;
                Ok(Some(msg))
            }
            RequestBody::Stream {
                asked,
                received,
                known,
            } => {
                if !*asked {
                    match responder.try_send_or_arm(AppEvent::NeedBody, &self.link.waker) {
                        Ok(()) => *asked = true,
                        Err(Ok(_)) => return Ok(None),
                        Err(Err(_)) => {
                            self.link.told_gone = true;
                            return disconnect_message(py).map(Some);
                        }
                    }
                }
                match responder.try_recv_body_or_arm(&self.link.waker) {
                    None => Ok(None),
                    Some(BodyPiece::Data(data)) => {
                        *asked = false;
                        *received += data.len() as u64;
                        let more = known.is_none_or(|n| *received < n);
                        if !more {
                            self.body = RequestBody::Done;
                        }
                        request_message(py, &data, more).map(Some)
                    }
                    Some(BodyPiece::End) => {
                        self.body = RequestBody::Done;
                        request_message(py, b"", false).map(Some)
                    }
                    Some(BodyPiece::Failed(_)) => {
                        // The client is gone, or the body broke a limit (the host answers
                        // with that status): either way this request is over for the app.
                        self.body = RequestBody::Done;
                        self.body_refused = true;
                        disconnect_message(py).map(Some)
                    }
                }
            }
            RequestBody::Done => {
                // ASGI HTTP spec: `http.disconnect` once the response is sent or the client
                // has gone; until then `receive()` waits.
                if finished || responder.host_gone_or_arm(&self.link.waker) {
                    self.link.told_gone |= !finished;
                    disconnect_message(py).map(Some)
                } else {
                    Ok(None)
                }
            }
        }
    }

    fn on_wake(&mut self, py: Python<'_>) -> PyResult<()> {
        // A waiter cancelled meanwhile is dropped unanswered: what arrived stays queued.
        if let Some(fut) = self.link.live_waiter(py)? {
            match self.poll_receive(py)? {
                Some(message) => resolve(py, &fut, message)?,
                None => self.link.recv_waiter = Some(fut),
            }
        }
        self.link.flush(py)
    }

    /// The events one `send()` message turns into.
    fn events_for(
        &mut self,
        py: Python<'_>,
        message: &Bound<'_, PyAny>,
    ) -> PyResult<VecDeque<AppEvent>> {
        let kind = message_type(message)?;
        let mut events = VecDeque::with_capacity(2);
        match (kind.to_str()?, &mut self.phase) {
            ("http.response.start", Phase::Start) => {
                let headers = asgi_headers(get(message, intern!(py, "headers"))?)?;
                let head = checked_head(get(message, intern!(py, "status"))?, headers)?;
                let trailers = self.trailers_ok && get_bool(message, intern!(py, "trailers"))?;
                self.phase = Phase::Body {
                    head: Some(head),
                    trailers,
                };
                hold_head(py, &self.link.ctx, self.link.id)?;
            }
            // ASGI "Early Hints" extension: Link headers for a 103 before the response.
            ("http.response.early_hint", Phase::Start) => {
                let mut links = Vec::new();
                if let Some(values) = get(message, intern!(py, "links"))? {
                    for value in values.try_iter()? {
                        let value = value?;
                        let value = value
                            .cast::<PyBytes>()
                            .map_err(|_| PyTypeError::new_err("early hint links must be bytes"))?;
                        crate::model::check_header(b"link", value.as_bytes())
                            .map_err(PyValueError::new_err)?;
                        links.push(Bytes::copy_from_slice(value.as_bytes()));
                    }
                }
                if self.early_hints_ok && !links.is_empty() {
                    events.push_back(AppEvent::EarlyHint(links));
                }
            }
            ("http.response.body", Phase::Body { head, trailers }) => {
                let body = get_bytes(message, intern!(py, "body"))?;
                let more = get_bool(message, intern!(py, "more_body"))?;
                let trailers = *trailers;
                match head.take() {
                    Some(mut head) if !more && !trailers => {
                        if !self.is_head
                            && !head.has_content_length()
                            && !matches!(head.status, 204 | 304)
                        {
                            head.headers.push((
                                Bytes::from_static(b"content-length"),
                                Bytes::from(body.len().to_string()),
                            ));
                        }
                        events.push_back(AppEvent::Whole(head, body));
                        self.phase = Phase::Done;
                        return Ok(events);
                    }
                    Some(head) => events.push_back(AppEvent::Head(head)),
                    None => {}
                }
                if !body.is_empty() {
                    events.push_back(AppEvent::Body(body));
                }
                if !more {
                    if trailers {
                        self.phase = Phase::Trailers(Vec::new());
                    } else {
                        events.push_back(AppEvent::End);
                        self.phase = Phase::Done;
                    }
                }
            }
            ("http.response.pathsend", Phase::Body { head, trailers }) => {
                let path: std::path::PathBuf = get(message, intern!(py, "path"))?
                    .ok_or_else(|| {
                        PyValueError::new_err("http.response.pathsend needs a \"path\"")
                    })?
                    .extract()?;
                if !path.is_absolute() {
                    return Err(PyValueError::new_err(
                        "pathsend's \"path\" must be absolute",
                    ));
                }
                let file = std::fs::File::open(&path).map_err(PyErr::from)?;
                let size = file.metadata().map_err(PyErr::from)?.len();
                if let Some(mut head) = head.take() {
                    if !head.has_content_length() {
                        head.headers.push((
                            Bytes::from_static(b"content-length"),
                            Bytes::from(size.to_string()),
                        ));
                    }
                    events.push_back(AppEvent::Head(head));
                }
                events.push_back(AppEvent::File(FileBody {
                    file,
                    offset: 0,
                    len: Some(size),
                }));
                if *trailers {
                    self.phase = Phase::Trailers(Vec::new());
                } else {
                    events.push_back(AppEvent::End);
                    self.phase = Phase::Done;
                }
            }
            ("http.response.trailers", Phase::Trailers(collected)) => {
                collected.extend(asgi_headers(get(message, intern!(py, "headers"))?)?);
                if !get_bool(message, intern!(py, "more_trailers"))? {
                    for (name, value) in collected.iter() {
                        crate::model::check_header(name, value).map_err(PyValueError::new_err)?;
                    }
                    events.push_back(AppEvent::Trailers(std::mem::take(collected)));
                    events.push_back(AppEvent::End);
                    self.phase = Phase::Done;
                }
            }
            // Trailers the connection cannot carry (the extension was not offered) are dropped.
            ("http.response.trailers", _) if !self.trailers_ok => {}
            (kind, phase) => {
                let state = match phase {
                    Phase::Start => "before http.response.start",
                    Phase::Body { .. } => "while sending the body",
                    Phase::Trailers(_) => "while sending trailers",
                    Phase::Done => "after the response completed",
                };
                return Err(PyRuntimeError::new_err(format!(
                    "unexpected ASGI message {kind:?} {state}"
                )));
            }
        }
        Ok(events)
    }
}

#[pymethods]
impl HttpConn {
    /// ASGI `receive()`: `http.request` messages, then `http.disconnect`.
    fn receive<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.link.check_no_waiter(py)?;
        let message = self.poll_receive(py)?;
        self.link.receive_result(py, message)
    }

    /// ASGI `send(message)`: the response, checked before anything reaches the wire.
    fn send<'py>(
        &mut self,
        py: Python<'py>,
        message: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if self.link.responder.as_ref().is_none_or(|r| r.host_gone()) {
            self.link.told_gone |= !matches!(self.phase, Phase::Done);
            return Err(disconnected());
        }
        let events = self.events_for(py, &message)?;
        self.link.send_events(py, events)
    }
}

thread_local! {
    /// Requests whose `http.response.start` is being held for a body message in the same
    /// task step (so that a one-message body goes out with its head and a Content-Length).
    /// Non-empty exactly while a [`HeldHeads`] call is scheduled on the loop.
    static HELD_HEADS: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Notes that request `id` holds its head; the first held head of a loop pass schedules one
/// [`HeldHeads`] call, which runs once every task step now ready has run.
fn hold_head(py: Python<'_>, ctx: &AsgiContext, id: u64) -> PyResult<()> {
    let first = HELD_HEADS.with_borrow_mut(|held| {
        held.push(id);
        held.len() == 1
    });
    if first {
        if let Err(e) = ctx
            .call_soon
            .bind(py)
            .call1((ctx.flush_held_heads.bind(py),))
        {
            HELD_HEADS.with_borrow_mut(Vec::clear);
            return Err(e);
        }
    }
    Ok(())
}

/// Sends the heads still held once their tasks have yielded to the loop: an app that
/// started its response and then awaits something else (a streaming response waiting for
/// its first event, server-sent events) has its head on the wire at once, as uvicorn
/// writes it, instead of when its first body message comes; `request_timeout`, which ends
/// with the head, stops then too.
#[pyclass(module = "portico", name = "HeldHeads")]
struct HeldHeads;

#[pymethods]
impl HeldHeads {
    fn __call__(&self, py: Python<'_>) {
        for id in HELD_HEADS.with_borrow_mut(std::mem::take) {
            if let Some(Conn::Http(conn)) = event_loop::lookup(py, id) {
                conn.borrow_mut(py).send_held_head();
            }
        }
    }
}

impl HttpConn {
    /// Sends the response head on its own if it is still held.
    fn send_held_head(&mut self) {
        let Phase::Body { head: held, .. } = &mut self.phase else {
            return;
        };
        if held.is_none() || !self.link.send_waiters.is_empty() {
            return;
        }
        let mut events = VecDeque::from([AppEvent::Head(held.take().expect("checked"))]);
        // When the host has gone, the app's next `send()` says so; when the mailbox is full,
        // the head stays held for its first body message.
        let _ = self.link.deliver(&mut events);
        if let Some(AppEvent::Head(head)) = events.pop_front() {
            *held = Some(head);
        }
    }

    fn ended(&mut self, py: Python<'_>, err: Option<PyErr>) {
        let finished = matches!(self.phase, Phase::Done);
        let gone = self.link.responder.as_ref().is_none_or(|r| r.host_gone());
        // Only what the app was told excuses what it raised afterwards: an app that fails on
        // its own while its client happens to be gone keeps its traceback.
        let cut_short = match (finished, self.link.told_gone, self.body_refused) {
            (true, _, _) => None,
            (false, true, _) => Some("the client went away or timed out"),
            (false, false, true) => Some("its request body was refused"),
            (false, false, false) => None,
        };
        let failure = match self.link.task_failure(py, err, cut_short) {
            Some(why) => Some(AppEvent::Failed(DispatchError::AppRaised(why))),
            // Told the client left, the app stopped (Starlette cancels a streaming response
            // when `receive()` says `http.disconnect`): nothing is wrong with it.
            None if gone => None,
            None => match self.phase {
                Phase::Done => None,
                Phase::Start | Phase::Body { head: Some(_), .. } => {
                    let why = "the ASGI app returned without starting a response";
                    // Told `http.disconnect` as its body was refused (cut short, too slow,
                    // too large), the app may just return, as uvicorn expects: the host
                    // answers with the body's error (400, 408, 413).
                    if !(self.link.told_gone || self.body_refused) {
                        log::error!("app `{}`: {}: {why}", self.link.ctx.name, self.link.what);
                    }
                    Some(AppEvent::Failed(DispatchError::BadResponse(why.into())))
                }
                _ => {
                    let why = "the ASGI app returned without completing its response";
                    log::error!("app `{}`: {}: {why}", self.link.ctx.name, self.link.what);
                    Some(AppEvent::Failed(DispatchError::BadResponse(why.into())))
                }
            },
        };
        self.phase = Phase::Done;
        self.link.finish(py, failure);
    }
}

/// Where a WebSocket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WsPhase {
    /// Waiting for the app to accept, close or deny.
    Handshake,
    /// Sending a denial response (`websocket.http.response`).
    Denying,
    Open,
    /// Closed by the app or the client.
    Closed,
}

/// One WebSocket's connection object.
#[pyclass(module = "portico", name = "WebSocketConnection")]
pub(crate) struct WsConn {
    link: Link,
    phase: WsPhase,
    connect_sent: bool,
    /// The client's close, once received: every later `receive()` repeats it.
    close: Option<(u16, String)>,
}

fn ws_disconnect<'py>(py: Python<'py>, code: u16, reason: &str) -> PyResult<Bound<'py, PyAny>> {
    let m = PyDict::new(py);
    m.set_item(intern!(py, "type"), intern!(py, "websocket.disconnect"))?;
    m.set_item(intern!(py, "code"), code)?;
    m.set_item(intern!(py, "reason"), reason)?;
    Ok(m.into_any())
}

impl WsConn {
    fn poll_receive<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        if !self.connect_sent {
            self.connect_sent = true;
            let m = PyDict::new(py);
            m.set_item(intern!(py, "type"), intern!(py, "websocket.connect"))?;
            return Ok(Some(m.into_any()));
        }
        if let Some((code, reason)) = &self.close {
            return ws_disconnect(py, *code, reason).map(Some);
        }
        let Some(responder) = self.link.responder.as_ref() else {
            return ws_disconnect(py, 1006, "").map(Some);
        };
        match responder.try_recv_inbound_or_arm(&self.link.waker) {
            None => Ok(None),
            Some(Inbound::Message(message)) => {
                let m = PyDict::new(py);
                m.set_item(intern!(py, "type"), intern!(py, "websocket.receive"))?;
                match message {
                    WsMessage::Text(text) => m.set_item(intern!(py, "text"), text)?,
                    WsMessage::Binary(data) => {
                        m.set_item(intern!(py, "bytes"), PyBytes::new(py, &data))?
                    }
                }
                Ok(Some(m.into_any()))
            }
            Some(Inbound::Closed { code, reason }) => {
                self.phase = WsPhase::Closed;
                let message = ws_disconnect(py, code, &reason)?;
                self.close = Some((code, reason));
                Ok(Some(message))
            }
        }
    }

    fn on_wake(&mut self, py: Python<'_>) -> PyResult<()> {
        // A waiter cancelled meanwhile is dropped unanswered: what arrived stays queued.
        if let Some(fut) = self.link.live_waiter(py)? {
            match self.poll_receive(py)? {
                Some(message) => resolve(py, &fut, message)?,
                None => self.link.recv_waiter = Some(fut),
            }
        }
        self.link.flush(py)
    }

    fn events_for(
        &mut self,
        py: Python<'_>,
        message: &Bound<'_, PyAny>,
    ) -> PyResult<VecDeque<AppEvent>> {
        let kind = message_type(message)?;
        let mut events = VecDeque::with_capacity(1);
        match (kind.to_str()?, self.phase) {
            ("websocket.accept", WsPhase::Handshake) => {
                let subprotocol = get(message, intern!(py, "subprotocol"))?
                    .map(|s| s.extract::<String>())
                    .transpose()?;
                let headers = asgi_headers(get(message, intern!(py, "headers"))?)?;
                for (name, value) in &headers {
                    crate::model::check_header(name, value).map_err(PyValueError::new_err)?;
                }
                events.push_back(AppEvent::WsAccept {
                    subprotocol,
                    headers,
                });
                self.phase = WsPhase::Open;
            }
            ("websocket.send", WsPhase::Open) => {
                let text = get(message, intern!(py, "text"))?;
                let data = get(message, intern!(py, "bytes"))?;
                let message = match (text, data) {
                    (Some(text), None) => WsMessage::Text(
                        text.cast::<PyString>()
                            .map_err(|_| PyTypeError::new_err("\"text\" must be a str"))?
                            .to_str()?
                            .to_owned(),
                    ),
                    (None, Some(data)) => WsMessage::Binary(Bytes::copy_from_slice(
                        data.cast::<PyBytes>()
                            .map_err(|_| PyTypeError::new_err("\"bytes\" must be bytes"))?
                            .as_bytes(),
                    )),
                    _ => {
                        return Err(PyValueError::new_err(
                            "websocket.send needs exactly one of \"text\" and \"bytes\"",
                        ))
                    }
                };
                events.push_back(AppEvent::WsSend(message));
            }
            ("websocket.close", WsPhase::Handshake | WsPhase::Open) => {
                let code: u16 = get(message, intern!(py, "code"))?
                    .map(|c| c.extract())
                    .transpose()?
                    .unwrap_or(1000);
                let reason: String = get(message, intern!(py, "reason"))?
                    .map(|r| r.extract())
                    .transpose()?
                    .unwrap_or_default();
                // A later receive() reports this close, as the connection's end.
                self.close = Some((code, reason.clone()));
                events.push_back(AppEvent::WsClose { code, reason });
                self.phase = WsPhase::Closed;
            }
            // Closing a connection that is already closed changes nothing.
            ("websocket.close", WsPhase::Closed) => {}
            ("websocket.send", WsPhase::Closed) => return Err(disconnected()),
            ("websocket.http.response.start", WsPhase::Handshake) => {
                let headers = asgi_headers(get(message, intern!(py, "headers"))?)?;
                let head = checked_head(get(message, intern!(py, "status"))?, headers)?;
                events.push_back(AppEvent::Head(head));
                self.phase = WsPhase::Denying;
            }
            ("websocket.http.response.body", WsPhase::Denying) => {
                let body = get_bytes(message, intern!(py, "body"))?;
                if !body.is_empty() {
                    events.push_back(AppEvent::Body(body));
                }
                if !get_bool(message, intern!(py, "more_body"))? {
                    events.push_back(AppEvent::End);
                    self.phase = WsPhase::Closed;
                }
            }
            (kind, phase) => {
                return Err(PyRuntimeError::new_err(format!(
                    "unexpected ASGI message {kind:?} in WebSocket state {phase:?}"
                )))
            }
        }
        Ok(events)
    }
}

#[pymethods]
impl WsConn {
    /// ASGI `receive()`: `websocket.connect`, then messages, then `websocket.disconnect`.
    fn receive<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.link.check_no_waiter(py)?;
        let message = self.poll_receive(py)?;
        self.link.receive_result(py, message)
    }

    /// ASGI `send(message)`: accept, messages, close, or a denial response.
    fn send<'py>(
        &mut self,
        py: Python<'py>,
        message: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if self.close.is_some() || self.link.responder.as_ref().is_none_or(|r| r.host_gone()) {
            // A close after the client's close is harmless; anything else is too late.
            if message_type(&message)?.to_str()? == "websocket.close" {
                return Ok(self.link.ctx.done.bind(py).clone());
            }
            return Err(disconnected());
        }
        let events = self.events_for(py, &message)?;
        self.link.send_events(py, events)
    }
}

impl WsConn {
    fn ended(&mut self, py: Python<'_>, err: Option<PyErr>) {
        let failure = match self.link.task_failure(py, err, None) {
            Some(why) => Some(AppEvent::Failed(DispatchError::AppRaised(why))),
            None => match self.phase {
                WsPhase::Handshake | WsPhase::Denying => {
                    let why = "the ASGI app returned without accepting or closing the WebSocket";
                    log::error!("app `{}`: {}: {why}", self.link.ctx.name, self.link.what);
                    Some(AppEvent::Failed(DispatchError::BadResponse(why.into())))
                }
                // The host closes an open socket normally when our half goes.
                WsPhase::Open | WsPhase::Closed => Some(AppEvent::End),
            },
        };
        self.link.finish(py, failure);
    }
}

thread_local! {
    /// The loop thread's lifespan connection, while it runs.
    pub(crate) static LIFESPAN_ID: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// The lifespan connection object (ASGI lifespan spec 2.0).
#[pyclass(module = "portico", name = "LifespanConnection")]
pub(crate) struct LifespanConn {
    id: u64,
    ctx: Arc<AsgiContext>,
    task: Option<Py<PyAny>>,
    startup_sent: bool,
    startup_reply: Option<mpsc::Sender<LifespanOutcome>>,
    shutdown_reply: Option<mpsc::Sender<()>>,
    shutdown_sent: bool,
    recv_waiter: Option<Py<PyAny>>,
}

/// On the loop thread: runs the app's lifespan scope; `reply` hears how startup went.
pub(crate) fn start_lifespan(
    py: Python<'_>,
    ctx: &Arc<AsgiContext>,
    shared: &Arc<LoopShared>,
    reply: mpsc::Sender<LifespanOutcome>,
) -> PyResult<()> {
    let scope = PyDict::new(py);
    scope.set_item("type", "lifespan")?;
    let asgi = PyDict::new(py);
    asgi.set_item("version", "3.0")?;
    asgi.set_item("spec_version", "2.0")?;
    scope.set_item("asgi", asgi)?;
    scope.set_item("state", ctx.state.bind(py))?;
    let conn = event_loop::register(py, shared, |id, _waker| {
        Ok(Conn::Lifespan(Py::new(
            py,
            LifespanConn {
                id,
                ctx: ctx.clone(),
                task: None,
                startup_sent: false,
                startup_reply: Some(reply),
                shutdown_reply: None,
                shutdown_sent: false,
                recv_waiter: None,
            },
        )?))
    })?;
    if let Conn::Lifespan(c) = &conn {
        LIFESPAN_ID.set(Some(c.borrow(py).id));
    }
    conn.run_app(py, ctx, scope)
}

impl LifespanConn {
    fn poll_receive<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let kind = if !self.startup_sent {
            self.startup_sent = true;
            "lifespan.startup"
        } else if self.shutdown_reply.is_some() && !self.shutdown_sent {
            self.shutdown_sent = true;
            "lifespan.shutdown"
        } else {
            return Ok(None);
        };
        let m = PyDict::new(py);
        m.set_item("type", kind)?;
        Ok(Some(m.into_any()))
    }

    fn request_shutdown(&mut self, py: Python<'_>, reply: mpsc::Sender<()>) -> PyResult<()> {
        self.shutdown_reply = Some(reply);
        if let Some(fut) = self.recv_waiter.take() {
            if is_done(py, &fut)? {
                return Ok(());
            }
            match self.poll_receive(py)? {
                Some(message) => resolve(py, &fut, message)?,
                None => self.recv_waiter = Some(fut),
            }
        }
        Ok(())
    }

    fn end(&mut self) {
        self.task = None;
        if let Some(reply) = self.shutdown_reply.take() {
            let _ = reply.send(());
        }
        LIFESPAN_ID.set(None);
        event_loop::unregister(self.id);
    }
}

#[pymethods]
impl LifespanConn {
    fn receive<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match self.poll_receive(py)? {
            Some(message) => self.ctx.ready(py, message),
            None => {
                let fut = self.ctx.pending(py)?;
                self.recv_waiter = Some(fut.clone().unbind());
                Ok(fut)
            }
        }
    }

    fn send<'py>(
        &mut self,
        py: Python<'py>,
        message: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kind = message_type(&message)?;
        let text = |key: &str| -> PyResult<String> {
            Ok(message
                .cast::<PyDict>()?
                .get_item(key)?
                .map(|m| m.str().map(|s| s.to_string()))
                .transpose()?
                .unwrap_or_default())
        };
        match kind.to_str()? {
            "lifespan.startup.complete" => {
                if let Some(reply) = self.startup_reply.take() {
                    let _ = reply.send(LifespanOutcome::Started);
                }
            }
            "lifespan.startup.failed" => {
                if let Some(reply) = self.startup_reply.take() {
                    let _ = reply.send(LifespanOutcome::Failed(text("message")?));
                }
            }
            "lifespan.shutdown.complete" => {
                if let Some(reply) = self.shutdown_reply.take() {
                    let _ = reply.send(());
                }
            }
            "lifespan.shutdown.failed" => {
                log::error!(
                    "app `{}`: lifespan shutdown failed: {}",
                    self.ctx.name,
                    text("message")?
                );
                if let Some(reply) = self.shutdown_reply.take() {
                    let _ = reply.send(());
                }
            }
            other => {
                return Err(PyRuntimeError::new_err(format!(
                    "unexpected ASGI message {other:?} in the lifespan scope"
                )))
            }
        }
        Ok(self.ctx.done.bind(py).clone())
    }
}

impl LifespanConn {
    fn report_end(&mut self, py: Python<'_>, err: Option<PyErr>) {
        if let Some(reply) = self.startup_reply.take() {
            let outcome = match (err, self.ctx.lifespan) {
                (Some(err), LifespanMode::On) => {
                    LifespanOutcome::Failed(format_exception(py, &err))
                }
                (Some(err), _) => {
                    log::info!(
                        "app `{}`: the ASGI lifespan protocol appears unsupported ({}); serving without it",
                        self.ctx.name,
                        err
                    );
                    LifespanOutcome::Unsupported
                }
                (None, LifespanMode::On) => LifespanOutcome::Failed(
                    "the app returned from the lifespan scope before startup completed".into(),
                ),
                (None, _) => LifespanOutcome::Unsupported,
            };
            let _ = reply.send(outcome);
        } else if let Some(err) = err {
            log::error!(
                "app `{}`: the lifespan task failed:\n{}",
                self.ctx.name,
                format_exception(py, &err)
            );
        }
        self.end();
    }
}
