//! `portico pool --watchdog`: a small process that runs the pool server as its child and
//! starts it again when it dies, as Passenger's watchdog does for its core. The nginx module
//! starts its pool this way: nginx's master has no hook to restart a helper process, and the
//! pool server, which holds the sockets every nginx worker connects to, must not stay dead
//! until the next reload.
//!
//! The watchdog runs no app code and has one thread, which waits in `poll` on a signalfd,
//! the pool server's notify socket and the lifeline, so what would kill the pool server (a
//! bug, the OOM killer, a stray `kill -9`) is unlikely to kill it too.
//!
//! - Signals: SIGHUP is passed on (a reload); SIGTERM and SIGINT are passed on and the
//!   watchdog exits with the pool server's status once it has stopped.
//! - A pool server that fails before it is ready the first time ends the watchdog with its
//!   status, so a pool that cannot start fails nginx's start as before. After that, a pool
//!   server that dies (a signal, or an exit other than 0) is started again at once; while
//!   new ones keep dying within 10 s of their start, after 100 ms, doubling up to 10 s, so
//!   a crash at start-up is no spawn storm. One that exits with 0 stopped because it was told
//!   to (its lifeline, a signal): the watchdog stops too.
//! - Readiness comes over sd_notify(3)'s protocol: the child gets a `NOTIFY_SOCKET` of the
//!   watchdog's, and what it says there is passed on to systemd when the watchdog has a
//!   `NOTIFY_SOCKET` of its own (from the watchdog's pid, as `NotifyAccess=main` wants). The
//!   socket is read before the signals each time round, so a `READY=1` sent just before a
//!   crash is counted before the crash is. Only the running pool server is heard: the
//!   kernel names each sender (SO_PASSCRED), and what anyone else sends is dropped.
//! - The listening sockets outlive a pool server: each one hands its sockets over once they
//!   listen (`FDSTORE=1` with the descriptors, as to systemd's fd store) and the watchdog
//!   gives them to the next (sd_listen_fds(3): `LISTEN_FDS` from descriptor 3, `LISTEN_PID`).
//!   Hosts that connect meanwhile wait in the sockets' queues instead of being refused.
//! - The lifeline (`--lifeline-fd`) is handed down to each pool server; the watchdog watches
//!   it too, so it goes with nginx even while no pool server runs.

use crate::pool_cmd::SD_LISTEN_FDS_START;
use portico_core::pool::describe_exit;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

/// The pause before the second of several quick restarts (the first is at once).
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest pause between restarts.
const LONGEST_DELAY: Duration = Duration::from_secs(10);
/// A pool server that lived this long was healthy: if it dies, the next starts at once.
const STABLE: Duration = Duration::from_secs(10);

/// The running pool server, and when it started.
struct Running {
    child: Child,
    started: Instant,
}

