//! The pool nginx starts: the apps with `mode = "pool"` and no `pool_socket` run in a
//! `portico pool` process that the master starts, as Passenger's module starts its watchdog.
//! The workers connect to it on Unix sockets in a private directory; it starts, recycles and
//! restarts the app's worker processes itself.
//!
//! - Start: `init_module` in the master, once the configuration is read (not for `nginx -t`
//!   or `nginx -s`). It waits until every socket is there, so the first request finds the
//!   pool; a pool that cannot start (an app that does not import) fails the start, or the
//!   reload, which leaves the running configuration in place.
//! - Reload (`nginx -s reload`): the same pooled apps with the same settings get a SIGHUP:
//!   a new generation of workers loads the code as it is now, the old one finishes its
//!   requests. Other settings start a new pool server for the new nginx workers; the old one
//!   serves the old workers until the last of them exits (see [`retire`]).
//! - Crashed nginx workers do not touch it: the master forks new ones, which connect again.
//!   A crashed pool server is started again by its watchdog (`portico pool --watchdog`, the
//!   process the master starts and signals), since nginx has no hook to restart a helper.
//! - Stop: `exit_master` stops the pool and waits for it, so nginx is gone only after its
//!   apps' lifespan shutdown. Should no hook run (nginx killed outright), the lifeline does
//!   it: every nginx process holds the write end of a pipe whose read end the pool server
//!   watches; when the last of them exits, it reads end-of-file and stops. A pipe rather
//!   than a parent-death signal, because the master that daemonizes is not the process that
//!   started the pool.
//!
//! All of this runs on the master's one thread, while it (re)reads its configuration.

use crate::config::MainConf;
use crate::PorticoModule;
use nginx_sys::{ngx_cycle_t, ngx_int_t, NGX_ERROR, NGX_LOG_EMERG, NGX_LOG_NOTICE, NGX_OK};
use ngx::http::HttpModuleMainConf;
use portico_config::{AppConfig, Mode};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The descriptor the pool server finds its end of the lifeline on.
const LIFELINE_FD: i32 = 3;

/// The pool server this master started, kept across reloads (the module stays loaded).
struct Running {
    child: Child,
    /// Where its sockets are.
    dir: PathBuf,
    /// What it was started for: a reload that asks for the same reuses it.
    plan: Plan,
    /// Our end of the lifeline; closed when it is replaced.
    _lifeline: OwnedFd,
}

impl Running {
    /// Whether the pool server still runs.
    fn is_alive(&mut self) -> bool {
        match self.child.try_wait() {
            Ok(None) => true,
            Ok(Some(_)) => false,
            // Reaped by nginx's own SIGCHLD handler, or not our child any more (the master
            // daemonized after starting it): ask the kernel.
            // SAFETY: kill() with signal 0 only checks that the process exists.
            Err(_) => unsafe { libc::kill(self.child.id() as i32, 0) == 0 },
        }
    }
}

/// What a pool server is started with.
#[derive(PartialEq)]
struct Plan {
    binary: PathBuf,
    config_file: PathBuf,
    apps: Vec<AppConfig>,
    identity: Option<(u32, u32)>,
    /// Its whole environment: nginx's workers' (see [`start`]).
    environment: Vec<(OsString, OsString)>,
}

static RUNNING: Mutex<Option<Running>> = Mutex::new(None);

/// The socket directory of the running pool server, for the workers (forked after this).
pub fn socket_dir() -> Option<PathBuf> {
    RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|r| r.dir.clone())
}

/// Whether an app is one the pool nginx starts runs.
pub fn is_managed(app: &AppConfig) -> bool {
    app.mode == Mode::Pool && app.pool_socket.is_none()
}

