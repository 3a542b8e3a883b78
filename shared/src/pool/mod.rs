//! Pooled apps (`mode = "pool"`, mod_wsgi's daemon mode): the app runs in worker processes
//! that the host process starts and supervises, each loading the app through the same core
//! ([`crate::Dispatcher`]) as in-process hosting. The pool is a transport around that path:
//! the host's request becomes frames on a Unix socket ([`wire`]), the worker submits it to
//! its app and sends the exchange's events back ([`worker`]), and the host turns them into
//! the same exchange events again ([`host`]).
//!
//! Supervision: a generation of workers is `processes` slots, each a thread that starts
//! `portico-worker`, waits for its hello, hands its socket to the pool and watches it:
//! - a worker that exits costs the requests it had in flight (502); the slot starts another
//!   at once, or after a pause (0.5 s doubling to 30 s) when workers die young or never get
//!   ready, as an app that cannot import does: one clear error per attempt, no spawn storm;
//! - a worker to be replaced (`max_requests`, `max_memory`, `max_lifetime`, a request stuck
//!   past `request_timeout`) is replaced first, then drained: it takes no new requests, finishes
//!   those it has (up to `graceful_timeout`), and is stopped;
//! - a reload starts a new generation; once it has loaded the app it takes every new request
//!   and the old generation drains the same way. If the new code cannot be loaded, the old
//!   generation goes on serving.

pub mod host;
pub mod remote;
pub mod server;
mod touch;
pub mod wire;
pub mod worker;

use crate::error::{DispatchError, LoadError};
use crate::model::RequestHead;
use crate::router::Route;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use host::WorkerConn;
use portico_config::AppConfig;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};
use wire::{Frame, Kind, RequestKind};

/// The descriptor a worker finds its socket on.
pub const WORKER_FD: i32 = 3;

/// A worker that died within this time of getting ready without having been given a
/// request died young (of itself, not of a request or a kill): the next start waits, so a
/// crashing app cannot make the pool spin.
const YOUNG: Duration = Duration::from_secs(1);

/// How often a slot looks at its worker (exit, memory, replacement).
const WATCH: Duration = Duration::from_millis(20);

/// How long past its graceful_timeout a closed worker has to exit before SIGTERM, and after
/// SIGTERM before SIGKILL.
const EXIT_SLACK: Duration = Duration::from_secs(5);

/// How often a worker's memory is read.
const MEMORY_CHECK: Duration = Duration::from_secs(1);

/// The first time a worker past `max_memory` from its start serves before it is replaced
/// for it; doubled with each such worker in a slot, up to `MEMORY_GRACE_MAX`.
const MEMORY_GRACE: Duration = Duration::from_secs(10);
/// The longest time a worker past `max_memory` from its start serves before it is replaced.
const MEMORY_GRACE_MAX: Duration = Duration::from_secs(600);

/// How a host starts its pool workers.
#[derive(Debug, Clone)]
pub struct PoolHost {
    /// The `portico-worker` executable.
    pub worker_binary: PathBuf,
    /// The portico.toml the workers read their app from.
    pub config_file: PathBuf,
    /// The user and group (uid, gid) workers run as when their app sets no `user`/`group`:
    /// nginx's workers' user for the pool nginx starts (as mod_wsgi's daemon processes run
    /// as Apache's user); `None`: the server's own.
    pub default_identity: Option<(u32, u32)>,
    /// The text of `config_file` the host loaded its apps from: the first generation of each
    /// pool is given it.
    pub config_text: Arc<str>,
}

/// What a generation of workers runs with: the app's settings, and the text of the config
/// file they were read from, which each of its workers is given (wire [`Kind::Settings`]).
/// A worker the generation starts late (a restart, a recycle) runs the same settings as the
/// first, whatever the file says by then; a reload reads the file again.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// The app's `[[app]]` table.
    pub app: AppConfig,
    /// The whole file's text.
    pub file_text: Arc<str>,
}

/// A running pool for one app.
pub struct Pool {
    /// The app's name (which a reload keeps).
    name: String,
    host: PoolHost,
    /// The host's `SERVER_SOFTWARE`, given to the workers (`PORTICO_SERVER_SOFTWARE`).
    server_software: String,
    /// The generation that takes new requests.
    current: RwLock<Arc<Generation>>,
    /// Generations started so far.
    generations: AtomicU64,
    /// Where the search for the least busy worker starts, turning with each request so
    /// that idle workers share the work.
    turn: AtomicUsize,
    stopping: AtomicBool,
    /// Live and draining workers, for the status.
    workers: Mutex<Vec<WorkerRecord>>,
    /// Worker exits and replacements, newest last, for the status.
    events: Mutex<VecDeque<String>>,
    restarts: AtomicU64,
    /// Requests no worker could take when they came, oldest first: every WSGI thread was
    /// busy, or no worker was live (every one starting or restarting, as with
    /// `processes = 1` after a crash). The first thread to come free, or the first worker
    /// ready, takes them, as a daemon's listen queue holds them for mod_wsgi and gunicorn.
    /// If no worker can start they get 503 at once.
    parked: Mutex<VecDeque<Parked>>,
    /// How many wait in `parked`, for a look without its lock. (Sequentially consistent,
    /// as is a worker's `in_flight`: a request that parks while a thread comes free is
    /// seen either by the parker's look for a free thread or by the freed one's look here.)
    waiting: AtomicUsize,
    /// Workers fail to start (or die young) and the next try is a backoff away: requests
    /// that find no live worker get 503 at once rather than wait for it.
    failing: AtomicBool,
    /// One reload at a time (a signal's and a touched file's may meet): each starts from
    /// the generation the one before made current.
    reloading: Mutex<()>,
    /// A thread watches the `touch_reload` files ([`touch`]).
    touch_watched: AtomicBool,
}

/// A set of workers started together (at start, or by one reload).
struct Generation {
    number: u64,
    settings: PoolSettings,
    conns: RwLock<Vec<Arc<WorkerConn>>>,
    /// Replaced by a newer generation: its workers drain and are not restarted.
    retired: AtomicBool,
    /// Slots running: `processes`, plus those started on demand.
    slots: AtomicUsize,
    /// A slot is being added on demand (one at a time).
    growing: AtomicBool,
    /// A reload is starting the generation that will replace this one: it grows no more.
    superseded: AtomicBool,
}

impl Generation {
    fn new(number: u64, settings: PoolSettings) -> Generation {
        Generation {
            number,
            settings,
            conns: RwLock::new(Vec::new()),
            retired: AtomicBool::new(false),
            slots: AtomicUsize::new(0),
            growing: AtomicBool::new(false),
            superseded: AtomicBool::new(false),
        }
    }
}

/// A request in the pool's queue, and since when it waits there.
struct Parked {
    since: Instant,
    request: host::Moved,
}

impl Parked {
    fn new(request: host::Moved) -> Parked {
        Parked {
            since: Instant::now(),
            request,
        }
    }

    /// How long it has waited, with the limit, when that is past `limit` (the app's
    /// `queue_timeout`; `None`: no limit).
    fn past(&self, limit: Option<Duration>) -> Option<(Duration, Duration)> {
        crate::clock::waited_past(self.since, limit)
    }
}

struct WorkerRecord {
    conn: Arc<WorkerConn>,
    generation: u64,
    started: SystemTime,
}

impl Pool {
    /// Starts `processes` workers for `config` and waits until each has loaded the app (or
    /// failed once). If none could, the app cannot be loaded: the error is the workers'.
    /// `server_software` is what the apps see as `SERVER_SOFTWARE` (the host's).
    pub fn start(
        config: &AppConfig,
        host: &PoolHost,
        server_software: &str,
    ) -> Result<Arc<Pool>, LoadError> {
        let pool = Arc::new(Pool {
            name: config.name.clone(),
            host: host.clone(),
            server_software: server_software.into(),
            current: RwLock::new(Arc::new(Generation::new(
                1,
                PoolSettings {
                    app: config.clone(),
                    file_text: host.config_text.clone(),
                },
            ))),
            generations: AtomicU64::new(1),
            turn: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            workers: Mutex::new(Vec::new()),
            events: Mutex::new(VecDeque::new()),
            restarts: AtomicU64::new(0),
            parked: Mutex::new(VecDeque::new()),
            waiting: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            reloading: Mutex::new(()),
            touch_watched: AtomicBool::new(false),
        });
        let generation = pool.current();
        pool.start_generation(&generation).map_err(|message| {
            pool.stop(Duration::ZERO);
            LoadError {
                app: config.name.clone(),
                message,
            }
        })?;
        touch::watch(&pool);
        Ok(pool)
    }

