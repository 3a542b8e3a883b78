//! One nginx worker process: its apps (loaded after the fork, in `init_process`), the
//! requests waiting for them, and the eventfd through which the apps' threads wake the
//! worker's event loop.
//!
//! The eventfd sits in the event loop as a fake connection whose read handler runs on the
//! nginx thread. A Python thread that produces an event for request `id` fires that request's
//! [`Waker`], which records `id` and writes to the eventfd (only if the loop has not been
//! signalled since it last looked). The read handler drains the eventfd, takes the recorded
//! ids and lets [`crate::handler`] poll each request's exchange.

use crate::config::MainConf;
use crate::PorticoModule;
use nginx_sys::{
    ngx_close_connection, ngx_connection_t, ngx_cycle_t, ngx_event_t, ngx_get_connection,
    ngx_handle_read_event, ngx_http_request_t, ngx_int_t, NGX_ERROR, NGX_LOG_EMERG, NGX_OK,
};
use ngx::http::HttpModuleMainConf;
use portico_core::{Dispatcher, HostInfo};
use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Wake, Waker};
use std::time::Duration;

/// This worker's apps and waiting requests. Lives on the nginx thread only.
pub struct Worker {
    /// The apps, in the order of [`MainConf::apps`].
    pub dispatcher: Dispatcher,
    notifier: Arc<Notifier>,
    /// The eventfd's connection in nginx's event loop.
    conn: *mut ngx_connection_t,
    /// Requests waiting for their app, by id.
    waiting: HashMap<u64, *mut ngx_http_request_t>,
    next_id: u64,
}

thread_local! {
    /// The worker's state. Only the nginx thread has one; other threads see `None`.
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// Runs `f` with the worker's state, if this process serves apps. Never call into nginx
/// inside `f`: nginx may call back (a request's cleanup) and need the state again.
pub fn with<R>(f: impl FnOnce(&mut Worker) -> R) -> Option<R> {
    WORKER.with(|w| w.borrow_mut().as_mut().map(f))
}

/// What the apps' threads share with the nginx thread: the eventfd and the ids to look at.
struct Notifier {
    /// The eventfd, which nginx's connection owns; `None` once nginx closed it, so a late
    /// waker cannot write to a descriptor number reused for another file.
    fd: RwLock<Option<RawFd>>,
    /// Requests whose exchange has something new.
    woken: Mutex<Vec<u64>>,
    /// The eventfd has been written since the nginx thread last drained it.
    signalled: AtomicBool,
}

impl Notifier {
    fn wake(&self, id: u64) {
        self.woken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id);
        if !self.signalled.swap(true, Ordering::AcqRel) {
            let fd = self.fd.read().unwrap_or_else(|e| e.into_inner());
            if let Some(fd) = *fd {
                let one: u64 = 1;
                // SAFETY: writes 8 bytes from a live u64 to the eventfd, which cannot be
                // closed while we hold the read lock; a full counter (EAGAIN) still leaves it
                // readable, which is all that matters.
                unsafe {
                    libc::write(fd, (&one as *const u64).cast(), 8);
                }
            }
        }
    }
}

/// Wakes the nginx thread for one request; runs on whatever thread fires it.
struct RequestWaker {
    id: u64,
    notifier: Arc<Notifier>,
}

impl Wake for RequestWaker {
    fn wake(self: Arc<Self>) {
        self.notifier.wake(self.id);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.notifier.wake(self.id);
    }
}

impl Worker {
    /// Registers a request that now waits for its app; returns its id and the waker its
    /// exchange is polled with.
    pub fn register(&mut self, r: *mut ngx_http_request_t) -> (u64, Waker) {
        self.next_id += 1;
        let id = self.next_id;
        self.waiting.insert(id, r);
        let waker = Waker::from(Arc::new(RequestWaker {
            id,
            notifier: self.notifier.clone(),
        }));
        (id, waker)
    }