/// `init_module`: starts, reloads or replaces the pool server for this configuration.
///
/// # Safety
/// Called by nginx in the master (or single) process with the cycle just configured.
pub unsafe extern "C" fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: written only by nginx's startup code, on this thread.
    let (testing, process) = unsafe { (nginx_sys::ngx_test_config, nginx_sys::ngx_process) };
    if testing != 0 || process == nginx_sys::NGX_PROCESS_SIGNALLER as usize {
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: the cycle is live; the http module's main configuration holds ours when there
    // is an `http` block.
    let Some(main) = (unsafe { PorticoModule::main_conf(&*cycle) }) else {
        return NGX_OK as ngx_int_t;
    };
    let main: &MainConf = main;
    // SAFETY: the new cycle's log is set up before modules are initialized.
    let log = unsafe { (*cycle).log };
    let mut apps: Vec<AppConfig> = Vec::new();
    for entry in main.apps.iter().filter(|e| is_managed(&e.config)) {
        if !apps.iter().any(|a| a.name == entry.toml_name) {
            let mut app = entry.config.clone();
            app.name = entry.toml_name.clone();
            apps.push(app);
        }
    }
    let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    let Some(config_file) = main
        .config
        .as_ref()
        .map(|c| c.file.clone())
        .filter(|_| !apps.is_empty())
    else {
        // No pooled app any more: a pool left from before goes.
        if let Some(old) = running.take() {
            retire(old);
        }
        return NGX_OK as ngx_int_t;
    };
    let plan = Plan {
        binary: main
            .pool_binary
            .clone()
            .unwrap_or_else(|| PathBuf::from("portico")),
        config_file,
        apps,
        identity: main.pool_identity,
        // SAFETY: the cycle's log is live (see above).
        environment: pool_environment(main, unsafe { (*log).log_level }, unsafe {
            error_log_path(log)
        }),
    };
    if let Some(current) = running.as_mut() {
        if current.is_alive() && current.plan == plan {
            ngx::ngx_log_error!(
                NGX_LOG_NOTICE,
                log,
                "portico: reloading the pool (pid {}): a new generation of workers takes over",
                current.child.id()
            );
            signal(&current.child, libc::SIGHUP);
            return NGX_OK as ngx_int_t;
        }
    }
    // SAFETY: the log's file is the error log nginx opened for this cycle.
    let stderr = unsafe { error_log_fd(log) };
    match start(plan, stderr) {
        Ok(fresh) => {
            ngx::ngx_log_error!(
                NGX_LOG_NOTICE,
                log,
                "portico: the pool (watchdog {}) serves the pooled apps at {}",
                fresh.child.id(),
                fresh.dir.display()
            );
            if let Some(old) = running.replace(fresh) {
                retire(old);
            }
            NGX_OK as ngx_int_t
        }
        Err(why) => {
            ngx::ngx_log_error!(
                NGX_LOG_EMERG,
                log,
                "portico: the pool cannot start: {}",
                why
            );
            NGX_ERROR as ngx_int_t
        }
    }
}