    /// The text of the config file the current generation's settings were read from.
    pub fn settings_text(&self) -> Arc<str> {
        self.current().settings.file_text.clone()
    }

    fn current(&self) -> Arc<Generation> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts a generation's slots and waits for each slot's first worker; fails (with the
    /// first error) when none got ready.
    fn start_generation(self: &Arc<Self>, generation: &Arc<Generation>) -> Result<(), String> {
        let (first_tx, first_rx) = mpsc::channel();
        let processes = generation.settings.app.processes.max(1);
        for _ in 0..processes {
            self.add_slot(generation, first_tx.clone(), false)?;
        }
        drop(first_tx);
        let mut errors = Vec::new();
        for outcome in first_rx.iter().take(processes) {
            if let Err(e) = outcome {
                errors.push(e);
            }
        }
        if errors.len() == processes {
            generation.retired.store(true, Ordering::Release);
            return Err(errors.swap_remove(0));
        }
        Ok(())
    }

    /// Starts a slot thread; an `extra` one (on demand) ends when its worker has been idle
    /// for `idle_timeout` or exits.
    fn add_slot(
        self: &Arc<Self>,
        generation: &Arc<Generation>,
        first: mpsc::Sender<Result<(), String>>,
        extra: bool,
    ) -> Result<(), String> {
        let slot = generation.slots.fetch_add(1, Ordering::AcqRel);
        let pool = self.clone();
        let thread_generation = generation.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{}-pool-g{}-{slot}", self.name, generation.number))
            .spawn(move || {
                // A slot that panics before its first worker is ready must not leave the
                // generation unable to grow.
                struct ClearGrowing<'a>(&'a Generation, bool);
                impl Drop for ClearGrowing<'_> {
                    fn drop(&mut self) {
                        if self.1 && std::thread::panicking() {
                            self.0.growing.store(false, Ordering::SeqCst);
                        }
                    }
                }
                let _clear = ClearGrowing(&thread_generation, extra);
                pool.supervise(&thread_generation, first, extra);
                thread_generation.slots.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            generation.slots.fetch_sub(1, Ordering::AcqRel);
            return Err(format!("cannot start the pool's supervisor thread: {e}"));
        }
        Ok(())
    }

    /// Every worker is busy: one more, up to `max_processes`, if none is starting already
    /// (its slot clears `growing` once its worker is ready or has failed, and looks at the
    /// queue again then). A retired generation grows no more: the current one takes the
    /// requests.
    fn grow(self: &Arc<Self>, generation: &Arc<Generation>) {
        let app = &generation.settings.app;
        let max = app.max_processes.unwrap_or(app.processes);
        // `growing` is sequentially consistent, as `waiting` is: a slot that clears it and
        // then looks at the queue, and a request that joins the queue and then tries to grow,
        // cannot both miss the other.
        if generation.retired.load(Ordering::Acquire)
            || generation.superseded.load(Ordering::Acquire)
            || generation.slots.load(Ordering::Acquire) >= max
            || generation.growing.swap(true, Ordering::SeqCst)
        {
            return;
        }
        // No one waits for an extra slot's first worker: its slot reports to `growing`.
        let (ready_tx, _) = mpsc::channel();
        if self.add_slot(generation, ready_tx, true).is_err() {
            generation.growing.store(false, Ordering::SeqCst);
        }
    }

