//! A graceful stop (SIGTERM) that ends as soon as nothing is served any more.
//!
//! On SIGTERM Pingora stops accepting, tells its connections, then sleeps the whole grace
//! period (`server.graceful_timeout`) before it returns, whether or not a request is left: an
//! idle server took ten seconds to stop, which `systemctl restart` waits out, and which
//! `docker stop` (ten seconds, then SIGKILL) cuts short before the ASGI lifespan shutdown.
//! gunicorn, uvicorn and nginx end a graceful stop once their connections are done. So a
//! watcher thread follows Pingora's execution phase and, once the listener's last connection
//! has closed within the grace period, finishes the stop itself and exits; past the grace
//! period, Pingora's own path runs the same finish.

use pingora::server::ExecutionPhase;
use portico_proxy::listener::OpenConnections;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// How often the watcher looks at the connection count while the server stops.
const POLL: Duration = Duration::from_millis(10);

/// How long the count must stay at zero: a connection accepted just before the stop (or in
/// its TLS handshake) is counted only once Pingora hands it to the app.
const SETTLE: Duration = Duration::from_millis(150);

/// What ends the server, run once by whichever comes first: the watcher, with every
/// connection closed, or `main` once Pingora has returned.
pub(crate) struct Finish(Mutex<Option<Box<dyn FnOnce() + Send>>>);

impl Finish {
    /// Wraps the work that ends the server (the apps' shutdown, the last log lines).
    pub(crate) fn new(work: impl FnOnce() + Send + 'static) -> Arc<Finish> {
        Arc::new(Finish(Mutex::new(Some(Box::new(work)))))
    }

    /// Runs the work unless the other side already took it; says whether it ran here. A
    /// panic in the work is logged and counts as run, so that the process still ends.
    pub(crate) fn run(&self) -> bool {
        let work = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        match work {
            Some(work) => {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).is_err() {
                    log::error!("stopping the server panicked; exiting all the same");
                }
                true
            }
            None => false,
        }
    }
}

/// Starts the thread that ends a graceful stop early: once Pingora is in its grace period
/// and `open` is down to zero, it runs `finish` and exits the process with status 0.
pub(crate) fn end_early_when_idle(
    mut phases: broadcast::Receiver<ExecutionPhase>,
    open: OpenConnections,
    grace: Duration,
    finish: Arc<Finish>,
) {
    let watcher = move || {
        // A lagged receiver only missed phases; the ones that matter come later.
        loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::GracefulTerminate) => log::info!(
                    "stopping (SIGTERM): no new connections; {} open, up to {grace:?} to finish",
                    open.count()
                ),
                Ok(ExecutionPhase::ShutdownGracePeriod) => break,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
        let deadline = Instant::now() + grace;
        let mut idle_since = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                // Pingora's grace period ends about now, and its path finishes the stop.
                return;
            }
            if open.count() > 0 {
                idle_since = None;
            } else if now.duration_since(*idle_since.get_or_insert(now)) >= SETTLE {
                break;
            }
            std::thread::sleep(POLL);
        }
        if finish.run() {
            std::process::exit(0);
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("graceful-stop".into())
        .spawn(watcher)
    {
        // Without it a graceful stop still ends, after the whole grace period.
        log::warn!("cannot start the graceful-stop watcher: {e}");
    }
}