/// `exit_master`: nginx stops; so does its pool, after the requests it has (up to the
/// apps' `graceful_timeout`): the ASGI apps get their lifespan shutdown before nginx is
/// gone. (The lifeline would stop it too, but nginx would not wait for it.)
///
/// # Safety
/// Called by nginx in the master as it exits.
pub unsafe extern "C" fn exit_master(_cycle: *mut ngx_cycle_t) {
    let Some(mut running) = RUNNING.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    signal(&running.child, libc::SIGTERM);
    let limit = running
        .plan
        .apps
        .iter()
        .filter_map(|a| a.graceful_timeout.as_limit())
        .max()
        .unwrap_or(Duration::from_secs(30))
        // As `Pool::stop` waits: the requests, then the app calls still running, then the
        // lifespan shutdown, each up to graceful_timeout, then SIGTERM and SIGKILL.
        * 3
        + Duration::from_secs(10);
    let started = Instant::now();
    while started.elapsed() < limit {
        if !running.is_alive() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pool server's environment, and through it its workers': what nginx gives its own
/// workers (its `env` directives, and TZ), so that a pooled app sees what an in-process one
/// sees and nothing of the shell that started nginx; with `PORTICO_LOG` at the `error_log`
/// level unless nginx's `env` sets one.
fn pool_environment(
    main: &MainConf,
    log_level: usize,
    error_log: Option<PathBuf>,
) -> Vec<(OsString, OsString)> {
    let mut environment = main.pool_environment.clone();
    // The file its standard error goes to, which it follows through `nginx -s reopen`.
    if let Some(path) = error_log {
        environment.push(("PORTICO_ERROR_LOG".into(), path.into()));
    }
    if !environment.iter().any(|(k, _)| k == "PORTICO_LOG") {
        let level = crate::log_sink::filter_for(log_level)
            .as_str()
            .to_lowercase();
        environment.push(("PORTICO_LOG".into(), level.into()));
    }
    environment.push((
        "PORTICO_SERVER_SOFTWARE".into(),
        format!("nginx portico/{}", env!("CARGO_PKG_VERSION")).into(),
    ));
    environment
}

/// What starting a pool server needs, short of starting it: the `portico` program
/// (`portico_pool_binary`, else `portico` on the `PATH`), `portico-worker` beside the file it
/// resolves to (where `portico pool` looks for it), and a temporary directory (`TMPDIR`) to
/// make the sockets' directory in.
pub(crate) fn check_prerequisites(binary: Option<&Path>) -> Result<(), String> {
    let program = match binary {
        Some(binary) => binary.to_path_buf(),
        None => {
            let found = resolve_binary(Path::new("portico"));
            // Not found, `found` is the bare name, which `is_file` would look for in the
            // current directory: whatever directory `nginx -t` happens to run in.
            if !found.is_absolute() || !found.is_file() {
                return Err("the pooled apps need the `portico` program, and there is none at \"portico\" in the PATH (set portico_pool_binary)".into());
            }
            found
        }
    };
    // `portico pool` finds its worker beside its own executable, links resolved.
    let real = std::fs::canonicalize(&program).unwrap_or(program.clone());
    let worker = real.with_file_name("portico-worker");
    if !worker.is_file() {
        return Err(format!(
            "the pooled apps need `portico-worker` beside \"{}\", and there is none at \"{}\"",
            program.display(),
            worker.display()
        ));
    }
    let tmp = std::env::temp_dir();
    let usable = std::ffi::CString::new(tmp.as_os_str().as_encoded_bytes())
        .ok()
        // SAFETY: access() only reads the NUL-terminated path.
        .is_some_and(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0);
    if !tmp.is_dir() || !usable {
        return Err(format!(
            "the pool's sockets go in a directory made in {} (TMPDIR), which is not a directory this process can write to",
            tmp.display()
        ));
    }
    Ok(())
}

/// `binary` as a path the child can be started from without a `PATH` of its own: a bare
/// name is looked up in the master's `PATH`, as a shell would.
pub(crate) fn resolve_binary(binary: &Path) -> PathBuf {
    if binary.components().count() != 1 {
        return binary.to_path_buf();
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| binary.to_path_buf())
}

/// The path of nginx's error log file, when it is a file (not `stderr` or syslog).
///
/// # Safety
/// `log` must be a live nginx log.
unsafe fn error_log_path(log: *mut nginx_sys::ngx_log_t) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: a live log's `file` is null or an open file of the cycle, whose name is
    // `len` bytes at `data`.
    let name = unsafe {
        let file = (*log).file;
        if file.is_null() || (*file).name.data.is_null() {
            return None;
        }
        std::slice::from_raw_parts((*file).name.data, (*file).name.len)
    };
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(name));
    path.is_absolute().then_some(path)
}

/// A descriptor for the child's standard error: a copy of nginx's error log.
///
/// # Safety
/// `log` must be a live nginx log.
unsafe fn error_log_fd(log: *mut nginx_sys::ngx_log_t) -> Option<OwnedFd> {
    // SAFETY: a live log's `file` is null or an open file of the cycle.
    let fd = unsafe {
        let file = (*log).file;
        if file.is_null() {
            return None;
        }
        (*file).fd
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: dup of a descriptor nginx keeps open; the copy is ours.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    // SAFETY: `copy` is a fresh descriptor nothing else owns.
    (copy >= 0).then(|| unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Starts a pool server and waits until each app's socket is there. A start that fails
/// leaves no socket directory behind.
fn start(plan: Plan, stderr: Option<OwnedFd>) -> Result<Running, String> {
    let dir = make_socket_dir(plan.identity)?;
    launch(plan, stderr, dir.clone()).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&dir);
    })
}