    /// Starts a new generation of workers with the app's code as it is now, and `settings`
    /// (`None`: those of the generation it replaces); once it is ready it takes every new
    /// request and the old one drains with its own settings. If the new code cannot be
    /// loaded, the old generation goes on and the error is returned.
    pub fn reload(self: &Arc<Self>, settings: Option<PoolSettings>) -> Result<(), String> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let number = self.generations.fetch_add(1, Ordering::AcqRel) + 1;
        let settings = settings.unwrap_or_else(|| self.current().settings.clone());
        let generation = Arc::new(Generation::new(number, settings));
        log::info!(
            "app `{}`: reloading: starting generation {number}",
            self.name
        );
        // Requests that come meanwhile do not grow what is about to be replaced.
        let replaced = self.current();
        replaced.superseded.store(true, Ordering::Release);
        if let Err(e) = self.start_generation(&generation) {
            replaced.superseded.store(false, Ordering::Release);
            log::error!(
                "app `{}`: generation {number} could not load the app; generation {} goes on serving: {e}",
                self.name,
                self.current().number
            );
            self.record_event(format!(
                "reload: generation {number} could not load the app; generation {} serves on",
                self.current().number
            ));
            return Err(e);
        }
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            generation,
        );
        old.retired.store(true, Ordering::Release);
        // Its workers looked at the queue while the old generation was still current.
        self.flush_parked();
        log::info!(
            "app `{}`: generation {number} serves; generation {} finishes its requests",
            self.name,
            old.number
        );
        touch::watch(self);
        Ok(())
    }

    /// Sends a request to the least busy live worker of the current generation that can
    /// take it now ([`takes_now`]); when none can, the request waits in the pool's queue
    /// (`parked`) for the first worker that can, as requests wait in the one listen queue
    /// that mod_wsgi's daemon processes (and gunicorn's workers) accept from. Handed to a
    /// busy worker at once, it would wait behind that worker's requests, a slow one
    /// included, while another worker might be idle.
    pub(crate) fn submit(
        self: &Arc<Self>,
        kind: RequestKind,
        head: RequestHead,
        route: Route,
        body: Option<Vec<Bytes>>,
    ) -> Result<crate::exchange::Exchange, DispatchError> {
        // A worker that starts draining between the pick and the submit refuses: pick again.
        for _ in 0..4 {
            let generation = self.current();
            let (least, taker) = pick_for(&generation, &self.turn);
            if least.is_some_and(|conn| {
                conn.in_flight.load(Ordering::Acquire) >= generation.settings.app.threads
            }) {
                // Even the least busy worker has every thread taken.
                self.grow(&generation);
            }
            // Those already waiting go first.
            let taker = taker.filter(|_| self.waiting.load(Ordering::SeqCst) == 0);
            let Some(conn) = taker else {
                // Every worker is busy, starting or restarting: the request waits for one.
                let (exchange, request) = host::Moved::new(kind, &head, &route, body.as_deref());
                return match self.park(request) {
                    Ok(()) => Ok(exchange),
                    Err(_) => Err(DispatchError::Overloaded),
                };
            };
            match conn.submit(kind, &head, &route, body.as_deref()) {
                Err(DispatchError::WorkerLost(_)) => continue,
                submitted => return submitted,
            }
        }
        Err(DispatchError::Overloaded)
    }

    /// The worker a request that never reached a lost one goes to: one that takes it now,
    /// as `submit` picks, while none waits in the queue; else it waits there too.
    fn taker(&self) -> Option<Arc<WorkerConn>> {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            return None;
        }
        pick_for(&self.current(), &self.turn).1
    }

    /// The least busy live worker, if any.
    fn pick(&self) -> Option<Arc<WorkerConn>> {
        pick_for(&self.current(), &self.turn).0
    }

    /// Keeps a request until a worker can take it (see `parked`); gives it back when the
    /// pool stops, or when the pool has as many requests unanswered as its workers take
    /// (`threads + queue_size` each).
    fn park(self: &Arc<Self>, request: host::Moved) -> Result<(), Box<host::Moved>> {
        let generation = self.current();
        let app = &generation.settings.app;
        let (live, running) = {
            let conns = generation.conns.read().unwrap_or_else(|e| e.into_inner());
            let live = conns.iter().filter(|conn| conn.is_alive());
            (
                live.clone().count(),
                live.map(|conn| conn.in_flight.load(Ordering::Acquire))
                    .sum::<usize>(),
            )
        };
        let room =
            (live.max(app.processes) * (app.threads + app.queue_size)).saturating_sub(running);
        let mut expired = Vec::new();
        {
            let mut parked = self.lock_parked();
            // Checked under the lock that `stop` and `fail_parked` take: none is left behind.
            // (`failing` may outlast a worker that got ready meanwhile: a live one says more.)
            if self.stopping.load(Ordering::Acquire)
                || (self.failing.load(Ordering::Acquire) && live == 0)
            {
                return Err(Box::new(request));
            }
            // Those whose client left (or timed out) take no room and go to no worker; those
            // past the app's queue_timeout, at the front (oldest first), get their 504 now.
            parked.retain(|waiting| !waiting.request.abandoned());
            let limit = app.queue_timeout.as_limit();
            while let Some(first) = parked.pop_front() {
                match first.past(limit) {
                    Some((waited, limit)) => expired.push((first.request, waited, limit)),
                    None => {
                        parked.push_front(first);
                        break;
                    }
                }
            }
            if parked.len() >= room {
                self.waiting.store(parked.len(), Ordering::SeqCst);
                drop(parked);
                self.expire(expired);
                return Err(Box::new(request));
            }
            parked.push_back(Parked::new(request));
            self.waiting.store(parked.len(), Ordering::SeqCst);
        }
        self.expire(expired);
        // A thread that came free between the caller's pick and the push has looked at the
        // queue already.
        self.flush_parked();
        Ok(())
    }

    /// Hands waiting requests, oldest first, to the least busy live workers for as long as
    /// one can take them ([`takes_now`]). Runs whenever a worker is ready and whenever a
    /// request ends.
    fn flush_parked(self: &Arc<Self>) {
        let mut refused = 0;
        while refused < host::REDIRECT_TRIES {
            let generation = self.current();
            let (least, taker) = pick_for(&generation, &self.turn);
            let Some(conn) = taker else {
                if least.is_some() && self.waiting.load(Ordering::SeqCst) > 0 {
                    // Requests wait while every worker is busy: one more, on demand (as in
                    // `submit`; one started on demand may have gone since). None waiting,
                    // none is needed (a new generation's worker looks here before its
                    // generation is current, while the old one's workers are still busy).
                    self.grow(&generation);
                }
                return;
            };
            let limit = generation.settings.app.queue_timeout.as_limit();
            let mut expired = Vec::new();
            let request = {
                let mut parked = self.lock_parked();
                let next = loop {
                    let Some(waiting) = parked.pop_front() else {
                        break None;
                    };
                    if waiting.request.abandoned() {
                        continue;
                    }
                    match waiting.past(limit) {
                        Some((waited, limit)) => expired.push((waiting.request, waited, limit)),
                        None => break Some(waiting),
                    }
                };
                self.waiting.store(parked.len(), Ordering::SeqCst);
                next
            };
            let Some(Parked { since, request }) = request else {
                self.expire(expired);
                return;
            };
            // Outside the lock: giving a request its stream may end another (its client
            // gone), which comes back here.
            if let Err(back) = conn.enqueue(request) {
                // Lost or draining since the pick, so not picked again: back to the front,
                // unless the pool stopped or gave up on its waiting requests meanwhile.
                let mut parked = self.lock_parked();
                if self.stopping.load(Ordering::Acquire) || self.failing.load(Ordering::Acquire) {
                    drop(parked);
                    back.fail(DispatchError::Overloaded);
                    self.expire(expired);
                    return;
                }
                parked.push_front(Parked {
                    since,
                    request: *back,
                });
                self.waiting.store(parked.len(), Ordering::SeqCst);
                refused += 1;
            }
            // Answered only now: answering may end a stream, whose worker then looks at the
            // queue again, and the request popped above must reach its worker first.
            self.expire(expired);
        }
    }

    /// Answers every waiting request 503, and the next ones until a worker starts: none
    /// will be ready before a backoff.
    fn fail_parked(&self) {
        let waiting = {
            let mut parked = self.lock_parked();
            self.failing.store(true, Ordering::Release);
            self.waiting.store(0, Ordering::SeqCst);
            std::mem::take(&mut *parked)
        };
        for waiting in waiting {
            waiting.request.fail(DispatchError::Overloaded);
        }
    }

    /// Answers requests that waited past the app's `queue_timeout` (504); outside the
    /// queue's lock, as answering may end a stream.
    fn expire(&self, expired: Vec<(host::Moved, Duration, Duration)>) {
        for (request, waited, limit) in expired {
            request.fail(DispatchError::queue_timeout(&self.name, waited, limit));
        }
    }

    fn lock_parked(&self) -> std::sync::MutexGuard<'_, VecDeque<Parked>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the pool: no more workers start, and each worker is closed once its requests
    /// are done (an ASGI app gets its lifespan shutdown). Waits for them up to `wait`, or
    /// as long as the app's own `graceful_timeout` lets them take if that is longer.
    pub fn stop(&self, wait: Duration) {
        if !self.stopping.swap(true, Ordering::AcqRel) {
            log::info!("app `{}`: stopping its pool workers", self.name);
        }
        self.fail_parked();
        // The workers' own graceful_timeout (for their requests, then their lifespan
        // shutdown) is theirs to use, whatever the caller's wait.
        // Its requests, then its app calls still running, then its lifespan shutdown, then
        // SIGTERM and SIGKILL (see `retire`).
        let wait = match self.current().settings.app.graceful_timeout.as_limit() {
            Some(grace) => wait.max(3 * grace + 2 * EXIT_SLACK),
            None => Duration::MAX,
        };
        let deadline = Instant::now().checked_add(wait);
        loop {
            let left = self.workers.lock().unwrap_or_else(|e| e.into_inner()).len();
            if left == 0 {
                return;
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                log::warn!(
                    "app `{}`: {left} pool worker(s) still stopping after {wait:?}; they end \
                     with the server",
                    self.name
                );
                return;
            }
            std::thread::sleep(WATCH);
        }
    }

    /// The pool as `portico status` shows it.
    pub fn status(&self) -> PoolStatus {
        let workers = self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|record| {
                let conn = &record.conn;
                WorkerStatus {
                    pid: conn.pid,
                    generation: record.generation,
                    // A worker closed on purpose is lost only in that its socket is shut
                    // while it finishes and exits: it is still draining.
                    state: if conn.is_alive() {
                        WorkerState::Serving
                    } else if conn.is_lost() && !conn.is_closed_on_purpose() {
                        WorkerState::Lost
                    } else {
                        WorkerState::Draining
                    },
                    served: conn.served.load(Ordering::Relaxed),
                    in_flight: conn.in_flight.load(Ordering::Relaxed),
                    rss_bytes: rss_bytes(conn.pid).unwrap_or(0),
                    started: record
                        .started
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                }
            })
            .collect();
        PoolStatus {
            app: self.name.clone(),
            generation: self.current().number,
            restarts: self.restarts.load(Ordering::Relaxed),
            server_pid: std::process::id(),
            queued: self.waiting.load(Ordering::SeqCst),
            workers,
            events: self
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect(),
        }
    }

    /// Keeps `event` for the status, after the time it happened.
    pub(crate) fn record_event(&self, event: String) {
        let event = format!("{} {event}", crate::clock::rfc3339_utc(SystemTime::now()));
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if events.len() == 20 {
            events.pop_front();
        }
        events.push_back(event);
    }

    /// One slot of a generation, for as long as the generation serves: start, watch,
    /// replace or restart.
    fn supervise(
        self: Arc<Self>,
        generation: &Arc<Generation>,
        first: mpsc::Sender<Result<(), String>>,
        extra: bool,
    ) {
        let name = self.name.clone();
        let settings = &generation.settings;
        let startup = settings.app.startup_timeout.as_limit();
        let mut first = Some(first);
        let mut pause = Duration::from_millis(500);
        // How long a worker already past max_memory when it got ready serves before it is
        // replaced for it: doubled each time one is, so that a limit below what the app needs
        // to start replaces workers now and then, not one after another.
        let mut memory_grace = Duration::ZERO;
        // A worker to replace: it serves on until its replacement is ready, then drains.
        let mut outgoing: Option<(Arc<WorkerConn>, Child, String)> = None;
        while !self.stopping.load(Ordering::Acquire) && !generation.retired.load(Ordering::Acquire)
        {
            let (mut child, conn) = match spawn(settings, &self, startup) {
                Ok(started) => started,
                Err(why) => {
                    log::error!("app `{name}`: a pool worker could not start: {why}");
                    self.record_event(format!("a worker could not start: {why}"));
                    if self.pick().is_none() {
                        // The next try is a backoff away: the waiting requests do not wait.
                        self.fail_parked();
                    }
                    // The worker to replace may have died meanwhile: it is lost, not
                    // serving on.
                    if let Some((old, mut old_child, _)) =
                        outgoing.take_if(|(_, child, _)| !matches!(child.try_wait(), Ok(None)))
                    {
                        let how = old_child
                            .try_wait()
                            .ok()
                            .flatten()
                            .map_or_else(|| "could not be waited for".into(), describe_exit);
                        old.lost("the worker exited");
                        self.forget(generation, &old);
                        self.restarts.fetch_add(1, Ordering::Relaxed);
                        let event = format!("worker {} {how}", old.pid);
                        log::warn!("app `{name}`: pool {event}");
                        self.record_event(event);
                    }
                    if let Some((old, _, _)) = &outgoing {
                        // Replacing a worker that serves is no reason to stop serving (a
                        // stuck one takes no requests).
                        if old.is_alive() {
                            log::warn!(
                                "app `{name}`: pool worker {} serves on until a replacement starts",
                                old.pid
                            );
                        }
                    }
                    if let Some(first) = first.take() {
                        let _ = first.send(Err(why));
                        if extra {
                            generation.growing.store(false, Ordering::SeqCst);
                        }
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            let pid = conn.pid;
            conn.on_demand.store(extra, Ordering::Relaxed);
            let ready_at = Instant::now();
            let pool = Arc::downgrade(&self);
            conn.set_redirect(Box::new(move || pool.upgrade()?.taker()));
            let pool = Arc::downgrade(&self);
            conn.set_park(Box::new(move |request| match pool.upgrade() {
                Some(pool) => pool.park(request),
                None => Err(Box::new(request)),
            }));
            let pool = Arc::downgrade(&self);
            conn.set_on_free(Box::new(move || {
                if let Some(pool) = pool.upgrade() {
                    if pool.waiting.load(Ordering::SeqCst) > 0 {
                        pool.flush_parked();
                    }
                }
            }));
            generation
                .conns
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn.clone());
            self.workers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(WorkerRecord {
                    conn: conn.clone(),
                    generation: generation.number,
                    started: SystemTime::now(),
                });
            log::info!(
                "app `{name}`: pool worker {pid} started (generation {})",
                generation.number
            );
            self.failing.store(false, Ordering::Release);
            if extra && first.is_some() {
                // Ready: the next may grow, and the look at the queue below starts it if
                // requests still wait with every thread busy (a burst grows the pool one
                // worker after another, not by one per request that comes later).
                generation.growing.store(false, Ordering::SeqCst);
            }
            self.flush_parked();
            // Only now, with its replacement taking requests, does a recycled worker drain:
            // no request finds the pool without a live worker meanwhile.
            if let Some((old, old_child, why)) = outgoing.take() {
                self.retire_in_background(generation, old, old_child, why);
            }
            if let Some(first) = first.take() {
                let _ = first.send(Ok(()));
            }
            let max_requests = max_requests_for(&settings.app, pid);
            let max_memory = settings.app.max_memory.0;
            let max_lifetime = max_lifetime_for(&settings.app, pid);
            let mut memory_checked = Instant::now();
            let rss_at_start = if max_memory > 0 { rss_bytes(pid) } else { None };
            match rss_at_start.filter(|rss| *rss > max_memory) {
                Some(rss) => {
                    memory_grace = (memory_grace * 2).clamp(MEMORY_GRACE, MEMORY_GRACE_MAX);
                    log::warn!(
                        "app `{name}`: pool worker {pid} uses {} MiB already as it starts, past \
                         max_memory ({} MiB): it is replaced for its memory only after {} s, \
                         and so is each next one (raise max_memory above what the app needs)",
                        rss >> 20,
                        max_memory >> 20,
                        memory_grace.as_secs()
                    );
                }
                None => memory_grace = Duration::ZERO,
            }
            let idle_limit = settings.app.idle_timeout.as_limit();
            let mut idle_since: Option<Instant> = None;
            let mut taken_before = 0;
            let exited = loop {
                if extra {
                    // Idle means given no request: a look every WATCH would miss short ones.
                    let taken = conn.taken.load(Ordering::Relaxed);
                    if conn.in_flight.load(Ordering::Acquire) > 0 || taken != taken_before {
                        taken_before = taken;
                        idle_since = None;
                    } else if let Some(limit) = idle_limit {
                        let since = *idle_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= limit {
                            self.retire(generation, &conn, &mut child, "idle".into());
                            return;
                        }
                    }
                }
                match child.try_wait() {
                    Ok(Some(status)) => break Some(describe_exit(status)),
                    Ok(None) => {}
                    Err(e) => break Some(format!("could not be waited for: {e}")),
                }
                if self.stopping.load(Ordering::Acquire) {
                    self.retire(generation, &conn, &mut child, "the server stops".into());
                    return;
                }
                if generation.retired.load(Ordering::Acquire) {
                    self.retire(generation, &conn, &mut child, "a reload replaced it".into());
                    return;
                }
                if max_requests > 0 && conn.taken.load(Ordering::Relaxed) >= max_requests {
                    conn.request_recycle(format!("it was given max_requests ({max_requests})"));
                }
                if max_memory > 0
                    && memory_checked.elapsed() >= MEMORY_CHECK
                    && ready_at.elapsed() >= memory_grace
                {
                    memory_checked = Instant::now();
                    if let Some(rss) = rss_bytes(pid).filter(|rss| *rss > max_memory) {
                        conn.request_recycle(format!(
                            "its memory ({} MiB) passed max_memory ({} MiB)",
                            rss >> 20,
                            max_memory >> 20
                        ));
                    }
                }
                if max_lifetime.is_some_and(|limit| ready_at.elapsed() >= limit) {
                    conn.request_recycle(format!(
                        "it served for max_lifetime ({})",
                        settings.app.max_lifetime
                    ));
                }
                if conn.recycle_reason().is_some() {
                    // The replacement starts now (the loop goes round); this worker serves
                    // on until it is ready.
                    break None;
                }
                std::thread::sleep(WATCH);
            };
            let Some(how) = exited else {
                let why = conn.recycle_reason().unwrap_or_default();
                outgoing = Some((conn, child, why));
                pause = Duration::from_millis(500);
                continue;
            };
            // The worker exited by itself.
            let young = ready_at.elapsed() < YOUNG && conn.taken.load(Ordering::Relaxed) == 0;
            conn.lost("the worker exited");
            self.forget(generation, &conn);
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            if generation.retired.load(Ordering::Acquire) {
                // Died as a reload replaced it, before its drain began: a death, as in
                // `retire`.
                self.tell_death(format!(
                    "worker {pid} {how} as a reload replaced it{}",
                    lost_requests(&conn)
                ));
                return;
            }
            if extra {
                // Demand brings it back if it is still needed.
                let event = format!("worker {pid} {how}{}", lost_requests(&conn));
                log::warn!("app `{name}`: pool {event}");
                self.record_event(event);
                return;
            }
            self.restarts.fetch_add(1, Ordering::Relaxed);
            let event = format!("worker {pid} {how}{}", lost_requests(&conn));
            log::warn!("app `{name}`: pool {event}; starting another");
            self.record_event(event);
            if young {
                if self.pick().is_none() {
                    self.fail_parked();
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(30));
            } else {
                pause = Duration::from_millis(500);
            }
        }
        // Stopped or reloaded while a recycled worker waited for its replacement.
        if let Some((old, mut old_child, why)) = outgoing.take() {
            self.retire(generation, &old, &mut old_child, why);
        }
    }

    /// Drains and stops a worker on a thread of its own.
    fn retire_in_background(
        self: &Arc<Self>,
        generation: &Arc<Generation>,
        conn: Arc<WorkerConn>,
        child: Child,
        why: String,
    ) {
        let pool = self.clone();
        let thread_generation = generation.clone();
        let pid = conn.pid;
        // Handed over through a slot, so that it is still here should the thread not start.
        let parcel = Arc::new(Mutex::new(Some((conn, child, why))));
        let handed = parcel.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{}-pool-drain-{pid}", self.name))
            .spawn(move || {
                let taken = handed.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some((conn, mut child, why)) = taken {
                    pool.retire(&thread_generation, &conn, &mut child, why);
                }
            });
        if let Err(e) = spawned {
            log::error!(
                "app `{}`: cannot start a drain thread ({e}): worker {pid} drains on this one",
                self.name
            );
            let taken = parcel.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some((conn, mut child, why)) = taken {
                self.retire(generation, &conn, &mut child, why);
            }
        }
    }

    /// Drains a worker and stops it: no new requests, up to `graceful_timeout` for those it
    /// has, then SIGTERM (SIGKILL if it lingers).
    fn retire(
        &self,
        generation: &Generation,
        conn: &Arc<WorkerConn>,
        child: &mut Child,
        why: String,
    ) {
        let name = &self.name;
        let pid = conn.pid;
        let graceful = generation.settings.app.graceful_timeout.as_limit();
        conn.start_draining();
        // 0: no limit, as a timeout of 0 means everywhere else.
        let deadline = graceful.map(|limit| Instant::now() + limit);
        // A stuck worker's other requests run on threads (or tasks) of their own and finish
        // as any others do; its stuck request was given up on, so it is no longer counted.
        while conn.in_flight.load(Ordering::SeqCst) > 0
            && deadline.is_none_or(|deadline| Instant::now() < deadline)
        {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(WATCH);
        }
        let left = conn.in_flight.load(Ordering::SeqCst);
        // Closing its socket ends the worker the way it ends itself (an ASGI app gets its
        // lifespan shutdown, which graceful_timeout bounds in the worker too); SIGTERM, then
        // SIGKILL, for one that has not gone some seconds after that. One that has exited
        // already (it crashed while draining, or the OOM killer took it) is lost, not closed
        // on purpose, and told as a death.
        let died = match child.try_wait() {
            Ok(None) => {
                conn.close();
                None
            }
            Ok(Some(status)) => Some(describe_exit(status)),
            Err(e) => Some(format!("could not be waited for: {e}")),
        };
        // A worker stuck in its app cannot run a lifespan shutdown either.
        let shutdown_limit = match conn.is_stuck() {
            true => Some(Duration::ZERO),
            false => graceful,
        };
        // Closed, it finishes the app calls still running (background tasks), then runs its
        // lifespan shutdown: up to graceful_timeout each (`Dispatcher::shutdown`).
        let term_at = shutdown_limit.map(|limit| Instant::now() + 2 * limit + EXIT_SLACK);
        let mut kill_at = None;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if kill_at.is_some_and(|at| Instant::now() >= at) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) if kill_at.is_none() && term_at.is_some_and(|at| Instant::now() >= at) => {
                    log::warn!("app `{name}`: pool worker {pid} did not exit in time: SIGTERM");
                    signal(pid, libc::SIGTERM);
                    kill_at = Some(Instant::now() + EXIT_SLACK);
                }
                Ok(None) => std::thread::sleep(WATCH),
            }
        }
        conn.lost("the worker was replaced");
        self.forget(generation, conn);
        // One that dies as the server stops (systemd's stop signals every process of the
        // unit) is not worth a warning.
        if let Some(how) = died.filter(|_| !self.stopping.load(Ordering::Acquire)) {
            self.tell_death(format!(
                "worker {pid} {how} while it drained ({why}){}",
                lost_requests(conn)
            ));
            return;
        }
        let done = if why == "idle" { "stopped" } else { "replaced" };
        let event = if left > 0 {
            format!("worker {pid} {done} ({why}); {left} request(s) cut after graceful_timeout")
        } else {
            format!("worker {pid} {done} ({why})")
        };
        if !self.stopping.load(Ordering::Acquire) {
            log::info!("app `{name}`: pool {event}");
            self.record_event(event);
        }
    }

    /// Counts, logs and records the death of a worker that is not to be started again (its
    /// replacement runs already).
    fn tell_death(&self, event: String) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        log::warn!("app `{}`: pool {event}", self.name);
        self.record_event(event);
    }

    fn forget(&self, generation: &Generation, conn: &Arc<WorkerConn>) {
        generation
            .conns
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| !Arc::ptr_eq(c, conn));
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|r| !Arc::ptr_eq(&r.conn, conn));
    }
}

