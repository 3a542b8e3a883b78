//! A pool server: the pools of a [`Dispatcher`] offered to host processes on Unix sockets,
//! one per app (`portico pool`; the nginx module starts one for its pooled apps).
//!
//! Each connection is served as a worker serves its host ([`super::worker::serve`]): the
//! app there is a pool, so each request goes on to the least busy worker. Hosts connect and
//! reconnect as they like; their connections are independent, and a host that goes away
//! cancels only its own requests.

use crate::Dispatcher;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The listening sockets of a running pool server.
pub struct PoolServer {
    sockets: Vec<(PathBuf, UnixListener)>,
    stopping: Arc<AtomicBool>,
}

impl PoolServer {
    /// Binds one socket per `(app index, path)` and serves each app's pool on it. Every
    /// socket is bound before any is served, so one that cannot be fails the start. With
    /// `owner` (uid, gid), each socket belongs to that user and only it may connect (nginx
    /// gives its workers' user); else the umask decides.
    pub fn start(
        dispatcher: Arc<Dispatcher>,
        sockets: &[(usize, PathBuf)],
        owner: Option<(u32, u32)>,
    ) -> Result<PoolServer, String> {
        let mut bound = Vec::new();
        for (_, path) in sockets {
            bound.push((path.clone(), bind(path, owner)?));
        }
        let stopping = Arc::new(AtomicBool::new(false));
        for ((app, _), (path, listener)) in sockets.iter().zip(&bound) {
            let listener = listener
                .try_clone()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let dispatcher = dispatcher.clone();
            let stopping = stopping.clone();
            let app = *app;
            let name = dispatcher.apps()[app].config().name.clone();
            std::thread::Builder::new()
                .name(format!("{name}-accept"))
                .spawn(move || accept(listener, dispatcher, app, stopping))
                .map_err(|e| format!("cannot start the accept thread: {e}"))?;
            log::info!("app `{name}`: pool listening on {}", path.display());
        }
        Ok(PoolServer {
            sockets: bound,
            stopping,
        })
    }

    /// Stops taking connections and removes the socket files; connections already made go
    /// on until their hosts close them or the pools stop.
    pub fn stop_accepting(&self) {
        self.stopping.store(true, Ordering::Release);
        for (path, listener) in &self.sockets {
            // SAFETY: shutdown() on our own listening descriptor, which stays open; on Linux
            // it wakes the thread blocked in accept().
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

/// Binds `path`, replacing a socket file that nothing listens on any more (left by a server
/// that was killed) but never one a live server holds.
fn bind(path: &Path, owner: Option<(u32, u32)>) -> Result<UnixListener, String> {
    let at = |e: std::io::Error| format!("cannot listen on {}: {e}", path.display());
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
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
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(at)?;
    }
    Ok(listener)
}

fn accept(listener: UnixListener, dispatcher: Arc<Dispatcher>, app: usize, stop: Arc<AtomicBool>) {
    let name = dispatcher.apps()[app].config().name.clone();
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let conn = match conn {
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