/// [`start`] with its socket directory made.
fn launch(plan: Plan, stderr: Option<OwnedFd>, dir: PathBuf) -> Result<Running, String> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are fresh and ours.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut command = Command::new(resolve_binary(&plan.binary));
    command
        .arg("pool")
        .arg("--watchdog")
        .arg("--config")
        .arg(&plan.config_file)
        .arg("--socket-dir")
        .arg(&dir)
        .arg("--lifeline-fd")
        .arg(LIFELINE_FD.to_string())
        .env_clear()
        .envs(plan.environment.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    for app in &plan.apps {
        command.arg("--app").arg(&app.name);
    }
    if let Some((uid, gid)) = plan.identity {
        command.arg("--user").arg(format!("{uid}:{gid}"));
    }
    // What the apps print goes to the error log with their tracebacks, as Passenger and
    // mod_wsgi send it; never to the terminal or pipe nginx was started from, which may be
    // gone (a print would then fail the request).
    match stderr {
        Some(stderr) => {
            let stdout = stderr
                .try_clone()
                .map_err(|e| format!("cannot copy the error log's descriptor: {e}"))?;
            command
                .stdout(Stdio::from(stdout))
                .stderr(Stdio::from(stderr));
        }
        None => {
            command.stdout(Stdio::null());
        }
    }
    let fd = read_end.as_raw_fd();
    // SAFETY: runs between fork and exec, with the read end open until after the spawn;
    // setsid is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // A session of its own: a Ctrl-C or a `timeout` aimed at the process group that
            // started nginx must not stop the pool of the nginx that daemonized away from it.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            portico_core::pool::prepare_child(fd, LIFELINE_FD)
        });
    }
    let mut child = command.spawn().map_err(|e| {
        format!(
            "cannot run {} (portico_pool_binary): {e}",
            plan.binary.display()
        )
    })?;
    drop(read_end);
    // As long as the slowest app may take to load, and a little more for the server.
    let limit = plan
        .apps
        .iter()
        .filter_map(|a| a.startup_timeout.as_limit())
        .max()
        .unwrap_or(Duration::from_secs(60))
        + Duration::from_secs(5);
    let started = Instant::now();
    let sockets: Vec<PathBuf> = plan
        .apps
        .iter()
        .map(|a| dir.join(format!("{}.sock", a.name)))
        .collect();
    loop {
        if sockets.iter().all(|s| s.exists()) {
            break;
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                return Err(format!(
                    "`{} pool` {status} before it was ready; its error is in the log above",
                    plan.binary.display()
                ));
            }
            Ok(None) if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the pool server was not ready within {limit:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                let _ = child.kill();
                return Err(format!("waiting for the pool server: {e}"));
            }
        }
    }
    Ok(Running {
        child,
        dir,
        plan,
        _lifeline: write_end,
    })
}

/// A private directory for the sockets: only its owner may list it; nginx's workers may
/// reach the sockets in it, which belong to them.
fn make_socket_dir(identity: Option<(u32, u32)>) -> Result<PathBuf, String> {
    let template = std::env::temp_dir().join("portico-nginx-XXXXXX");
    let mut bytes = template.as_os_str().as_encoded_bytes().to_vec();
    bytes.push(0);
    // SAFETY: mkdtemp rewrites the X's of the NUL-terminated template in place.
    let made = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if made.is_null() {
        return Err(format!(
            "cannot create a directory for the pool's sockets in {}: {}",
            std::env::temp_dir().display(),
            std::io::Error::last_os_error()
        ));
    }
    bytes.pop();
    // SAFETY: mkdtemp kept the bytes a path (only X's were replaced, by ASCII).
    let dir = PathBuf::from(unsafe { std::ffi::OsStr::from_encoded_bytes_unchecked(&bytes) });
    if identity.is_some() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(dir)
}

/// A pool server that is no longer wanted. The old nginx workers still use it: they take
/// requests until the master tells them to quit, and finish those they have. So it is not
/// stopped here: the master closes its end of the old lifeline, which the new workers (forked
/// after this) do not inherit, so the old pool server reads end-of-file once the last old
/// worker has exited, and then stops (and removes its socket directory).
fn retire(old: Running) {
    // nginx's master reaps the process when it exits (it waits for any child).
    drop(old);
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill() only sends a signal, to the pool server we started.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}
