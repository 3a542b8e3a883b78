//! A pool that runs in another process: a `portico pool` server (started by systemd, or by
//! the nginx module) listening on a Unix socket. The host connects to it and speaks the same
//! protocol it speaks to a worker of its own (`WorkerConn`); the pool server hands each
//! request on to one of its workers, as Passenger's core does between nginx and the app
//! processes. So the host needs no supervision of its own: the server starts, recycles and
//! reloads the workers, and any number of host processes (nginx's workers) share them.

use super::host::WorkerConn;
use super::wire::RequestKind;
use super::PoolStatus;
use crate::error::DispatchError;
use crate::exchange::Exchange;
use crate::model::RequestHead;
use crate::router::Route;
use bytes::Bytes;
use portico_config::AppConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The host's side of a pool server's socket, for one app.
pub struct RemotePool {
    app: String,
    socket: PathBuf,
    /// The connection, made on first use and made again after the server went away.
    conn: Mutex<Option<Arc<WorkerConn>>>,
}

impl RemotePool {
    /// A pool at `socket`. Nothing is connected yet: the server may start after the host,
    /// and a request before it is up gets 502, as nginx answers for an upstream that
    /// refuses.
    pub fn new(config: &AppConfig, socket: &Path) -> Arc<RemotePool> {
        Arc::new(RemotePool {
            app: config.name.clone(),
            socket: socket.to_owned(),
            conn: Mutex::new(None),
        })
    }

    /// The socket this pool is reached at.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The live connection, connecting when there is none. The connect never waits (see
    /// [`super::connect_at_once`]), and the server's hello is checked by the reader as it comes,
    /// so the host's thread (an event loop's) never waits here, nor on this lock.
    fn connection(self: &Arc<Self>) -> Result<Arc<WorkerConn>, DispatchError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(live) = conn.as_ref().filter(|c| c.is_alive()) {
            return Ok(live.clone());
        }
        let unreachable = |e: std::io::Error| {
            let why = if e.kind() == std::io::ErrorKind::WouldBlock {
                "its queue of connections is full: the server accepts none (stopped or stuck?)"
                    .to_owned()
            } else if e.kind() == std::io::ErrorKind::PermissionDenied {
                // SAFETY: geteuid has no preconditions.
                let uid = unsafe { libc::geteuid() };
                format!(
                    "{e}: this process (uid {uid}) may not write to the socket; start \
                     `portico pool` with `--user` this user, or give it the socket (systemd's \
                     SocketUser=)"
                )
            } else {
                format!("{e} (is `portico pool` running?)")
            };
            DispatchError::PoolUnreachable(format!(
                "cannot connect to {} for app `{}`: {why}",
                self.socket.display(),
                self.app
            ))
        };
        let stream = super::connect_at_once(&self.socket).map_err(unreachable)?;
        // No stuck limit: a pool server is no worker. It sees the stuck worker behind it
        // (its own connection to the worker has the limit), and this connection serves on.
        let fresh = WorkerConn::start(stream, 0, &self.app, None).map_err(unreachable)?;
        // What never reached a pool server that went away goes to the next one.
        let pool = Arc::downgrade(self);
        fresh.set_redirect(Box::new(move || pool.upgrade()?.connection().ok()));
        *conn = Some(fresh.clone());
        Ok(fresh)
    }

    /// Sends a request to the pool server.
    pub(crate) fn submit(
        self: &Arc<Self>,
        kind: RequestKind,
        head: RequestHead,
        route: Route,
        body: Option<Vec<Bytes>>,
    ) -> Result<Exchange, DispatchError> {
        // A connection found closed (the server restarted) is made again once.
        let mut last = None;
        for _ in 0..2 {
            let conn = self.connection()?;
            match conn.submit(kind, &head, &route, body.as_deref()) {
                Err(DispatchError::WorkerLost(why)) => last = Some(why),
                submitted => return submitted,
            }
        }
        Err(DispatchError::WorkerLost(last.unwrap_or_default()))
    }

    /// The pool's status, as the server reports it (waits up to `limit`).
    pub fn status(self: &Arc<Self>, limit: Duration) -> Result<PoolStatus, String> {
        let conn = self.connection().map_err(|e| e.to_string())?;
        match conn.query_status(limit)? {
            Some(status) => Ok(status),
            None => Err(format!(
                "{} answers, but runs no pool for app `{}`",
                self.socket.display(),
                self.app
            )),
        }
    }

    /// Closes the connection (the server drops its requests).
    pub(crate) fn close(&self) {
        if let Some(conn) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take() {
            conn.close();
        }
    }
}
