//! The event-loop thread of an ASGI app, and how host threads hand it work.
//!
//! Each ASGI app gets one OS thread running an asyncio (or uvloop) loop. Host threads never
//! take the GIL: they push [`Work`] onto a mutex-guarded list and, when the loop has not been
//! signalled since it last drained the list, write to an eventfd the loop watches with
//! `loop.add_reader`. (Measured by the team: 3-4x faster than
//! `asyncio.run_coroutine_threadsafe`.) The loop drains everything in one callback.
//!
//! What the loop thread owns (the per-request connection objects) lives in a thread-local
//! registry keyed by a request id; host-side wakers carry only that id.

use super::asgi::{self, AsgiContext, Conn, LifespanOutcome};
use super::threads::Job;
use crate::exchange::AppWaker;
use pyo3::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// Something for the loop thread to do.
// Requests are the common case: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Work {
    /// A new request (HTTP or WebSocket).
    Request(Job),
    /// Something changed in request `id`'s exchange that it armed a waker for.
    Wake(u64),
    /// Run the lifespan startup (ASGI lifespan 2.0) and report how it went.
    LifespanStartup(mpsc::Sender<LifespanOutcome>),
    /// Send `lifespan.shutdown` and report when the app has answered.
    LifespanShutdown(mpsc::Sender<()>),
    /// Cancel the task of every request still running (the server stops, and their time is
    /// up): each gets `CancelledError` at its next `await`, and its `finally` runs.
    CancelRunning,
    /// Nothing to do: that the loop got to it shows it is not stuck (see
    /// [`LoopShared::unanswered_ping`]).
    Ping,
}

/// What host threads and the loop thread share.
pub(crate) struct LoopShared {
    work: Mutex<Vec<Work>>,
    eventfd: OwnedFd,
    /// Set when the eventfd has been written and the loop has not drained the list since:
    /// later pushes need no system call.
    signalled: AtomicBool,
    /// Requests submitted and not finished, for the `queue_size` limit.
    pub(crate) in_flight: AtomicUsize,
    /// When the [`Work::Ping`] the loop has not got to yet was sent (a `clock::stamp`); 0
    /// when none is waiting.
    ping_sent: AtomicU64,
}