/// For a lost worker's event: how many requests failed with it, if any did.
fn lost_requests(conn: &WorkerConn) -> String {
    match conn.requests_lost.load(Ordering::Relaxed) {
        0 => String::new(),
        lost => format!("; {lost} request(s) in flight failed with it"),
    }
}

/// `max_requests` plus this worker's share of the jitter (0: no limit).
fn max_requests_for(app: &AppConfig, pid: u32) -> u64 {
    let base = app.max_requests;
    let jitter = app.max_requests_jitter;
    if base == 0 {
        return 0;
    }
    if jitter == 0 {
        return base;
    }
    base + worker_seed(pid) % (jitter + 1)
}

/// `max_lifetime` plus up to a tenth more for this worker, so that workers started together
/// are not all replaced at once; `None`: no limit.
fn max_lifetime_for(app: &AppConfig, pid: u32) -> Option<Duration> {
    let base = app.max_lifetime.as_limit()?;
    let tenth = (base.as_millis() / 10) as u64;
    Some(base + Duration::from_millis(worker_seed(pid) % (tenth + 1)))
}

/// A number that differs from worker to worker: for the random share of a limit.
fn worker_seed(pid: u32) -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64)
        ^ (u64::from(pid) << 17)
}

/// How a socket's reading ended.
pub(crate) enum ReadEnd {
    /// The peer closed the socket.
    Closed,
    /// Reading failed.
    Failed(std::io::Error),
    /// The peer broke the protocol (or a frame could not be handled).
    Protocol(wire::WireError),
}

