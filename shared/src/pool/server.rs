//! A pool server: the pools of a [`Dispatcher`] offered to host processes on Unix sockets,
//! one per app (`portico pool`; the nginx module starts one for its pooled apps).
//!
//! Each connection is served as a worker serves its host ([`super::worker::serve`]): the
//! app there is a pool, so each request goes on to the least busy worker. Hosts connect and
//! reconnect as they like; their connections are independent, and a host that goes away
//! cancels only its own requests.

use crate::Dispatcher;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The listening sockets of a running pool server.
pub struct PoolServer {
    sockets: Vec<Socket>,
    stopping: Arc<AtomicBool>,
    /// Something outside holds the sockets too (a watchdog, systemd's fd store) and hands
    /// them to the next pool server: stopping must leave them open and their files in place.
    handed_over: AtomicBool,
    /// Dropped to stop the accept threads, each of which polls the other end beside its
    /// listener: a socket that outlives this server cannot be shut down to wake them.
    wake: Mutex<Option<UnixStream>>,
}

/// One listening socket of a pool server.
struct Socket {
    path: PathBuf,
    listener: UnixListener,
    /// Inherited: whoever gave it (systemd's socket unit, a watchdog) owns it and its file.
    inherited: bool,
}

impl PoolServer {
    /// Listens on one socket per `(app index, path)` and serves each app's pool on it. Every
    /// socket listens before any is served, so one that cannot fails the start.
    ///
    /// A socket of `inherited` (sd_listen_fds(3): from systemd's socket activation, or from
    /// the watchdog that ran the pool server before this one) bound to a path is used for
    /// that path as it is: connections that waited in its queue while no pool server ran
    /// are served now. Other paths are bound here. With `owner` (uid, gid), each socket
    /// bound here belongs to that user and only it may connect (nginx gives its workers'
    /// user); else the umask decides. Inherited sockets that match no path are closed.
    pub fn start(
        dispatcher: Arc<Dispatcher>,
        sockets: &[(usize, PathBuf)],
        owner: Option<(u32, u32)>,
        mut inherited: Vec<UnixListener>,
    ) -> Result<PoolServer, String> {
        let mut bound = Vec::new();
        for (_, path) in sockets {
            let (listener, given) = match take_inherited(&mut inherited, path) {
                Some(listener) => {
                    log::info!("{}: listening on the inherited socket", path.display());
                    (listener, true)
                }
                None => (bind(path, owner)?, false),
            };
            bound.push(Socket {
                path: path.clone(),
                listener,
                inherited: given,
            });
        }
        for extra in inherited {
            let at = extra.local_addr().ok();
            let path = at.as_ref().and_then(|a| a.as_pathname());
            if bound
                .iter()
                .any(|s| s.inherited && is_bound_to(&extra, &s.path))
            {
                // The same socket twice: from a socket unit and from the fd store.
                log::debug!("a second descriptor of an inherited socket: closed");
                continue;
            }
            log::warn!(
                "an inherited socket ({}) is none of this pool's: closing it",
                path.map_or("unnamed".into(), |p| p.display().to_string())
            );
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let (wake, woken) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        for ((app, _), socket) in sockets.iter().zip(&bound) {
            let path = &socket.path;
            let (listener, woken) = socket
                .listener
                .try_clone()
                .and_then(|listener| Ok((listener, woken.try_clone()?)))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let dispatcher = dispatcher.clone();
            let stopping = stopping.clone();
            let app = *app;
            let name = dispatcher.apps()[app].config().name.clone();
            std::thread::Builder::new()
                .name(format!("{name}-accept"))
                .spawn(move || accept(listener, woken, dispatcher, app, stopping))
                .map_err(|e| format!("cannot start the accept thread: {e}"))?;
            log::info!("app `{name}`: pool listening on {}", path.display());
        }
        Ok(PoolServer {
            sockets: bound,
            stopping,
            handed_over: AtomicBool::new(false),
            wake: Mutex::new(Some(wake)),
        })
    }

    /// The listening sockets, in the order of the paths given to [`PoolServer::start`]: what
    /// a watchdog or systemd keeps for the next pool server (sd_notify(3)'s `FDSTORE=1`).
    pub fn listeners(&self) -> Vec<BorrowedFd<'_>> {
        self.sockets.iter().map(|s| s.listener.as_fd()).collect()
    }