/// Runs the pool server (`child_args` after `portico pool`) under the watchdog until it
/// stops for good; returns its exit status.
pub(crate) fn run(
    child_args: Vec<OsString>,
    lifeline_fd: Option<i32>,
    socket_dir: Option<PathBuf>,
) -> ExitCode {
    let fail = |what: &str, e: std::io::Error| {
        eprintln!("portico pool --watchdog: {what}: {e}");
        ExitCode::from(crate::EXIT_APP)
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return fail("cannot find my own executable", e),
    };
    let signals = match block_signals() {
        Ok(fd) => fd,
        Err(e) => return fail("signalfd", e),
    };
    let notify_name = format!("portico-watchdog-{}", std::process::id());
    // An abstract name has no permissions: anyone may send to it. Each message carries its
    // sender's pid (SO_PASSCRED), and only the running pool server's are heard, as systemd's
    // `NotifyAccess=main` hears only the main process.
    let notify = match SocketAddr::from_abstract_name(notify_name.as_bytes())
        .and_then(|addr| UnixDatagram::bind_addr(&addr))
        .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
        .and_then(|socket| {
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::PassCred, &true)
                .map(|()| socket)
                .map_err(std::io::Error::from)
        }) {
        Ok(socket) => socket,
        Err(e) => return fail("cannot open its notify socket", e),
    };
    let upstream = std::env::var_os("NOTIFY_SOCKET");
    // Sockets from systemd's socket activation start the store; each pool server then
    // hands over its own (the same ones, or those it bound).
    let mut store = Store::activated(crate::pool_cmd::listen_fds(), socket_dir);
    // The pool servers' environment is this process's own, not Command::env: with that,
    // std would exec with an environment built before fork, and the LISTEN_PID that only the
    // child can know (its pid) could not be added to it. No other thread of this process
    // reads the environment (under nginx, the error log's thread runs, and reads none).
    std::env::set_var("NOTIFY_SOCKET", format!("@{notify_name}"));
    std::env::set_var("FDSTORE", STORE_ROOM.to_string());
    let lifeline_fd = match lifeline_fd.map(move_out_of_the_way).transpose() {
        Ok(fd) => fd,
        Err(e) => return fail("cannot keep the lifeline", e),
    };
    let start = |store: &[OwnedFd]| {
        let mut command = Command::new(&exe);
        command.arg("pool").args(&child_args);
        if let Some(fd) = lifeline_fd {
            command.args(["--lifeline-fd".to_owned(), fd.to_string()]);
        }
        let stored: Vec<i32> = store.iter().map(|fd| fd.as_raw_fd()).collect();
        let count = std::ffi::CString::new(stored.len().to_string()).unwrap_or_default();
        // The numbers the child's dup2s will take are held until the spawn is done, so that
        // std's own pipe (which reports a failed exec) cannot be given one of them.
        let _held = hold_fds(SD_LISTEN_FDS_START + stored.len() as i32)?;
        // SAFETY: runs between fork and exec, in the child of a process with one thread, so
        // no lock (malloc's, the environment's) can be held by another thread: fcntl, dup2,
        // getpid, sigemptyset, sigaddset and sigprocmask are async-signal-safe, and setenv
        // (which allocates) only touches this child's copy of the environment.
        unsafe {
            command.pre_exec(move || {
                if let Some(fd) = lifeline_fd {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                hand_down(&stored, &count)?;
                // Stop signals stay blocked across exec (std's spawn clears the mask) until
                // the pool server's sigwait takes them: one sent early is late, not fatal.
                let mut stops: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut stops);
                for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
                    libc::sigaddset(&mut stops, sig);
                }
                libc::sigprocmask(libc::SIG_SETMASK, &stops, std::ptr::null_mut());
                Ok(())
            });
        }
        command.spawn().map(|child| Running {
            child,
            started: Instant::now(),
        })
    };

    let mut running = match start(&store.fds) {
        Ok(running) => Some(running),
        Err(e) => return fail("cannot start the pool server", e),
    };
    let mut ready = false;
    let mut delay = Duration::ZERO;
    let mut restart_at: Option<Instant> = None;
    let mut stopping = false;
    let mut lifeline = lifeline_fd;
    loop {
        let timeout = restart_at.map(|at| at.saturating_duration_since(Instant::now()));
        let woken = wait(&signals, &notify, lifeline, timeout);

        // What the pool server said first: it was sent before anything that followed it.
        // (It is read while the pool server is still `running`: its SIGCHLD comes later.)
        while let Some(Message {
            text,
            mut fds,
            sender,
        }) = receive(&notify)
        {
            let pool_server = running.as_ref().map(|r| r.child.id() as i32);
            if sender.is_none() || sender != pool_server {
                // Its descriptors, if any, are closed as `fds` drops.
                log::warn!(
                    "watchdog: ignored a notification from {}: only the pool server may send one",
                    sender.map_or("an unknown process".to_owned(), |pid| format!("pid {pid}"))
                );
                continue;
            }
            let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
            if lines.contains(&&b"READY=1"[..]) {
                ready = true;
            }
            if lines.contains(&&b"FDSTOREREMOVE=1"[..]) {
                store.fds.clear();
            }
            if lines.contains(&&b"FDSTORE=1"[..]) {
                // The newest pool server's sockets replace what the store held.
                if fds.len() > STORE_ROOM {
                    log::warn!("watchdog: only the first {STORE_ROOM} sockets are kept");
                    fds.truncate(STORE_ROOM);
                }
                store.fds = fds;
            }
            // The store is the watchdog's own; the rest is passed on.
            let rest: Vec<&[u8]> = lines
                .into_iter()
                .filter(|l| !is_store_line(l) && !l.is_empty())
                .collect();
            if !rest.is_empty() {
                crate::pool_cmd::notify_systemd_raw(upstream.as_deref(), &rest.join(&b'\n'));
            }
        }
        if let Some(fd) = lifeline.filter(|_| woken.lifeline) {
            if lifeline_closed(fd) {
                log::info!("the processes that started this pool are gone: stopping");
                lifeline = None;
                stopping = true;
                match &running {
                    Some(r) => pass_on(&r.child, libc::SIGTERM),
                    None => return ExitCode::SUCCESS,
                }
            }
        }
        for sig in read_signals(&signals) {
            match sig {
                libc::SIGHUP => {
                    if let Some(r) = &running {
                        pass_on(&r.child, libc::SIGHUP);
                    }
                }
                libc::SIGTERM | libc::SIGINT => {
                    stopping = true;
                    match &running {
                        Some(r) => pass_on(&r.child, sig),
                        None => return ExitCode::SUCCESS,
                    }
                }
                _ => {
                    // SIGCHLD: the pool server's status, if it is the one that changed.
                    let Some(r) = &mut running else {
                        continue;
                    };
                    let status = match r.child.try_wait() {
                        Ok(Some(status)) => status,
                        Ok(None) => continue,
                        Err(e) => {
                            log::error!("watchdog: cannot wait for the pool server: {e}");
                            continue;
                        }
                    };
                    let (pid, lived) = (r.child.id(), r.started.elapsed());
                    running = None;
                    if stopping || status.success() {
                        return exit_code(status);
                    }
                    if !ready {
                        // Never served: a configuration or app that cannot start. Restarting
                        // would only repeat it; the one who started us hears of it instead.
                        log::error!(
                            "watchdog: the pool server {pid} {} before it was ready",
                            describe_exit(status)
                        );
                        return exit_code(status);
                    }
                    if lived >= STABLE {
                        delay = Duration::ZERO;
                    }
                    let when = match delay.is_zero() {
                        true => "now".to_owned(),
                        false => format!("in {delay:?}"),
                    };
                    let ended = format!("pool server {pid} {}", describe_exit(status));
                    log::error!("watchdog: the {ended}; starting another {when}");
                    // The next pool server starts with empty pools: it keeps this in their
                    // events, so that the status still shows why it is there.
                    std::env::set_var(crate::pool_cmd::REPLACES_ENV, ended);
                    restart_at = Some(Instant::now() + delay);
                    delay = next_delay(delay);
                }
            }
        }
        if restart_at.is_some_and(|at| at <= Instant::now()) && !stopping {
            restart_at = None;
            match start(&store.fds) {
                Ok(fresh) => {
                    log::info!("watchdog: pool server {} started", fresh.child.id());
                    running = Some(fresh);
                }
                Err(e) => {
                    log::error!("watchdog: cannot start the pool server: {e}");
                    restart_at = Some(Instant::now() + delay);
                    delay = next_delay(delay);
                }
            }
        }
    }
}