/// Runs `work` on this thread unless another thread is running it under the same `wakes`,
/// which then runs it once more. Both ends of a stream service it this way: whichever thread
/// wakes the stream does the work, one at a time, so what it sends stays in order; and a wake
/// from inside `work` (an exchange waking its other side, which wakes this one back) asks for
/// another round instead of taking a lock its own thread holds.
pub(crate) fn one_at_a_time(wakes: &AtomicUsize, mut work: impl FnMut()) {
    if wakes.fetch_add(1, Ordering::AcqRel) != 0 {
        return;
    }
    loop {
        let seen = wakes.load(Ordering::Acquire);
        work();
        if wakes.fetch_sub(seen, Ordering::AcqRel) == seen {
            return;
        }
    }
}

/// A WSGI worker with every thread busy is still given more requests to queue while its
/// last few answers all came within this time. One that answers that often is busy with
/// quick requests: queueing on it keeps its threads fed without a round trip through the
/// pool's queue for each request (which costs a hello-world app more than half its
/// throughput). One that answers more slowly may be held by slow requests, which a queued
/// one would wait behind while another worker's thread comes free first; and for requests
/// that slow, the round trip is a small part of their time.
const QUICK: Duration = Duration::from_millis(10);

/// Whether `conn` takes one more request now: a WSGI worker while it has a thread free, or
/// answers quickly ([`QUICK`]) and its own queue has room. An ASGI worker's requests are
/// tasks on its event loop, which takes them as they come (up to its `queue_size`, which it
/// enforces itself).
fn takes_now(generation: &Generation, conn: &WorkerConn) -> bool {
    let app = &generation.settings.app;
    if app.interface != portico_config::Interface::Wsgi {
        return true;
    }
    let busy = conn.busy();
    busy < app.threads || (busy < app.threads + app.queue_size && conn.answers_quickly(QUICK))
}

/// The least busy live worker of `generation`, and the least busy one that
/// [`takes_now`], if any; ties go by `turn`, so that idle workers share the work.
fn pick_for(
    generation: &Generation,
    turn: &AtomicUsize,
) -> (Option<Arc<WorkerConn>>, Option<Arc<WorkerConn>>) {
    let conns = generation.conns.read().unwrap_or_else(|e| e.into_inner());
    let start = turn.fetch_add(1, Ordering::Relaxed);
    let key = |c: &&Arc<WorkerConn>| {
        (
            c.in_flight.load(Ordering::Acquire),
            c.on_demand.load(Ordering::Relaxed),
        )
    };
    let live = (0..conns.len())
        .map(|i| &conns[(start + i) % conns.len()])
        .filter(|c| c.is_alive());
    let least = live.clone().min_by_key(key).cloned();
    let taker = live
        .filter(|c| takes_now(generation, c))
        .min_by_key(key)
        .cloned();
    (least, taker)
}

