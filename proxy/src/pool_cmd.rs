//! `portico pool`: run the pooled apps of a portico.toml on their own, for hosts in other
//! processes (`portico serve` and nginx, with `pool_socket`). systemd runs it as a service;
//! the nginx module starts one for the pooled apps that name no `pool_socket`.
//!
//! Signals: SIGHUP reloads (a new generation of workers), SIGTERM and SIGINT stop it after
//! the requests in flight. With `--lifeline-fd`, end-of-file on that descriptor stops it too:
//! nginx's processes hold the other end, so the pool goes when the last of them does.

use portico_config::{AppConfig, Config, Mode, Routing};
use portico_core::pool::server::PoolServer;
use portico_core::pool::PoolHost;
use portico_core::{Dispatcher, HostInfo};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// What `portico pool` is asked to do.
#[derive(clap::Args)]
pub(crate) struct PoolArgs {
    /// The config file.
    #[arg(long, short)]
    config: PathBuf,
    /// Serve only this app (repeat for several). Default: every app with mode = "pool".
    #[arg(long = "app")]
    apps: Vec<String>,
    /// Where the sockets of apps without `pool_socket` go: DIR/NAME.sock.
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// USER:GROUP (names or numbers) that owns the sockets (only it may connect) and that
    /// workers run as when their app sets no `user`: what nginx passes for its workers'
    /// user.
    #[arg(long)]
    user: Option<String>,
    /// Stop when this descriptor reads end-of-file (the nginx module's lifeline).
    #[arg(long)]
    lifeline_fd: Option<i32>,
    /// Write the process id here (for `kill -HUP`), removed at exit.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Run the pool server as a child and start it again if it dies (what the nginx module
    /// asks for): signals are passed on to it, and its pid file is the watchdog's.
    #[arg(long)]
    watchdog: bool,
}

impl PoolArgs {
    /// The arguments of the pool server a watchdog runs: these, without the watchdog's own
    /// (`--watchdog`, `--pid-file`) and the lifeline, which the watchdog passes on itself.
    fn child_args(&self) -> Vec<std::ffi::OsString> {
        let mut out: Vec<std::ffi::OsString> = vec!["--config".into(), self.config.clone().into()];
        for app in &self.apps {
            out.extend(["--app".into(), app.into()]);
        }
        if let Some(dir) = &self.socket_dir {
            out.extend(["--socket-dir".into(), dir.clone().into()]);
        }
        if let Some(user) = &self.user {
            out.extend(["--user".into(), user.into()]);
        }
        out
    }
}