/// The listening sockets the pool servers hand over (`FDSTORE=1`), kept open while the next
/// one starts. When the watchdog ends, it removes their files (and nginx's socket
/// directory), which pool servers leave to it; not those of sockets from systemd's socket
/// activation, whose unit owns them.
struct Store {
    fds: Vec<OwnedFd>,
    activated: Vec<PathBuf>,
    socket_dir: Option<PathBuf>,
}

impl Store {
    fn activated(listeners: Vec<UnixListener>, socket_dir: Option<PathBuf>) -> Store {
        if listeners.len() > STORE_ROOM {
            log::warn!("LISTEN_FDS: only the first {STORE_ROOM} sockets are kept");
        }
        let fds: Vec<OwnedFd> = listeners
            .into_iter()
            .take(STORE_ROOM)
            .map(OwnedFd::from)
            .collect();
        Store {
            activated: fds.iter().filter_map(socket_path).collect(),
            fds,
            socket_dir,
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        for path in self.fds.iter().filter_map(socket_path) {
            if !self.activated.contains(&path) {
                let _ = std::fs::remove_file(path);
            }
        }
        if let Some(dir) = &self.socket_dir {
            // Ours when nginx made it for us; left alone if anything else is in it.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The path a listening socket is bound to.
fn socket_path(fd: &OwnedFd) -> Option<PathBuf> {
    let addr = nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(fd.as_raw_fd()).ok()?;
    addr.path().map(|p| p.to_owned())
}

/// How many sockets a pool server may hand over (`FDSTORE`): one per app.
const STORE_ROOM: usize = 64;

/// Where [`move_out_of_the_way`] puts a descriptor: above those a pool server is given.
const FIRST_FREE_FD: i32 = SD_LISTEN_FDS_START + STORE_ROOM as i32;

/// Moves `fd` to a number at or above [`FIRST_FREE_FD`] (close-on-exec), so that handing
/// down the stored sockets, from 3 on, never lands on it; returns the new number.
fn move_out_of_the_way(fd: i32) -> std::io::Result<i32> {
    if fd >= FIRST_FREE_FD {
        // SAFETY: fcntl marks the descriptor we were given close-on-exec: only a pool server
        // inherits it (its pre_exec clears the flag again), never anything else we start.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor of the one we were given, at the lowest
    // free number from FIRST_FREE_FD, and closing the old number leaves the new one open.
    unsafe {
        let moved = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, FIRST_FREE_FD);
        if moved < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::close(fd);
        Ok(moved)
    }
}

/// In a pool server between fork and exec: the stored sockets become descriptors 3, 4, ...
/// with `LISTEN_FDS` and `LISTEN_PID` as sd_listen_fds(3) wants them. Only `setenv`
/// allocates, which is safe in the child of a process with one thread.
fn hand_down(stored: &[i32], count: &std::ffi::CStr) -> std::io::Result<()> {
    if stored.is_empty() {
        return Ok(());
    }
    let err = std::io::Error::last_os_error;
    let mut moved = [0i32; STORE_ROOM];
    for (slot, &fd) in moved.iter_mut().zip(stored) {
        // SAFETY: duplicates our own descriptor above the target range first, so that
        // the dup2s below never overwrite one that is still to be placed.
        *slot = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, FIRST_FREE_FD) };
        if *slot < 0 {
            return Err(err());
        }
    }
    for (i, &fd) in moved.iter().take(stored.len()).enumerate() {
        // SAFETY: dup2 onto 3 + i, which the exec'd pool server inherits (dup2 clears
        // close-on-exec); what was there is the child's copy of a watchdog descriptor.
        if unsafe { libc::dup2(fd, SD_LISTEN_FDS_START + i as i32) } < 0 {
            return Err(err());
        }
    }
    let mut pid = [0u8; 12];
    // SAFETY: getpid cannot fail.
    let mut n = unsafe { libc::getpid() } as u32;
    let mut at = pid.len() - 1; // the last byte stays the terminating NUL
    loop {
        at -= 1;
        pid[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // SAFETY: NUL-terminated names and values that live through the calls.
    unsafe {
        if libc::setenv(c"LISTEN_FDS".as_ptr(), count.as_ptr(), 1) < 0
            || libc::setenv(c"LISTEN_PID".as_ptr(), pid[at..].as_ptr().cast(), 1) < 0
        {
            return Err(err());
        }
    }
    Ok(())
}

/// Whether a line of a notification is about the fd store, which is the watchdog's own and
/// is not passed on to systemd.
fn is_store_line(line: &[u8]) -> bool {
    line == b"FDSTORE=1" || line == b"FDSTOREREMOVE=1" || line.starts_with(b"FDNAME=")
}

/// One message of the notify socket.
struct Message {
    text: Vec<u8>,
    /// The descriptors that came with it (`FDSTORE=1`); closed unless kept.
    fds: Vec<OwnedFd>,
    /// Who sent it, as the kernel tells (SO_PASSCRED); `None` if it did not.
    sender: Option<i32>,
}

/// The most descriptors one message can carry (the kernel's SCM_MAX_FD).
const MOST_FDS_PER_MESSAGE: usize = 253;

/// The next message of the notify socket; `None` when none is waiting. The control buffer
/// has room for every descriptor a message can carry, so none is ever cut off (and left
/// open in this process, unowned).
fn receive(notify: &UnixDatagram) -> Option<Message> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr, UnixCredentials};
    let mut buf = [0u8; 4096];
    let mut space = nix::cmsg_space!([i32; MOST_FDS_PER_MESSAGE], UnixCredentials);
    let mut message = Message {
        text: Vec::new(),
        fds: Vec::new(),
        sender: None,
    };
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let received = recvmsg::<UnixAddr>(
        notify.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .ok()?;
    let (length, truncated) = (
        received.bytes,
        received.flags.contains(MsgFlags::MSG_CTRUNC),
    );
    if let Ok(cmsgs) = received.cmsgs() {
        for cmsg in cmsgs {
            match cmsg {
                ControlMessageOwned::ScmRights(raw) => {
                    // SAFETY: the kernel has just installed these descriptors in this
                    // process for this message; each is owned once, here.
                    message.fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
                ControlMessageOwned::ScmCredentials(credentials) => {
                    message.sender = Some(credentials.pid());
                }
                _ => {}
            }
        }
    }
    if truncated {
        // Cannot happen with the room above; were it to, a cut message is not trusted.
        message.sender = None;
    }
    message.text = buf[..length].to_vec();
    Some(message)
}

/// Takes every free descriptor number below `end` (from 3), with /dev/null, until the
/// returned files are dropped: what opens descriptors meanwhile gets numbers from `end` on.
fn hold_fds(end: i32) -> std::io::Result<Vec<std::fs::File>> {
    let mut held = Vec::new();
    loop {
        let file = std::fs::File::open("/dev/null")?;
        if file.as_raw_fd() >= end {
            return Ok(held);
        }
        held.push(file);
    }
}

/// The pause after `delay`, for a pool server that died young again.
fn next_delay(delay: Duration) -> Duration {
    (delay * 2).clamp(FIRST_DELAY, LONGEST_DELAY)
}

/// Blocks the signals the watchdog handles and returns a signalfd that reads them.
fn block_signals() -> std::io::Result<OwnedFd> {
    // SAFETY: a signal set on the stack, filled by sigemptyset/sigaddset, given to
    // pthread_sigmask for this (the only) thread, then to signalfd, which returns a new
    // descriptor that we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// What woke [`wait`] up, besides the signalfd and the notify socket (always read).
struct Woken {
    lifeline: bool,
}

/// Waits until a signal, a notification or the lifeline is there, or `timeout` has passed.
fn wait(
    signals: &OwnedFd,
    notify: &UnixDatagram,
    lifeline: Option<i32>,
    timeout: Option<Duration>,
) -> Woken {
    let mut fds = vec![
        libc::pollfd {
            fd: signals.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: notify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    if let Some(fd) = lifeline {
        fds.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
    }
    let millis = timeout.map_or(-1, |t| {
        i32::try_from(t.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
    });
    // SAFETY: poll reads and writes `fds.len()` live pollfd entries.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
    Woken {
        lifeline: n > 0 && fds.get(2).is_some_and(|p| p.revents != 0),
    }
}

/// The signals waiting on the signalfd (none when it would block).
fn read_signals(signals: &OwnedFd) -> Vec<i32> {
    let mut got = Vec::new();
    loop {
        // SAFETY: signalfd_siginfo is a plain C struct; zeroed is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, from our own signalfd.
        let n = unsafe {
            libc::read(
                signals.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n != size as isize {
            return got;
        }
        got.push(info.ssi_signo as i32);
    }
}

/// Whether the lifeline reads end-of-file (or fails) now that poll says it is readable.
fn lifeline_closed(fd: i32) -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: reads at most one byte into a live buffer, from the descriptor we were given.
    let n = unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
    n == 0 || (n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted)
}

fn pass_on(child: &Child, sig: i32) {
    // SAFETY: kill() only sends a signal, to the pool server we started and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// The watchdog's own exit: the pool server's code, or 128 + the signal that ended it.
fn exit_code(status: ExitStatus) -> ExitCode {
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (_, Some(sig)) => 128 + sig,
        _ => 1,
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_slow_down_while_pool_servers_keep_dying_young() {
        let mut delay = Duration::ZERO;
        let mut pauses = Vec::new();
        for _ in 0..9 {
            pauses.push(delay.as_millis());
            delay = next_delay(delay);
        }
        assert_eq!(pauses, [0, 100, 200, 400, 800, 1600, 3200, 6400, 10000]);
    }
}