/// Connects to the Unix socket at `path` without waiting. A blocking connect to a Unix
/// socket waits while the listener's queue of pending connections is full (unix(7)), which
/// a stopped or stuck server never empties: that would hold the host's event loop (and every
/// other request on it) for as long. Non-blocking, it fails at once with `WouldBlock`
/// instead, as nginx's upstream connect does ("Resource temporarily unavailable"). The
/// stream is made blocking again for the connection's reader and writer threads.
pub(crate) fn connect_at_once(path: &std::path::Path) -> std::io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    // A Unix stream connect completes or fails in the call: it never answers EINPROGRESS.
    socket.connect(&SockAddr::unix(path)?)?;
    socket.set_nonblocking(false)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

/// Reads frames off `socket` and hands each to `on_frame`, until the socket ends or a frame
/// is refused. Both ends of the pool's socket read this way.
pub(crate) fn read_frames(
    mut socket: &UnixStream,
    mut on_frame: impl FnMut(wire::Frame) -> Result<(), wire::WireError>,
) -> ReadEnd {
    let mut buf = BytesMut::new();
    loop {
        loop {
            match wire::decode(&mut buf) {
                Ok(Some(frame)) => {
                    if let Err(e) = on_frame(frame) {
                        return ReadEnd::Protocol(e);
                    }
                }
                Ok(None) => break,
                Err(e) => return ReadEnd::Protocol(e),
            }
        }
        // Read into the buffer itself, so that a body piece is a slice of what was read
        // rather than a copy (`wire::decode` copies small payloads out, which leaves the
        // buffer to be reused); as much as the frame begun still needs (one read for a whole
        // body piece), and room for a batch of small frames otherwise.
        let filled = buf.len();
        let room = wire::missing(&buf).clamp(READ_AT_LEAST, READ_AT_MOST);
        buf.resize(filled + room, 0);
        match socket.read(&mut buf[filled..]) {
            Ok(0) => return ReadEnd::Closed,
            Ok(n) => buf.truncate(filled + n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => buf.truncate(filled),
            Err(e) => return ReadEnd::Failed(e),
        }
    }
}

/// The least room a read of the pool's socket offers: a batch of small frames fits.
const READ_AT_LEAST: usize = 16 * 1024;

/// The most: a piece of body and the frames about it.
const READ_AT_MOST: usize = wire::DATA_PIECE + 4096;

/// What became of the requests a writer was given: which of them never went out whole, so
/// never reached the peer (a worker cannot act on part of a frame) and may go to another.
#[derive(Default)]
pub(crate) struct Delivery {
    state: Mutex<DeliveryState>,
    settled: std::sync::Condvar,
}

#[derive(Default)]
struct DeliveryState {
    /// Request frames written whole or given up on.
    settled: u64,
    /// The streams of those given up on.
    unwritten: Vec<u32>,
    /// Someone waits in [`Delivery::unwritten`] (a notify is a system call otherwise).
    waiting: bool,
}

impl Delivery {
    fn settle(&self, count: u64, unwritten: impl IntoIterator<Item = u32>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.settled += count;
        state.unwritten.extend(unwritten);
        if state.waiting {
            self.settled.notify_all();
        }
    }

    /// Once the first `queued` request frames are settled (or `limit` passed): the streams
    /// of those that never went out.
    pub(crate) fn unwritten(&self, queued: u64, limit: Duration) -> Vec<u32> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.waiting = true;
        let (state, _) = self
            .settled
            .wait_timeout_while(state, limit, |s| s.settled < queued)
            .unwrap_or_else(|e| e.into_inner());
        state.unwritten.clone()
    }
}

/// Writes frames as they come, several per write when they queue up, until the channel
/// ends or, without `delivery`, a write fails; then shuts the socket's sending side. With
/// `delivery` (the host's writer), it accounts for every `Request` frame: written whole, or
/// not (the socket failed first). After a failed write it shuts the socket down, so the
/// reader ends too, and goes on only to account for what still comes.
pub(crate) fn write_frames(
    socket: UnixStream,
    frames: crossbeam_channel::Receiver<wire::Frame>,
    delivery: Option<&Delivery>,
) {
    let mut batch = wire::Batch::default();
    // The Request frames in the batch: where each ends, and its stream.
    let mut requests: Vec<(usize, u32)> = Vec::new();
    let mut broken = false;
    while let Ok(frame) = frames.recv() {
        let mut next = Some(frame);
        while let Some(frame) = next.take() {
            let end = batch.push(&frame);
            if frame.kind == Kind::Request {
                requests.push((end, frame.stream));
            }
            if batch.len() < 256 * 1024 {
                next = frames.try_recv().ok();
            }
        }
        let written = if broken {
            0
        } else {
            write_all_vectored(&socket, batch.parts())
        };
        if written < batch.len() && !broken {
            broken = true;
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        let Some(delivery) = delivery else {
            // Nothing to account for (a worker's writer): a failed write ends it, and every
            // send after that fails, which tells the worker its host is gone.
            if broken {
                return;
            }
            batch.clear();
            continue;
        };
        if !requests.is_empty() {
            let unwritten = requests
                .iter()
                .filter(|(end, _)| *end > written)
                .map(|(_, stream)| *stream);
            delivery.settle(requests.len() as u64, unwritten);
        }
        requests.clear();
        batch.clear();
    }
    let _ = socket.shutdown(std::net::Shutdown::Write);
}

/// Writes `parts` to `socket` in order, as few writes as it takes (writev(2)); returns the
/// bytes written, fewer than all only when the socket failed.
fn write_all_vectored(mut socket: &UnixStream, parts: &[Bytes]) -> usize {
    use std::io::{IoSlice, Write};
    // The first part not yet written whole, and how much of it was.
    let (mut first, mut within, mut written) = (0, 0, 0);
    let mut slices = Vec::with_capacity(parts.len().min(MAX_SLICES));
    while first < parts.len() {
        slices.clear();
        slices.push(IoSlice::new(&parts[first][within..]));
        slices.extend(
            parts[first + 1..]
                .iter()
                .take(MAX_SLICES - 1)
                .map(|p| IoSlice::new(p)),
        );
        let mut n = match socket.write_vectored(&slices) {
            Ok(0) => return written,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return written,
        };
        written += n;
        while first < parts.len() && n >= parts[first].len() - within {
            n -= parts[first].len() - within;
            (first, within) = (first + 1, 0);
        }
        within += n;
    }
    written
}

/// Slices given to one writev(2), below Linux's `IOV_MAX` of 1024.
const MAX_SLICES: usize = 256;

/// A pool's state, for `portico status` and the status URL.
#[derive(Debug, Clone)]
pub struct PoolStatus {
    /// The app's name.
    pub app: String,
    /// The generation that takes new requests.
    pub generation: u64,
    /// Workers that exited by themselves (crashed, killed) and were started again.
    pub restarts: u64,
    /// The process that supervises the workers: the `portico serve` whose pool this is, or
    /// the `portico pool` server (the one nginx starts, or one run on its own), so that a
    /// sysadmin can tell which process to signal or look for in the logs.
    pub server_pid: u32,
    /// Requests waiting in the pool's queue for a worker to take them (Passenger's
    /// "requests in queue").
    pub queued: usize,
    /// Live workers, serving or draining.
    pub workers: Vec<WorkerStatus>,
    /// The latest exits and replacements with their reasons, oldest first.
    pub events: Vec<String>,
}

/// One worker in a [`PoolStatus`].
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    /// Its process id.
    pub pid: u32,
    /// The generation it belongs to.
    pub generation: u64,
    /// Whether it takes new requests.
    pub state: WorkerState,
    /// Requests it has finished.
    pub served: u64,
    /// Requests it has now.
    pub in_flight: usize,
    /// Its resident memory.
    pub rss_bytes: u64,
    /// When it started, in seconds since the Unix epoch.
    pub started: u64,
}

/// Where a worker is in its life, for the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// It takes new requests.
    Serving,
    /// Being replaced: it finishes its requests and takes no new ones.
    Draining,
    /// Gone (its exit is being handled): it is about to leave the list.
    Lost,
}

impl WorkerState {
    /// As the status shows it.
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Serving => "serving",
            WorkerState::Draining => "draining",
            WorkerState::Lost => "lost",
        }
    }
}