/// Runs the pool server until it is told to stop.
pub(crate) fn run(args: PoolArgs) -> ExitCode {
    portico_proxy::error_log::follow_from_environment();
    if args.watchdog {
        let _pid_file = match pid_file(&args) {
            Ok(pid_file) => pid_file,
            Err(code) => return code,
        };
        return crate::watchdog::run(args.child_args(), args.lifeline_fd, args.socket_dir);
    }
    // Taken first, so that no descriptor of them leaks into anything this process starts.
    let inherited = listen_fds();
    // Taken before any thread that reads the environment starts (under nginx, the error
    // log's thread runs already, and reads none), and so that no worker's app sees it.
    let replaces = std::env::var(REPLACES_ENV).ok();
    std::env::remove_var(REPLACES_ENV);
    // A pool routes nothing: its hosts did.
    // Before anything may change the working directory.
    // One reading of the file, for this server and its workers alike.
    let loaded = crate::ConfigSnapshot::read(&args.config).and_then(|snapshot| {
        Config::from_text(&snapshot.text(), &args.config, Routing::Elsewhere)
            .map(|config| (config, snapshot))
    });
    let (mut config, config_at_start) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => return crate::config_failed(&e),
    };
    let usage = |message: String| {
        eprintln!("portico pool: {}: {message}", args.config.display());
        ExitCode::from(crate::EXIT_CONFIG)
    };
    for name in &args.apps {
        match config.app.iter().find(|a| &a.name == name) {
            None => return usage(format!("no app named `{name}`")),
            Some(app) if app.mode != Mode::Pool => {
                return usage(format!("app `{name}` is not mode = \"pool\""))
            }
            Some(_) => {}
        }
    }
    let serves = |app: &AppConfig| {
        app.mode == Mode::Pool && (args.apps.is_empty() || args.apps.contains(&app.name))
    };
    config.app.retain(serves);
    if config.app.is_empty() {
        return usage("no app with mode = \"pool\" to serve".into());
    }
    let mut sockets = Vec::new();
    for (i, app) in config.app.iter_mut().enumerate() {
        // Here the pool runs: the app's socket is where it listens, not where to connect.
        let path = match (app.pool_socket.take(), &args.socket_dir) {
            (Some(path), _) => path,
            (None, Some(dir)) => socket_in(dir, &app.name),
            (None, None) => {
                return usage(format!(
                    "app `{}` has no pool_socket (set one, or give --socket-dir)",
                    app.name
                ))
            }
        };
        sockets.push((i, path));
    }
    let owner = match args.user.as_deref().map(parse_ids).transpose() {
        Ok(owner) => owner,
        Err(e) => return usage(format!("--user: {e}")),
    };

    // Signals are taken by sigwait below: blocked before any thread starts, so every thread
    // inherits the mask (SIGHUP is blocked already by main).
    let signals = [libc::SIGHUP, libc::SIGTERM, libc::SIGINT];
    // SAFETY: a signal set on the stack, filled by sigemptyset/sigaddset, given to
    // pthread_sigmask for the calling thread only.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    if let Some(fd) = args.lifeline_fd {
        watch_lifeline(fd);
    }

    let worker_binary = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name("portico-worker"),
        Err(e) => {
            eprintln!("portico pool: cannot find my own executable: {e}");
            return ExitCode::from(crate::EXIT_APP);
        }
    };
    let host = HostInfo {
        // nginx names itself to the pool it starts, for its apps' SERVER_SOFTWARE.
        server_software: std::env::var("PORTICO_SERVER_SOFTWARE")
            .unwrap_or_else(|_| format!("portico/{}", env!("CARGO_PKG_VERSION"))),
        multiprocess: true,
        pool: Some(PoolHost {
            worker_binary,
            config_file: config_at_start.path().to_path_buf(),
            default_identity: owner,
            config_text: config_at_start.text(),
        }),
    };
    let dispatcher = match Dispatcher::load(&config.app, &host) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("portico pool: {e}");
            return ExitCode::from(crate::EXIT_APP);
        }
    };
    let server = match PoolServer::start(dispatcher.clone(), &sockets, owner, inherited) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("portico pool: {e}");
            dispatcher.shutdown(Duration::ZERO);
            return ExitCode::from(crate::EXIT_BIND);
        }
    };
    if store_sockets(&server) {
        server.handed_over();
    }
    if let Some(replaced) = replaces {
        let event = format!(
            "{replaced}; pool server {} started in its place by the watchdog",
            std::process::id()
        );
        dispatcher
            .apps()
            .iter()
            .for_each(|app| app.record_pool_event(&event));
    }
    let _pid_file = match pid_file(&args) {
        Ok(pid_file) => pid_file,
        Err(code) => return code,
    };
    log::info!("pool server {} ready", std::process::id());
    notify_systemd("READY=1");

    loop {
        let mut sig = 0;
        // SAFETY: sigwait reads the set built above and writes the signal number to `sig`.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        if sig != libc::SIGHUP {
            break;
        }
        log::info!("SIGHUP: reloading the pools");
        notify_systemd("RELOADING=1");
        let served: Vec<String> = config.app.iter().map(|a| a.name.clone()).collect();
        let prepare = |next: &mut Config| {
            next.app.retain(serves);
            // Here the pool listens on its sockets (taken from the apps at the start).
            for app in &mut next.app {
                app.pool_socket = None;
            }
        };
        let scope = crate::reload::Scope {
            routing: Routing::Elsewhere,
            prepare: &prepare,
            serves: &|app| served.iter().any(|name| name == app),
            uses_server_table: false,
        };
        crate::reload::reload(&dispatcher, Some(&config_at_start), &scope);
        notify_systemd("READY=1");
    }
    notify_systemd("STOPPING=1");
    server.stop_accepting();
    log::info!("stopping: no new connections; the pools finish their requests");
    let graceful = config
        .app
        .iter()
        .filter_map(|a| a.graceful_timeout.as_limit())
        .max()
        .unwrap_or(Duration::from_secs(30));
    dispatcher.shutdown(graceful + Duration::from_secs(10));
    if let Some(dir) = &args.socket_dir {
        // Ours when nginx made it for us; left alone if anything else is in it.
        let _ = std::fs::remove_dir(dir);
    }
    log::info!("stopped");
    ExitCode::SUCCESS
}

