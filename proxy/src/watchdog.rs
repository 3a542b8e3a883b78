//! `portico pool --watchdog`: a small process that runs the pool server as its child and
//! starts it again when it dies, as Passenger's watchdog does for its core. The nginx module
//! starts its pool this way: nginx's master has no hook to restart a helper process, and the
//! pool server, which holds the sockets every nginx worker connects to, must not stay dead
//! until the next reload.
//!
//! The watchdog runs no app code and starts no thread that touches one, so what would kill
//! the pool server (a bug, the OOM killer, a stray `kill -9`) is unlikely to kill it too.
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
//!   `NOTIFY_SOCKET` of its own.
//! - The lifeline (`--lifeline-fd`) is handed down to each pool server; the watchdog watches
//!   it too, so it goes with nginx even while no pool server runs.

use std::ffi::OsString;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The pause before the second of several quick restarts (the first is at once).
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest pause between restarts.
const LONGEST_DELAY: Duration = Duration::from_secs(10);
/// A pool server that lived this long was healthy: if it dies, the next starts at once.
const STABLE: Duration = Duration::from_secs(10);

/// Runs the pool server (`child_args` after `portico pool`) under the watchdog until it
/// stops for good; returns its exit status.
pub(crate) fn run(child_args: Vec<OsString>, lifeline_fd: Option<i32>) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("portico pool --watchdog: cannot find my own executable: {e}");
            return ExitCode::from(crate::EXIT_APP);
        }
    };
    let signals = [libc::SIGHUP, libc::SIGTERM, libc::SIGINT, libc::SIGCHLD];
    // SAFETY: a signal set on the stack, filled by sigemptyset/sigaddset, given to
    // pthread_sigmask for the calling thread before any thread starts.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let ready = Arc::new(AtomicBool::new(false));
    let notify_name = format!("portico-watchdog-{}", std::process::id());
    if let Err(e) = relay_notifications(&notify_name, ready.clone()) {
        eprintln!("portico pool --watchdog: cannot open its notify socket: {e}");
        return ExitCode::from(crate::EXIT_APP);
    }
    if let Some(fd) = lifeline_fd {
        crate::pool_cmd::watch_lifeline(fd);
    }
    let start = || {
        let mut command = Command::new(&exe);
        command
            .arg("pool")
            .args(&child_args)
            .env("NOTIFY_SOCKET", format!("@{notify_name}"));
        // SAFETY: runs between fork and exec; fcntl and sigprocmask are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                if let Some(fd) = lifeline_fd {
                    // The watchdog keeps the lifeline close-on-exec; the child needs it open.
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
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
        command.spawn()
    };

    let mut child: Option<(Child, Instant)> = match start() {
        Ok(child) => Some((child, Instant::now())),
        Err(e) => {
            eprintln!("portico pool --watchdog: cannot start the pool server: {e}");
            return ExitCode::from(crate::EXIT_APP);
        }
    };
    let mut delay = Duration::ZERO;
    let mut restart_at: Option<Instant> = None;
    let mut stopping = false;
    loop {
        match wait_signal(
            &set,
            restart_at.map(|at| at.saturating_duration_since(Instant::now())),
        ) {
            Some(libc::SIGHUP) => {
                if let Some((running, _)) = &child {
                    pass_on(running, libc::SIGHUP);
                }
            }
            Some(sig @ (libc::SIGTERM | libc::SIGINT)) => {
                stopping = true;
                match &child {
                    Some((running, _)) => pass_on(running, sig),
                    None => return ExitCode::SUCCESS,
                }
            }
            Some(_) => {
                // SIGCHLD: the pool server's status, if it is the one that changed.
                let Some((running, started)) = &mut child else {
                    continue;
                };
                let status = match running.try_wait() {
                    Ok(Some(status)) => status,
                    Ok(None) => continue,
                    Err(e) => {
                        log::error!("watchdog: cannot wait for the pool server: {e}");
                        continue;
                    }
                };
                let (pid, lived) = (running.id(), started.elapsed());
                child = None;
                if stopping || status.success() {
                    return exit_code(status);
                }
                if !ready.load(Ordering::Acquire) {
                    // Never served: a configuration or app that cannot start. Restarting
                    // would only repeat it; the one who started us hears of it instead.
                    log::error!(
                        "watchdog: the pool server {pid} {} before it was ready",
                        describe(status)
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
                log::error!(
                    "watchdog: the pool server {pid} {}; starting another {when}",
                    describe(status)
                );
                restart_at = Some(Instant::now() + delay);
                delay = next_delay(delay);
            }
            None => {
                // The pause after a death is over.
                restart_at = None;
                match start() {
                    Ok(fresh) => {
                        log::info!("watchdog: pool server {} started", fresh.id());
                        child = Some((fresh, Instant::now()));
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
}

/// The pause after `delay`, for a pool server that died young again.
fn next_delay(delay: Duration) -> Duration {
    (delay * 2).clamp(FIRST_DELAY, LONGEST_DELAY)
}

/// The next of the blocked `set`'s signals, or `None` once `limit` has passed.
fn wait_signal(set: &libc::sigset_t, limit: Option<Duration>) -> Option<i32> {
    loop {
        let sig = match limit {
            // SAFETY: sigwait reads the set and writes the signal number to `sig`.
            None => unsafe {
                let mut sig = 0;
                if libc::sigwait(set, &mut sig) != 0 {
                    continue;
                }
                sig
            },
            Some(limit) => {
                let timeout = libc::timespec {
                    tv_sec: limit.as_secs() as libc::time_t,
                    tv_nsec: limit.subsec_nanos() as libc::c_long,
                };
                // SAFETY: sigtimedwait reads the set and the timeout; no siginfo is asked for.
                let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
                if sig < 0 {
                    match std::io::Error::last_os_error().raw_os_error() {
                        Some(libc::EAGAIN) => return None,
                        _ => continue,
                    }
                }
                sig
            }
        };
        return Some(sig);
    }
}

fn pass_on(child: &Child, sig: i32) {
    // SAFETY: kill() only sends a signal, to the pool server we started and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// How a pool server ended, as the log says it.
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (_, Some(sig)) => format!("was killed by signal {sig}"),
        (Some(code), _) => format!("exited with status {code}"),
        _ => status.to_string(),
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

/// Listens on the abstract socket `name` for what the pool server tells systemd: `READY=1`
/// sets `ready`, and every message goes on to the watchdog's own `NOTIFY_SOCKET`, if any.
fn relay_notifications(name: &str, ready: Arc<AtomicBool>) -> std::io::Result<()> {
    let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
    let upstream = std::env::var_os("NOTIFY_SOCKET");
    std::thread::Builder::new()
        .name("notify-relay".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let message = &buf[..n];
                if message
                    .split(|&b| b == b'\n')
                    .any(|line| line == b"READY=1")
                {
                    ready.store(true, Ordering::Release);
                }
                if upstream.is_some() {
                    crate::pool_cmd::notify_systemd_raw(upstream.as_deref(), message);
                }
            }
        })?;
    Ok(())
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