impl LoopShared {
    pub(crate) fn new() -> std::io::Result<Arc<LoopShared>> {
        // SAFETY: eventfd has no memory preconditions; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(LoopShared {
            work: Mutex::new(Vec::new()),
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            signalled: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            ping_sent: AtomicU64::new(0),
        }))
    }

    /// How long the loop has left a ping unanswered: it cannot be running anything else
    /// (a coroutine that blocks it, a C call), since a ping is answered at its next turn.
    /// Sends one when none is waiting; so called now and then, it tells a stuck loop from
    /// one whose tasks only wait (a long poll, a quiet WebSocket), which is not stuck.
    pub(crate) fn unanswered_ping(&self) -> Option<std::time::Duration> {
        match self.ping_sent.load(Ordering::Acquire) {
            0 => {
                self.ping_sent
                    .store(crate::clock::stamp(), Ordering::Release);
                self.push(Work::Ping);
                None
            }
            sent => Some(crate::clock::since(sent)),
        }
    }

    /// Hands `work` to the loop thread; never blocks beyond a short lock.
    pub(crate) fn push(&self, work: Work) {
        self.work
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(work);
        if !self.signalled.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd this struct owns. A full
            // counter (never reached: it is drained on every wakeup) would only fail the write.
            unsafe {
                libc::write(
                    self.eventfd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                );
            }
        }
    }

    /// On the loop thread: clears the signal and takes everything queued so far. A push that
    /// lands after the flag is cleared writes the eventfd again, so nothing is missed.
    fn take(&self) -> Vec<Work> {
        let mut counter: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our non-blocking eventfd.
        unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                (&mut counter as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
        self.signalled.store(false, Ordering::Release);
        std::mem::take(&mut *self.work.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Wakes one request's connection object on the loop thread.
pub(crate) struct ConnWaker {
    shared: Arc<LoopShared>,
    id: u64,
}

impl AppWaker for ConnWaker {
    fn wake(&self) {
        self.shared.push(Work::Wake(self.id));
    }
}

thread_local! {
    /// The loop thread's live connections, by request id.
    static CONNS: RefCell<HashMap<u64, Conn>> = RefCell::new(HashMap::new());
    static NEXT_ID: std::cell::Cell<u64> = const { std::cell::Cell::new(1) };
}

/// Registers a connection object under a fresh id and returns the waker for it.
pub(crate) fn register(
    py: Python<'_>,
    shared: &Arc<LoopShared>,
    make: impl FnOnce(u64, Arc<dyn AppWaker>) -> PyResult<Conn>,
) -> PyResult<Conn> {
    let id = NEXT_ID.get();
    NEXT_ID.set(id + 1);
    let waker: Arc<dyn AppWaker> = Arc::new(ConnWaker {
        shared: shared.clone(),
        id,
    });
    let conn = make(id, waker)?;
    CONNS.with_borrow_mut(|m| m.insert(id, conn.clone_ref(py)));
    Ok(conn)
}

/// Forgets a finished connection.
pub(crate) fn unregister(id: u64) -> Option<Conn> {
    CONNS.with_borrow_mut(|m| m.remove(&id))
}

pub(crate) fn lookup(py: Python<'_>, id: u64) -> Option<Conn> {
    CONNS.with_borrow(|m| m.get(&id).map(|c| c.clone_ref(py)))
}

/// The callback the loop runs when the eventfd is readable.
#[pyclass(module = "portico", name = "LoopDriver")]
pub(crate) struct Driver {
    shared: Arc<LoopShared>,
    ctx: Arc<AsgiContext>,
}

#[pymethods]
impl Driver {
    fn __call__(&self, py: Python<'_>) {
        for work in self.shared.take() {
            let result = match work {
                Work::Request(job) => asgi::start_request(py, &self.ctx, &self.shared, job),
                Work::Wake(id) => match lookup(py, id) {
                    Some(conn) => conn.wake(py),
                    None => Ok(()),
                },
                Work::Ping => {
                    self.shared.ping_sent.store(0, Ordering::Release);
                    Ok(())
                }
                Work::CancelRunning => {
                    let running: Vec<Conn> =
                        CONNS.with_borrow(|m| m.values().map(|c| c.clone_ref(py)).collect());
                    // Each on its own: one that cannot be cancelled leaves the others to be.
                    for conn in running {
                        if let Err(e) = conn.cancel(py) {
                            log::warn!(
                                "app `{}`: a request could not be cancelled:\n{}",
                                self.ctx.name,
                                super::format_exception(py, &e)
                            );
                        }
                    }
                    Ok(())
                }
                Work::LifespanStartup(reply) => {
                    asgi::start_lifespan(py, &self.ctx, &self.shared, reply)
                }
                Work::LifespanShutdown(reply) => {
                    match asgi::LIFESPAN_ID
                        .with(|id| id.get())
                        .and_then(|id| lookup(py, id))
                    {
                        Some(conn) => conn.request_shutdown(py, reply),
                        None => {
                            let _ = reply.send(());
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                log::error!(
                    "app `{}`: event loop callback failed:\n{}",
                    self.ctx.name,
                    super::format_exception(py, &e)
                );
            }
        }
    }
}

/// Starts the loop thread for an app: the loop object was created (and checked) by the
/// caller; this thread registers the eventfd reader and runs the loop forever.
pub(crate) fn spawn(
    ctx: Arc<AsgiContext>,
    shared: Arc<LoopShared>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("py-{}-loop", ctx.name))
        .spawn(move || {
            super::threads::block_signals();
            batch_scheduling();
            Python::attach(|py| {
                let run = || -> PyResult<()> {
                    let event_loop = ctx.event_loop.bind(py);
                    py.import("asyncio")?
                        .call_method1("set_event_loop", (event_loop,))?;
                    let driver = Py::new(
                        py,
                        Driver {
                            shared: shared.clone(),
                            ctx: ctx.clone(),
                        },
                    )?;
                    event_loop.call_method1("add_reader", (shared.eventfd.as_raw_fd(), driver))?;
                    event_loop.call_method0("run_forever")?;
                    Ok(())
                };
                if let Err(e) = run() {
                    log::error!(
                        "app `{}`: the event loop stopped:\n{}",
                        ctx.name,
                        super::format_exception(py, &e)
                    );
                }
            })
        })
}

/// Puts the calling thread in the SCHED_BATCH class: when a host thread wakes it, it does not
/// preempt that thread at once, so the host goes on reading requests and the loop then takes
/// them in one batch instead of one context switch each (measured on an ASGI hello with both
/// on one core: 40k to 66k requests/s).
fn batch_scheduling() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param; pid 0 means the calling thread, and SCHED_BATCH
    // with priority 0 needs no privilege. A failure only leaves the default policy.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc != 0 {
        log::debug!(
            "SCHED_BATCH not available for the event loop thread: {}",
            std::io::Error::last_os_error()
        );
    }
}