impl PoolStatus {
    /// As a JSON object.
    pub fn to_json(&self) -> String {
        let mut out = format!(
            "{{\"app\":{},\"generation\":{},\"restarts\":{},\"server_pid\":{},\"queued\":{},\"workers\":[",
            json_str(&self.app),
            self.generation,
            self.restarts,
            self.server_pid,
            self.queued
        );
        for (i, w) in self.workers.iter().enumerate() {
            let _ = write!(
                out,
                "{}{{\"pid\":{},\"generation\":{},\"state\":\"{}\",\"served\":{},\"in_flight\":{},\"rss_bytes\":{},\"started\":{}}}",
                if i > 0 { "," } else { "" },
                w.pid,
                w.generation,
                w.state.name(),
                w.served,
                w.in_flight,
                w.rss_bytes,
                w.started
            );
        }
        out.push_str("],\"events\":[");
        let events: Vec<String> = self.events.iter().map(|e| json_str(e)).collect();
        out.push_str(&events.join(","));
        out.push_str("]}");
        out
    }

    /// As lines for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "app {}: generation {}, {} restart(s), {} request(s) queued, supervised by pid {}\n  {:>8} {:>4} {:<9} {:>9} {:>9} {:>9}\n",
            self.app,
            self.generation,
            self.restarts,
            self.queued,
            self.server_pid,
            "PID",
            "GEN",
            "STATE",
            "SERVED",
            "IN FLIGHT",
            "RSS MiB"
        );
        for w in &self.workers {
            let _ = writeln!(
                out,
                "  {:>8} {:>4} {:<9} {:>9} {:>9} {:>9.1}",
                w.pid,
                w.generation,
                w.state.name(),
                w.served,
                w.in_flight,
                w.rss_bytes as f64 / (1024.0 * 1024.0)
            );
        }
        for event in &self.events {
            let _ = writeln!(out, "  - {event}");
        }
        out
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill() only sends a signal, to a process id of a child we have not reaped.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// A process's resident memory, from /proc.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A pool that could not be asked, as an entry of the status JSON.
pub(crate) fn unavailable_json(app: &str, why: &str) -> String {
    format!(
        "{{\"app\":{},\"unavailable\":{}}}",
        json_str(app),
        json_str(why)
    )
}

/// A JSON string literal.
fn json_str(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// How a child process ended, for a log line: "exited with code N" or "was killed by
/// signal N".
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended".into(),
    }
}

