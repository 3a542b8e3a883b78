//! The Python threads of one app: a bounded job queue and `threads` OS threads draining it.
//! Admission counts requests until their response ends, not until their thread is free
//! again, so `threads + queue_size` unanswered requests are always taken.

use crate::clock;
use crate::error::DispatchError;
use crate::exchange::{AdmissionTicket, AppEvent, Responder};
use crate::model::RequestHead;
use crate::router::Route;
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use pyo3::prelude::*;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What kind of connection a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobKind {
    /// An HTTP request.
    Http,
    /// A WebSocket handshake request (ASGI apps only): the app accepts or denies it.
    WebSocket,
}

/// One request, handed from a host thread to a Python thread.
pub(crate) struct Job {
    pub(crate) kind: JobKind,
    pub(crate) head: RequestHead,
    pub(crate) route: Route,
    pub(crate) responder: Responder,
    /// The whole request body, when the host read it before submitting.
    pub(crate) body: Option<Vec<Bytes>>,
    /// When it was queued for a thread, if the app has a `queue_timeout` (set by
    /// [`ThreadPool::submit`]).
    pub(crate) queued: Option<Instant>,
}

/// What runs a job on a Python thread.
pub(crate) trait Runner: Send + Sync + 'static {
    fn run(&self, py: Python<'_>, job: Job);
}

/// The queue in front of an app's threads.
pub(crate) struct ThreadPool {
    jobs: Sender<Job>,
    /// Requests taken and not yet answered: queued, or on a thread before their response
    /// ends (see [`AdmissionTicket`]).
    admitted: Arc<AtomicUsize>,
    /// How many may be: the threads, and `queue_size` more waiting for one.
    limit: usize,
    /// Per thread, since when it runs the app on a request whose response has not started
    /// (a [`clock::stamp`]); 0 while it waits for a job or sends a response.
    busy_since: Arc<Vec<AtomicU64>>,
    /// The app's `queue_timeout`, if it has one.
    queue_timeout: Option<Duration>,
}

thread_local! {
    /// This Python thread's slot in its pool's `busy_since`.
    static BUSY_SLOT: std::cell::RefCell<Option<(Arc<Vec<AtomicU64>>, usize)>> =
        const { std::cell::RefCell::new(None) };
}

/// On a Python thread: its request's response has started, so `request_timeout`, which
/// ends there, no longer runs for it.
pub(crate) fn response_started() {
    BUSY_SLOT.with_borrow(|slot| {
        if let Some((busy_since, index)) = slot {
            busy_since[*index].store(0, Ordering::Relaxed);
        }
    });
}

impl ThreadPool {
    /// Starts the app's `threads` Python threads, named after it, behind a queue of
    /// `queue_size`.
    pub(crate) fn start(
        config: &portico_config::AppConfig,
        runner: Arc<dyn Runner>,
    ) -> std::io::Result<ThreadPool> {
        let (name, threads) = (config.name.as_str(), config.threads);
        let limit = threads + config.queue_size;
        let queue_timeout = config.queue_timeout.as_limit();
        // Every queued job holds a ticket, so the channel never holds more than `limit`.
        let (jobs, queue) = crossbeam_channel::bounded(limit);
        let busy_since: Arc<Vec<AtomicU64>> =
            Arc::new((0..threads).map(|_| AtomicU64::new(0)).collect());
        for i in 0..threads {
            let queue = queue.clone();
            let runner = runner.clone();
            let busy_since = busy_since.clone();
            let app = name.to_owned();
            std::thread::Builder::new()
                .name(format!("py-{name}-{i}"))
                .spawn(move || {
                    BUSY_SLOT.set(Some((busy_since.clone(), i)));
                    thread_main(queue, runner, &busy_since[i], &app, queue_timeout)
                })?;
        }
        Ok(ThreadPool {
            jobs,
            admitted: Arc::new(AtomicUsize::new(0)),
            limit,
            busy_since,
            queue_timeout,
        })
    }

    /// A place for one more request; `None` when the threads are all taken and
    /// `queue_size` requests wait already. The request's exchange holds it (see
    /// [`crate::exchange::channel_holding`]).
    pub(crate) fn admit(&self) -> Option<AdmissionTicket> {
        AdmissionTicket::take(&self.admitted, self.limit)
    }

    /// How long the thread that has run the app longest on a request without starting its
    /// response has done so; `None` when none does. The client may have left long ago: the
    /// thread is busy all the same.
    pub(crate) fn longest_run(&self) -> Option<Duration> {
        self.busy_since
            .iter()
            .map(|since| since.load(Ordering::Relaxed))
            .filter(|since| *since != 0)
            .min()
            .map(clock::since)
    }

    /// Queues a job admitted by [`ThreadPool::admit`]; `false` when the threads are gone.
    pub(crate) fn submit(&self, mut job: Job) -> bool {
        if self.queue_timeout.is_some() {
            job.queued = Some(Instant::now());
        }
        match self.jobs.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

fn thread_main(
    queue: Receiver<Job>,
    runner: Arc<dyn Runner>,
    busy_since: &AtomicU64,
    app: &str,
    queue_timeout: Option<Duration>,
) {
    block_signals();
    Python::attach(|py| loop {
        // Stay attached while work is queued; release the GIL only to wait.
        let job = match queue.try_recv() {
            Ok(job) => job,
            // crossbeam's recv spins and yields briefly before it sleeps, which lets the HTTP
            // thread on the same core queue the next job first (measured: a condvar queue that
            // sleeps at once was 17% slower on a WSGI hello).
            Err(TryRecvError::Empty) => match py.detach(|| queue.recv()) {
                Ok(job) => job,
                Err(_) => return,
            },
            Err(TryRecvError::Disconnected) => return,
        };
        if job.responder.host_gone() {
            // Timed out or abandoned while queued: the app never sees it.
            continue;
        }
        let past = job
            .queued
            .and_then(|at| clock::waited_past(at, queue_timeout));
        if let Some((waited, limit)) = past {
            // As mod_wsgi's daemon does with a request past its queue-timeout: answered
            // here, so the threads catch up with the clients still waiting.
            let error = DispatchError::queue_timeout(app, waited, limit);
            let _ = job.responder.try_send(AppEvent::Failed(error));
            continue;
        }
        // A bug of ours must cost one request, not the thread: the job's responder drops
        // while unwinding, so the host answers 500 and this thread takes the next job.
        busy_since.store(clock::stamp(), Ordering::Relaxed);
        let run = std::panic::AssertUnwindSafe(|| runner.run(py, job));
        if std::panic::catch_unwind(run).is_err() {
            log::error!("a Python thread recovered from a panic while serving a request");
        }
        busy_since.store(0, Ordering::Relaxed);
    });
}

/// Signals belong to the host's own thread (nginx's master/worker signals, Pingora's
/// shutdown): Python threads must never be the one the kernel picks to deliver them.
pub(crate) fn block_signals() {
    // SAFETY: `set` is a plain C struct that sigfillset fully initialises before use, and
    // pthread_sigmask only changes the calling thread's own mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