    /// Forgets a request (it finished, or nginx is freeing it).
    pub fn unregister(&mut self, id: u64) {
        self.waiting.remove(&id);
    }
}

/// `init_process`: in each worker, after the fork: starts Python and the apps' threads, and
/// puts the eventfd in the event loop. An app that cannot be loaded makes the worker exit
/// with nginx's "fatal" code, so the master does not respawn it in a loop.
///
/// # Safety
/// Called by nginx on the worker's thread with the running cycle.
pub unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: the cycle is live for the whole process; its main configuration of the http
    // module holds ours when there is an `http` block.
    let Some(main) = (unsafe { PorticoModule::main_conf(&*cycle) }) else {
        return NGX_OK as ngx_int_t;
    };
    let main: &MainConf = main;
    if main.apps.is_empty() {
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: the cycle's log is live for the process.
    let log = unsafe { (*cycle).log };
    // SAFETY: read on the nginx thread; nginx set the level while configuring.
    crate::log_sink::install(unsafe { (*log).log_level });
    portico_core::tune_allocator();

    // Python runs in this process only for in-process apps.
    let in_process = main
        .apps
        .iter()
        .any(|a| a.config.mode == portico_config::Mode::InProcess);
    if let (true, Some(built)) = (in_process, option_env!("PORTICO_PYTHON_STDLIB")) {
        // Where Python will look: under $PYTHONHOME when the worker's environment has one
        // (nginx's `env` directive), else where the interpreter was built to find it. A
        // PYTHONHOME of `prefix:exec_prefix` keeps the pure-Python library under `prefix`.
        let home = std::env::var("PYTHONHOME").ok().filter(|h| !h.is_empty());
        let stdlib = match &home {
            Some(home) => {
                let prefix = home.split(':').next().unwrap_or_default();
                let dir = std::path::Path::new(built)
                    .file_name()
                    .map(|d| d.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("{prefix}/lib/{dir}")
            }
            None => built.to_owned(),
        };
        let path = std::ffi::CString::new(stdlib.as_str()).unwrap_or_default();
        // SAFETY: access() only reads the NUL-terminated path.
        if unsafe { libc::access(path.as_ptr(), libc::R_OK | libc::X_OK) } != 0 {
            let error = std::io::Error::last_os_error();
            // SAFETY: getuid has no preconditions.
            let uid = unsafe { libc::getuid() };
            let user = match crate::config::user_name(uid) {
                name if name.is_empty() => name,
                name => format!("{name} "),
            };
            let source = if home.is_some() {
                " (from PYTHONHOME, nginx's `env` directive)"
            } else {
                ""
            };
            ngx::ngx_log_error!(
                NGX_LOG_EMERG,
                log,
                "portico: this worker, running as user {}(uid {}), cannot read Python's standard library at {}{}: {}; run the workers as a user that can (nginx's `user` directive)",
                user,
                uid,
                stdlib,
                source,
                error
            );
            // NGX_ERROR makes the worker exit with code 2, which the master does not respawn.
            return NGX_ERROR as ngx_int_t;
        }
    }
    // A pooled app without pool_socket is served by the pool the master started.
    let pool_dir = crate::pool::socket_dir();
    let configs: Vec<_> = main
        .apps
        .iter()
        .map(|a| {
            let mut config = a.config.clone();
            if let (true, Some(dir)) = (crate::pool::is_managed(&config), &pool_dir) {
                config.pool_socket = Some(dir.join(format!("{}.sock", a.toml_name)));
            }
            config
        })
        .collect();
    let host = HostInfo {
        server_software: format!("nginx portico/{}", env!("CARGO_PKG_VERSION")),
        multiprocess: true,
        // Workers connect to pools (pool_socket); they start none themselves.
        pool: None,
    };
    // Python starts here: its threads block every signal, so nginx's reach this thread.
    let dispatcher = match Dispatcher::load(&configs, &host) {
        Ok(d) => d,
        Err(e) => {
            ngx::ngx_log_error!(NGX_LOG_EMERG, log, "portico: {}", e);
            return NGX_ERROR as ngx_int_t;
        }
    };

    // SAFETY: eventfd has no preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        ngx::ngx_log_error!(
            NGX_LOG_EMERG,
            log,
            "portico: eventfd() failed: {}",
            std::io::Error::last_os_error()
        );
        return NGX_ERROR as ngx_int_t;
    }
    // SAFETY: on the nginx thread after the event module's init_process made the connection
    // array; `fd` is a valid descriptor that nginx's connection owns from here on.
    let conn = unsafe { ngx_get_connection(fd, log) };
    if conn.is_null() {
        // SAFETY: nginx did not take the descriptor.
        unsafe { libc::close(fd) };
        return NGX_ERROR as ngx_int_t;
    }
    // SAFETY: `conn` is a fresh connection with its read and write events; we set what a
    // watched descriptor needs and add the read event to the event loop.
    unsafe {
        let rev = (*conn).read;
        (*rev).handler = Some(on_wakeup);
        (*rev).log = log;
        (*(*conn).write).log = log;
        (*conn).log = log;
        if ngx_handle_read_event(rev, 0) != NGX_OK as ngx_int_t {
            ngx_close_connection(conn);
            return NGX_ERROR as ngx_int_t;
        }
    }
    let notifier = Arc::new(Notifier {
        fd: RwLock::new(Some(fd)),
        woken: Mutex::new(Vec::new()),
        signalled: AtomicBool::new(false),
    });
    WORKER.with(|w| {
        *w.borrow_mut() = Some(Worker {
            dispatcher,
            notifier,
            conn,
            waiting: HashMap::new(),
            next_id: 0,
        })
    });
    NGX_OK as ngx_int_t
}