/// In a child between fork and exec: puts `fd` on descriptor `at` for the program to find
/// (without close-on-exec), and unblocks every signal, which the child inherits blocked
/// from a server's threads or a reloading nginx master. Both the pool's workers and the
/// pool server nginx starts are set up this way.
///
/// # Safety
/// Only between fork and exec (it makes only async-signal-safe calls), with `fd` open.
pub unsafe fn prepare_child(fd: i32, at: i32) -> std::io::Result<()> {
    // SAFETY: the caller's; dup2, fcntl, sigemptyset and sigprocmask are async-signal-safe.
    unsafe {
        if fd == at {
            // dup2 onto itself keeps close-on-exec: clear it instead.
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        } else if libc::dup2(fd, at) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    Ok(())
}

/// Who a child process runs as: a user, its primary group, and the groups it keeps.
#[derive(Debug, Clone)]
pub struct ChildIdentity {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

impl ChildIdentity {
    /// `uid` and `gid`, with the user's supplementary groups looked up now: in the parent,
    /// since the name service is not safe to call between fork and exec.
    pub fn new(uid: u32, gid: u32) -> Self {
        Self {
            uid,
            gid,
            groups: portico_config::groups_of(uid, gid),
        }
    }

    /// Switches the calling process to this identity: groups, then group, then user, the
    /// order in which root may still make each call. For `pre_exec`, before anything that
    /// the switch would undo (a PR_SET_PDEATHSIG is cleared when the user changes).
    ///
    /// # Safety
    /// Only between fork and exec: it makes only async-signal-safe calls.
    pub unsafe fn assume(&self) -> std::io::Result<()> {
        // SAFETY: plain system calls on memory this identity owns; the caller's context.
        let failed = unsafe {
            libc::setgroups(self.groups.len(), self.groups.as_ptr()) < 0
                || libc::setgid(self.gid) < 0
                || libc::setuid(self.uid) < 0
        };
        if failed {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// What a service manager tells the process it started (sd_notify(3), sd_listen_fds(3),
/// sd_watchdog_enabled(3)): the server's, not its workers'. An app that speaks sd_notify
/// must not report as the server, or hand sockets to its fd store.
const SERVICE_MANAGER_VARIABLES: [&str; 7] = [
    "NOTIFY_SOCKET",
    "FDSTORE",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// The variable that tells a worker the Python library its host runs.
const LIBPYTHON_VARIABLE: &str = "PORTICO_LIBPYTHON";

/// The host's Python library, looked up once.
fn host_libpython() -> Option<&'static std::path::Path> {
    static LIBRARY: OnceLock<Option<PathBuf>> = OnceLock::new();
    LIBRARY
        .get_or_init(crate::python::loaded_libpython)
        .as_deref()
}

/// In a worker: an error when it runs another Python library than its host said it runs,
/// which happens when the worker's `user` cannot read the host's (the loader then falls
/// back to one of the same name elsewhere, a Python with other packages, or none).
pub fn check_libpython() -> Result<(), String> {
    let Some(expected) = std::env::var_os(LIBPYTHON_VARIABLE) else {
        return Ok(());
    };
    let expected = PathBuf::from(expected);
    match crate::python::loaded_libpython() {
        Some(found) if found == expected => Ok(()),
        found => {
            let found = found.map_or_else(|| "none".to_owned(), |f| f.display().to_string());
            // SAFETY: getuid() cannot fail and touches no memory of ours.
            let uid = unsafe { libc::getuid() };
            Err(format!(
                "this worker (uid {uid}) runs the Python library {found}, not {} as the server \
                 does: its user cannot read that file or a directory above it, or the server \
                 and portico-worker were linked against different Pythons (a binary of your \
                 own needs the rpath to the same libpython: see docs/embedding.md). Make the \
                 Python Portico was built with readable to the app's `user`, or run without \
                 `user`",
                expected.display()
            ))
        }
    }
}

/// Starts one worker, gives it its settings and waits for its hello.
fn spawn(
    settings: &PoolSettings,
    pool: &Pool,
    startup: Option<Duration>,
) -> Result<(Child, Arc<WorkerConn>), String> {
    let host = &pool.host;
    let config = &settings.app;
    let identity = match worker_identity(config)? {
        Some(identity) => Some(identity),
        None => host.default_identity,
    };
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let theirs: OwnedFd = theirs.into();
    let fd = theirs.as_raw_fd();
    let mut command = Command::new(&host.worker_binary);
    command
        .arg("--config")
        .arg(&host.config_file)
        .arg("--app")
        .arg(&config.name);
    for name in SERVICE_MANAGER_VARIABLES {
        command.env_remove(name);
    }
    if let Some((uid, _)) = identity {
        login_variables(&mut command, uid);
    }
    // The host's name, so that a pooled app sees the SERVER_SOFTWARE an in-process one does.
    command.env("PORTICO_SERVER_SOFTWARE", &pool.server_software);
    command.envs(&config.env);
    // The Python library the worker must find (see `check_libpython`).
    if let Some(library) = host_libpython() {
        command.env(LIBPYTHON_VARIABLE, library);
    }
    // The workers keep their user's groups, as initgroups(3) gives nginx's and gunicorn's.
    let identity = identity.map(|(uid, gid)| ChildIdentity::new(uid, gid));
    // SAFETY: between fork and exec only async-signal-safe calls: setgroups, setgid, setuid,
    // dup2 (the copy has no close-on-exec), fcntl, prctl, sigemptyset and sigprocmask.
    unsafe {
        command.pre_exec(move || {
            if let Some(identity) = &identity {
                identity.assume()?;
            }
            // The server blocks signals for threads of its own (SIGHUP); a worker starts
            // with none blocked.
            prepare_child(fd, WORKER_FD)?;
            // The worker goes when the process that supervises it goes.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = spawn_from_lasting_thread(command)
        .map_err(|e| format!("cannot run {}: {e}", host.worker_binary.display()))?;
    drop(theirs);
    // A worker that is gone already has no use for them: its exit is told below.
    let _ = send_settings(&ours, &settings.file_text, startup);
    match read_hello(&ours, startup) {
        Ok(pid) if pid == child.id() => {}
        Ok(pid) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("worker {} said it was {pid}", child.id()));
        }
        Err(why) => {
            // A worker that closed its socket is on its way out (an app that cannot import
            // exits 70): its exit, not a timeout, is what to tell, once it can be reaped.
            if why == HELLO_CLOSED {
                let until = Instant::now() + EXIT_SLACK;
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            // Still running: it never said hello in time, and has nothing to say in the log.
            let stuck = matches!(child.try_wait(), Ok(None));
            let _ = child.kill();
            let status = child.wait().map(describe_exit).unwrap_or_default();
            return Err(if stuck {
                format!("the worker was not ready in time ({why}) and was killed")
            } else {
                format!("the worker {status} before it was ready ({why}); its error is in the log above")
            });
        }
    }
    match WorkerConn::start(
        ours,
        child.id(),
        &config.name,
        WorkerConn::stuck_after(config),
    ) {
        Ok(conn) => Ok((child, conn)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("cannot start the pool's threads: {e}"))
        }
    }
}

/// Runs `command` from a thread that lasts as long as the process. A worker's parent-death
/// signal (`PR_SET_PDEATHSIG`) fires when the *thread* that forked it ends, not the process
/// (prctl(2)); so a worker still draining when the slot that started it ends (a reload or a
/// stop right after a recycle, or an on-demand slot going) is not sent SIGTERM mid-request.
fn spawn_from_lasting_thread(mut command: Command) -> std::io::Result<Child> {
    type Order = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<Option<mpsc::Sender<Order>>> = std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (orders, taken) = mpsc::channel::<Order>();
        let started = std::thread::Builder::new()
            .name("pool-spawner".into())
            .spawn(move || {
                for (mut command, reply) in taken {
                    let _ = reply.send(command.spawn());
                }
            });
        match started {
            Ok(_) => Some(orders),
            Err(e) => {
                log::warn!(
                    "cannot start the pool's spawner thread ({e}): each slot forks its workers"
                );
                None
            }
        }
    });
    let Some(spawner) = spawner else {
        return command.spawn();
    };
    let (reply, answer) = mpsc::channel();
    spawner
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the pool's spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the pool's spawner thread is gone"))?
}

/// A worker that runs as another user than the server gets that user's `HOME`, `USER` and
/// `LOGNAME` (and `USERNAME`, if the server has one), as mod_wsgi's daemon processes do:
/// the server's would send `~`, `.netrc`, caches and `getpass.getuser()` to the wrong user.
/// The app's `env` still wins. A uid with no user entry keeps the server's.
fn login_variables(command: &mut Command, uid: u32) {
    // SAFETY: geteuid has no preconditions.
    if uid == unsafe { libc::geteuid() } {
        return;
    }
    let Some((name, home)) = portico_config::login_of(uid) else {
        return;
    };
    command
        .env("HOME", home)
        .env("USER", &name)
        .env("LOGNAME", &name);
    if std::env::var_os("USERNAME").is_some() {
        command.env("USERNAME", &name);
    }
}

/// The user and group an app's pool workers switch to (`user`, `group`), by name or number;
/// `None` when the app sets neither (the workers keep the server's, or the host's default).
pub fn worker_identity(config: &AppConfig) -> Result<Option<(u32, u32)>, String> {
    if config.user.is_none() && config.group.is_none() {
        return Ok(None);
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!(
            "user/group are set, but the server runs as uid {euid}, not root, so it cannot switch"
        ));
    }
    let (uid, primary) = match &config.user {
        Some(user) => portico_config::lookup_user(user)?,
        None => (0, 0),
    };
    let gid = match &config.group {
        Some(group) => portico_config::lookup_group(group)?,
        None => primary,
    };
    Ok(Some((uid, gid)))
}

/// Sends a new worker the [`Kind::Settings`] of its generation.
fn send_settings(
    mut socket: &UnixStream,
    file_text: &str,
    limit: Option<Duration>,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut payload = BytesMut::with_capacity(2 + file_text.len());
    payload.put_u16_le(wire::VERSION);
    payload.put_slice(file_text.as_bytes());
    let mut frame = BytesMut::new();
    Frame::new(Kind::Settings, 0, payload.freeze()).encode(&mut frame);
    // The worker reads it first thing; one that never does is killed at startup_timeout.
    socket.set_write_timeout(limit.map(|limit| limit.max(Duration::from_millis(1))))?;
    socket.write_all(&frame)?;
    socket.set_write_timeout(None)
}

/// Why [`read_hello`] failed when the worker closed its socket first.
const HELLO_CLOSED: &str = "it closed its socket";

/// Reads the worker's [`Kind::Hello`]; returns its pid.
fn read_hello(mut socket: &UnixStream, limit: Option<Duration>) -> Result<u32, String> {
    socket
        .set_read_timeout(limit.map(|limit| limit.max(Duration::from_millis(1))))
        .map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 64];
    let frame = loop {
        if let Some(frame) = wire::decode(&mut buf).map_err(|e| e.to_string())? {
            break frame;
        }
        match socket.read(&mut chunk) {
            Ok(0) => return Err(HELLO_CLOSED.into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                let limit = limit.unwrap_or_default();
                return Err(format!("no hello within startup_timeout ({limit:?})"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(HELLO_CLOSED.into())
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    socket.set_read_timeout(None).map_err(|e| e.to_string())?;
    if frame.kind != Kind::Hello || !buf.is_empty() {
        return Err("its first frame was not a hello".into());
    }
    let mut payload = frame.payload;
    if payload.remaining() != 6 {
        return Err("a malformed hello".into());
    }
    let version = payload.get_u16_le();
    if version != wire::VERSION {
        return Err(format!(
            "it speaks pool protocol {version}, this host {}: the worker binary is of another version",
            wire::VERSION
        ));
    }
    Ok(payload.get_u32_le())
}

#[cfg(test)]
mod tests {
    use super::{one_at_a_time, read_frames, write_frames, ReadEnd};
    use crate::pool::wire::{Frame, Kind};
    use bytes::Bytes;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn frames_written_in_batches_of_shared_and_copied_pieces_arrive_whole_and_in_order() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        // More pieces than one writev takes, bodies larger than a socket buffer, and small
        // frames between them, all queued before the writer starts: one batch of many writes.
        let sent: Vec<Frame> = (0..700u32)
            .map(|i| {
                let len = [0, 5, 4096, 70_000][i as usize % 4];
                let body = Bytes::from(vec![i as u8; len]);
                match i % 3 {
                    0 => Frame::new(Kind::Data, i, body),
                    1 => {
                        Frame::with_body(Kind::Whole, i, b"head"[..].into(), &[body.clone(), body])
                    }
                    _ => Frame::bare(Kind::End, i),
                }
            })
            .collect();
        let (frames, queue) = crossbeam_channel::unbounded();
        for frame in &sent {
            frames.send(frame.clone()).unwrap();
        }
        drop(frames);
        let writer = std::thread::spawn(move || write_frames(ours, queue, None));
        let mut got = Vec::new();
        let end = read_frames(&theirs, |frame| {
            got.push(frame);
            Ok(())
        });
        writer.join().unwrap();
        assert!(matches!(end, ReadEnd::Closed));
        assert_eq!(got.len(), sent.len());
        for (got, sent) in got.iter().zip(&sent) {
            let mut whole = sent.payload.to_vec();
            sent.tail
                .iter()
                .for_each(|piece| whole.extend_from_slice(piece));
            assert_eq!((got.kind, got.stream), (sent.kind, sent.stream));
            assert_eq!(got.payload, whole, "frame {}", sent.stream);
        }
    }

    #[test]
    fn a_wake_from_inside_the_work_runs_it_once_more_on_the_same_thread() {
        let wakes = AtomicUsize::new(0);
        let mut runs = 0;
        one_at_a_time(&wakes, || {
            runs += 1;
            if runs == 1 {
                // Would deadlock on a lock; here it only asks for another round.
                one_at_a_time(&wakes, || panic!("ran inside the running work"));
            }
        });
        assert_eq!(runs, 2);
        assert_eq!(wakes.load(Ordering::Acquire), 0);
        one_at_a_time(&wakes, || runs += 1);
        assert_eq!(runs, 3, "free again once done");
    }
}