    /// Says that something outside now holds the sockets too: [`PoolServer::stop_accepting`]
    /// then leaves them listening, and their files in place, for the next pool server.
    pub fn handed_over(&self) {
        self.handed_over.store(true, Ordering::Release);
    }

    /// Stops taking connections and removes the socket files; connections already made go
    /// on until their hosts close them or the pools stop. Sockets that were inherited or
    /// handed over stay as they are, for their owner: connections not yet accepted wait in
    /// their queues for the next pool server.
    pub fn stop_accepting(&self) {
        self.stopping.store(true, Ordering::Release);
        drop(self.wake.lock().unwrap_or_else(|e| e.into_inner()).take());
        let handed_over = self.handed_over.load(Ordering::Acquire);
        for socket in &self.sockets {
            if handed_over || socket.inherited {
                // shutdown() would end the listening socket for its next owner too.
                continue;
            }
            let (path, listener) = (&socket.path, &socket.listener);
            // SAFETY: shutdown() on our own listening descriptor, which stays open: the
            // connections still in its queue are refused rather than left waiting.
            unsafe {
                libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR);
            }
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for PoolServer {
    fn drop(&mut self) {
        self.stop_accepting();
    }
}

/// Takes the socket of `inherited` that is bound to `path`, if one is.
fn take_inherited(inherited: &mut Vec<UnixListener>, path: &Path) -> Option<UnixListener> {
    let at = inherited
        .iter()
        .position(|listener| is_bound_to(listener, path))?;
    Some(inherited.swap_remove(at))
}

/// Whether `listener` is bound to `path` (both made absolute: a config may name it relative).
fn is_bound_to(listener: &UnixListener, path: &Path) -> bool {
    let Ok(wanted) = std::path::absolute(path) else {
        return false;
    };
    listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().and_then(|p| std::path::absolute(p).ok()))
        .is_some_and(|p| p == wanted)
}

/// Binds `path`, replacing a socket file that nothing listens on any more (left by a server
/// that was killed) but never one a live server holds.
fn bind(path: &Path, owner: Option<(u32, u32)>) -> Result<UnixListener, String> {
    let at = |e: std::io::Error| format!("cannot listen on {}: {e}", path.display());
    if path.exists() {
        // A full queue (a stuck server) is a live one too; a blocking connect would wait.
        let live = match super::connect_at_once(path) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        };
        if live {
            return Err(format!(
                "cannot listen on {}: another pool server is serving there",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(at)?;
    }
    let listener = UnixListener::bind(path).map_err(at)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(at)?;
    }
    // Only its owner may connect (a connect needs write permission), whatever the umask.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(at)?;
    Ok(listener)
}

/// Accepts the connections of one app's socket until the server stops (`woken` reads
/// end-of-file). It polls first and accepts only a connection that is there, so that after
/// the stop none is taken from a socket the next pool server will serve.
fn accept(
    listener: UnixListener,
    woken: UnixStream,
    dispatcher: Arc<Dispatcher>,
    app: usize,
    stop: Arc<AtomicBool>,
) {
    let name = dispatcher.apps()[app].config().name.clone();
    loop {
        if !wait_for_connection(&listener, &woken) || stop.load(Ordering::Acquire) {
            return;
        }
        let conn = match listener.accept().map(|(conn, _)| conn) {
            Ok(conn) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // stop_accepting shut the listener down.
            Err(_) if stop.load(Ordering::Acquire) => return,
            Err(e) => {
                log::error!("app `{name}`: pool server: accept failed: {e}");
                // EMFILE and the like pass; do not spin while they last.
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let dispatcher = dispatcher.clone();
        let thread_name = name.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-host"))
            .spawn(move || {
                if let Err(e) = super::worker::serve(conn, &dispatcher.apps()[app]) {
                    log::debug!("app `{thread_name}`: a host connection ended: {e}");
                }
            });
        if let Err(e) = spawned {
            log::error!("app `{name}`: pool server: cannot start a connection thread: {e}");
        }
    }
}

/// Waits until `listener` has a connection to accept (`true`) or `woken` is readable, which
/// is the server stopping (`false`).
fn wait_for_connection(listener: &UnixListener, woken: &UnixStream) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: woken.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: poll reads and writes the two live pollfd entries of `fds`.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        // A failed poll is treated as a stop rather than spun on.
        return n > 0 && fds[1].revents == 0;
    }
}