/// Writes `--pid-file` (the watchdog's or the pool server's own pid, whichever runs).
fn pid_file(args: &PoolArgs) -> Result<crate::PidFile, ExitCode> {
    crate::PidFile::write(args.pid_file.as_deref()).map_err(|e| {
        eprintln!("portico pool: --pid-file: {e}");
        ExitCode::from(crate::EXIT_CONFIG)
    })
}

/// Tells systemd (a `Type=notify` service) how the server is doing: READY=1 once every
/// socket listens and every pool has loaded its app, RELOADING=1 and STOPPING=1. Does
/// nothing outside systemd (no `NOTIFY_SOCKET`). The protocol is sd_notify(3)'s: one
/// datagram to the socket named by `NOTIFY_SOCKET` (`@` for the abstract namespace).
fn notify_systemd(state: &str) {
    notify_systemd_raw(
        std::env::var_os("NOTIFY_SOCKET").as_deref(),
        state.as_bytes(),
    );
}

/// Sends `message` to the sd_notify socket `path` (nothing when there is none).
pub(crate) fn notify_systemd_raw(path: Option<&std::ffi::OsStr>, message: &[u8]) {
    if let Err(e) = notify_with_fds(path, message, &[]) {
        // NOTIFY_SOCKET is systemd's, or the watchdog's that started this server (nginx's
        // pools): a refused message there means that watchdog is gone.
        log::warn!(
            "cannot notify the supervisor at NOTIFY_SOCKET ({}; systemd, or the watchdog that \
             started this pool server, which is then gone): {e}",
            String::from_utf8_lossy(message)
        );
    }
}

/// Sends `message` to the sd_notify socket `path`, with `fds` attached (`SCM_RIGHTS`, for
/// `FDSTORE=1`). `path` starting with `@` is in the abstract namespace.
fn notify_with_fds(
    path: Option<&std::ffi::OsStr>,
    message: &[u8],
    fds: &[i32],
) -> Result<(), String> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    use std::os::fd::AsRawFd;
    let Some(path) = path else {
        return Ok(());
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name),
        None => UnixAddr::new(std::path::Path::new(path)),
    }
    .map_err(|e| e.to_string())?;
    let socket = std::os::unix::net::UnixDatagram::unbound().map_err(|e| e.to_string())?;
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg(
        socket.as_raw_fd(),
        &[std::io::IoSlice::new(message)],
        cmsgs,
        MsgFlags::empty(),
        Some(&addr),
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Set by the watchdog for the pool server it starts in place of one that died: how that
/// one ended ("pool server 4120 was killed by signal 9"), for the new pools' events.
pub(crate) const REPLACES_ENV: &str = "PORTICO_POOL_REPLACES";

/// The listening sockets this process was given by sd_listen_fds(3)'s protocol: `LISTEN_FDS`
/// descriptors from 3 on, when `LISTEN_PID` is this process (systemd's socket activation, or
/// the watchdog handing over the sockets of the pool server before this one). The variables
/// are removed, so the workers do not see them; descriptors that are no Unix socket are
/// closed.
pub(crate) fn listen_fds() -> Vec<std::os::unix::net::UnixListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let count = std::env::var("LISTEN_FDS").ok();
    let for_me = std::env::var("LISTEN_PID").ok() == Some(std::process::id().to_string());
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let Some(count) = count.and_then(|n| n.parse::<i32>().ok()).filter(|_| for_me) else {
        return Vec::new();
    };
    let mut listeners = Vec::new();
    for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START.saturating_add(count.clamp(0, 1024)) {
        // SAFETY: LISTEN_PID names this process, so by the protocol the descriptors from 3
        // to 3 + LISTEN_FDS are open and were handed to us alone; fcntl only marks each one
        // close-on-exec, and each is owned once, here.
        let owned = unsafe {
            if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
                log::warn!("LISTEN_FDS: descriptor {fd} is not open");
                continue;
            }
            OwnedFd::from_raw_fd(fd)
        };
        let listener = std::os::unix::net::UnixListener::from(owned);
        match listener.local_addr() {
            Ok(addr) if addr.as_pathname().is_some() => listeners.push(listener),
            _ => log::warn!("LISTEN_FDS: descriptor {fd} is no Unix socket with a path: closed"),
        }
    }
    listeners
}