/// The eventfd is readable: poll every request whose app has produced something.
unsafe extern "C" fn on_wakeup(_ev: *mut ngx_event_t) {
    let Some(notifier) = with(|w| w.notifier.clone()) else {
        return;
    };
    if let Some(fd) = *notifier.fd.read().unwrap_or_else(|e| e.into_inner()) {
        let mut counter: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from the eventfd (non-blocking), which only
        // this thread closes; this resets its counter.
        unsafe {
            libc::read(fd, (&mut counter as *mut u64).cast(), 8);
        }
    }
    // Clear the flag before taking the ids: a wake after this point writes again.
    notifier.signalled.store(false, Ordering::Release);
    let woken = std::mem::take(&mut *notifier.woken.lock().unwrap_or_else(|e| e.into_inner()));
    for id in woken {
        // Looked up one at a time: finishing one request may free others' state.
        if let Some(r) = with(|w| w.waiting.get(&id).copied()).flatten() {
            // SAFETY: a request stays in `waiting` until its pool cleanup removes it, so `r`
            // is live; we are on the nginx thread.
            unsafe { crate::handler::resume(r) };
        }
    }
}

/// `exit_process`: takes the eventfd out of the event loop and closes it (or nginx logs
/// "open socket left"), and runs the ASGI apps' lifespan shutdown.
///
/// # Safety
/// Called by nginx on the worker's thread as the worker exits.
pub unsafe extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    let Some(worker) = WORKER.with(|w| w.borrow_mut().take()) else {
        return;
    };
    // No waker writes to the descriptor from here on (they take the read lock).
    *worker
        .notifier
        .fd
        .write()
        .unwrap_or_else(|e| e.into_inner()) = None;
    // SAFETY: the connection is ours and live; nginx takes it out of the event loop, closes
    // the eventfd and frees the slot.
    unsafe { ngx_close_connection(worker.conn) };
    worker.dispatcher.shutdown(Duration::from_secs(5));
    // The Python threads are idle or mid-request of a worker that is exiting: leave them to
    // the process exit rather than wait for them.
    std::mem::forget(worker);
}