/// The first descriptor of sd_listen_fds(3).
pub(crate) const SD_LISTEN_FDS_START: i32 = 3;

/// The name the pool server gives its sockets in the fd store (`FDNAME=`).
pub(crate) const FDSTORE_NAME: &str = "portico-pool";

/// Hands the listening sockets to the service manager's fd store (sd_notify(3)'s `FDSTORE=1`,
/// with the descriptors attached) when it has one: systemd sets `FDSTORE` to its size when a
/// unit has `FileDescriptorStoreMax=`, and the watchdog does. The next pool server gets them
/// back as `LISTEN_FDS`, so no host is refused while none runs. Those stored before under
/// the same name are removed first (`FDSTOREREMOVE=1`). Whether they were taken.
fn store_sockets(server: &PoolServer) -> bool {
    use std::os::fd::AsRawFd;
    let room = std::env::var("FDSTORE")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|_| room > 0) else {
        return false;
    };
    let fds: Vec<i32> = server.listeners().iter().map(|fd| fd.as_raw_fd()).collect();
    if fds.len() > room {
        log::warn!(
            "the fd store has room for {room} sockets, not {}: not handing them over",
            fds.len()
        );
        return false;
    }
    // What an earlier pool server stored goes first: a socket this one no longer serves
    // (its `pool_socket` changed) must not be handed to the next one forever.
    let forget = format!("FDSTOREREMOVE=1\nFDNAME={FDSTORE_NAME}");
    let message = format!("FDSTORE=1\nFDNAME={FDSTORE_NAME}");
    match notify_with_fds(Some(&path), forget.as_bytes(), &[])
        .and_then(|()| notify_with_fds(Some(&path), message.as_bytes(), &fds))
    {
        Ok(()) => true,
        Err(e) => {
            log::warn!("cannot hand the sockets to the fd store: {e}");
            false
        }
    }
}

/// `USER:GROUP` or `USER`, each a name or a number, as the config's `user` and `group` are
/// read (and chown(1) reads its argument): a bare user means its primary group; a bare
/// number, the group of the same number, which is what nginx passes for its workers.
fn parse_ids(text: &str) -> Result<(u32, u32), String> {
    let (user, group) = match text.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (text, None),
    };
    let (uid, primary) = portico_config::lookup_user(user)?;
    let gid = match group {
        Some(group) => portico_config::lookup_group(group)?,
        None if user.parse::<u32>().is_ok() => uid,
        None => primary,
    };
    Ok((uid, gid))
}

/// A thread that stops the server (SIGTERM to itself) when `fd` reads end-of-file.
fn watch_lifeline(fd: i32) {
    let spawned = std::thread::Builder::new()
        .name("lifeline".into())
        .spawn(move || {
            // SAFETY: fcntl on the descriptor we were given: workers must not inherit it.
            unsafe {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
            let mut byte = [0u8; 1];
            loop {
                // SAFETY: reads at most one byte into a live buffer from the descriptor we
                // were given, which nothing else in this process uses.
                let n = unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
                if n < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                if n <= 0 {
                    break;
                }
            }
            log::info!("the processes that started this pool are gone: stopping");
            // SAFETY: kill() sends SIGTERM to this very process, which sigwait takes.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGTERM);
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the lifeline thread: {e}");
    }
}

/// The socket of an app without `pool_socket`, in the `--socket-dir` of its pool server.
pub(crate) fn socket_in(dir: &std::path::Path, app: &str) -> PathBuf {
    dir.join(format!("{app}.sock"))
}
