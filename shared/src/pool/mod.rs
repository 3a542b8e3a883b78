//! Pooled apps (`mode = "pool"`, mod_wsgi's daemon mode): the app runs in worker processes
//! that the host process starts and supervises, each loading the app through the same core
//! ([`crate::Dispatcher`]) as in-process hosting. The pool is a transport around that path:
//! the host's request becomes frames on a Unix socket ([`wire`]), the worker submits it to
//! its app and sends the exchange's events back ([`worker`]), and the host turns them into
//! the same exchange events again ([`host`]).
//!
//! Supervision: one thread per worker slot starts `portico-worker`, waits for its hello,
//! hands its socket to the pool, and waits for it to exit; then the worker's requests in
//! flight fail (502), the others go on on the other workers, and the slot starts a new
//! worker at once, or after a growing pause (0.5 s doubling to 30 s) when workers die young,
//! as an app that cannot import does: one clear error per attempt, never a spawn storm.

pub mod host;
pub mod wire;
pub mod worker;

use crate::error::{DispatchError, LoadError};
use crate::model::RequestHead;
use crate::router::Route;
use bytes::{Buf, Bytes, BytesMut};
use host::WorkerConn;
use portico_config::AppConfig;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use wire::{Kind, RequestKind};

/// The descriptor a worker finds its socket on.
pub const WORKER_FD: i32 = 3;

/// A worker that died within this time of getting ready without having been given a
/// request died young (of itself, not of a request or a kill): the next start waits, so a
/// crashing app cannot make the pool spin.
const YOUNG: Duration = Duration::from_secs(1);

/// How a host starts its pool workers.
#[derive(Debug, Clone)]
pub struct PoolHost {
    /// The `portico-worker` executable.
    pub worker_binary: PathBuf,
    /// The portico.toml the workers read their app from.
    pub config_file: PathBuf,
}

/// A running pool for one app.
pub struct Pool {
    name: String,
    conns: RwLock<Vec<Arc<WorkerConn>>>,
    children: Mutex<Vec<u32>>,
    /// Where the search for the least busy worker starts, turning with each request so
    /// that idle workers share the work.
    turn: AtomicUsize,
    stopping: AtomicBool,
}

impl Pool {
    /// Starts `processes` workers for `config` and waits until each has loaded the app (or
    /// failed once). If none could, the app cannot be loaded: the error is the workers'.
    pub fn start(config: &AppConfig, host: &PoolHost) -> Result<Arc<Pool>, LoadError> {
        let pool = Arc::new(Pool {
            name: config.name.clone(),
            conns: RwLock::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            turn: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        });
        let (first_tx, first_rx) = mpsc::channel();
        let processes = config.processes.max(1);
        for slot in 0..processes {
            let pool = pool.clone();
            let host = host.clone();
            let first = first_tx.clone();
            let name = config.name.clone();
            let startup = config
                .startup_timeout
                .as_limit()
                .unwrap_or(Duration::from_secs(3600));
            std::thread::Builder::new()
                .name(format!("{name}-pool-{slot}"))
                .spawn(move || supervise(&pool, &host, &name, startup, first))
                .map_err(|e| LoadError {
                    app: config.name.clone(),
                    message: format!("cannot start the pool's supervisor thread: {e}"),
                })?;
        }
        drop(first_tx);
        let mut errors = Vec::new();
        for outcome in first_rx.iter().take(processes) {
            if let Err(e) = outcome {
                errors.push(e);
            }
        }
        if errors.len() == processes {
            pool.stop();
            return Err(LoadError {
                app: config.name.clone(),
                message: errors.swap_remove(0),
            });
        }
        Ok(pool)
    }

    /// Sends a request to the least busy live worker.
    pub(crate) fn submit(
        &self,
        kind: RequestKind,
        head: RequestHead,
        route: Route,
        body: Option<Vec<Bytes>>,
    ) -> Result<crate::exchange::Exchange, DispatchError> {
        let conn = {
            let conns = self.conns.read().unwrap_or_else(|e| e.into_inner());
            let start = self.turn.fetch_add(1, Ordering::Relaxed);
            (0..conns.len())
                .map(|i| &conns[(start + i) % conns.len()])
                .filter(|c| c.is_alive())
                .min_by_key(|c| c.in_flight.load(Ordering::Acquire))
                .cloned()
        };
        match conn {
            Some(conn) => conn.submit(kind, &head, &route, body.as_deref()),
            // Every worker is starting or restarting.
            None => Err(DispatchError::Overloaded),
        }
    }

    /// Stops the workers (SIGTERM) and starts no more.
    pub fn stop(&self) {
        if !self.stopping.swap(true, Ordering::AcqRel) {
            log::info!("app `{}`: stopping its pool workers", self.name);
        }
        for pid in self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // SAFETY: kill() only sends a signal to a process id we started.
            unsafe {
                libc::kill(*pid as i32, libc::SIGTERM);
            }
        }
    }

    /// The live workers' process ids.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.conns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|c| c.is_alive())
            .map(|c| c.pid)
            .collect()
    }
}

/// One worker slot, for the pool's life: start, serve, wait, restart.
fn supervise(
    pool: &Arc<Pool>,
    host: &PoolHost,
    name: &str,
    startup: Duration,
    first: mpsc::Sender<Result<(), String>>,
) {
    let mut first = Some(first);
    let mut pause = Duration::from_millis(500);
    while !pool.stopping.load(Ordering::Acquire) {
        // Whether the worker died young (see YOUNG), or never got ready.
        let mut young = true;
        match spawn(host, name, startup) {
            Ok((mut child, conn)) => {
                let ready_at = Instant::now();
                let pid = child.id();
                pool.children
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(pid);
                pool.conns
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(conn.clone());
                log::info!("app `{name}`: pool worker {pid} started");
                if let Some(first) = first.take() {
                    let _ = first.send(Ok(()));
                }
                let status = child.wait();
                young = ready_at.elapsed() < YOUNG && conn.taken.load(Ordering::Relaxed) == 0;
                conn.lost("the worker exited");
                pool.conns
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|c| !Arc::ptr_eq(c, &conn));
                pool.children
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|p| *p != pid);
                if pool.stopping.load(Ordering::Acquire) {
                    return;
                }
                let how = match status {
                    Ok(status) => describe_exit(status),
                    Err(e) => format!("could not be waited for: {e}"),
                };
                log::warn!("app `{name}`: pool worker {pid} {how}; starting another");
            }
            Err(why) => {
                log::error!("app `{name}`: a pool worker could not start: {why}");
                if let Some(first) = first.take() {
                    let _ = first.send(Err(why));
                }
            }
        }
        if young {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(30));
        } else {
            pause = Duration::from_millis(500);
        }
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended".into(),
    }
}

/// Starts one worker and waits for its hello.
fn spawn(
    host: &PoolHost,
    name: &str,
    startup: Duration,
) -> Result<(Child, Arc<WorkerConn>), String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let theirs: OwnedFd = theirs.into();
    let fd = theirs.as_raw_fd();
    let mut command = Command::new(&host.worker_binary);
    command
        .arg("--config")
        .arg(&host.config_file)
        .arg("--app")
        .arg(name);
    // SAFETY: between fork and exec only async-signal-safe calls: dup2 (which also clears
    // close-on-exec on the copy) and prctl.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(fd, WORKER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The worker goes when the process that supervises it goes.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", host.worker_binary.display()))?;
    drop(theirs);
    match read_hello(&ours, startup) {
        Ok(pid) if pid == child.id() => {}
        Ok(pid) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("worker {} said it was {pid}", child.id()));
        }
        Err(why) => {
            let _ = child.kill();
            let status = child.wait().map(describe_exit).unwrap_or_default();
            return Err(format!(
                "the worker {status} before it was ready ({why}); its error is in the log above"
            ));
        }
    }
    let conn = WorkerConn::start(ours, child.id(), name)
        .map_err(|e| format!("cannot start the pool's threads: {e}"))?;
    Ok((child, conn))
}

/// Reads the worker's [`Kind::Hello`]; returns its pid.
fn read_hello(mut socket: &UnixStream, limit: Duration) -> Result<u32, String> {
    socket
        .set_read_timeout(Some(limit.max(Duration::from_millis(1))))
        .map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 64];
    let frame = loop {
        if let Some(frame) = wire::decode(&mut buf).map_err(|e| e.to_string())? {
            break frame;
        }
        match socket.read(&mut chunk) {
            Ok(0) => return Err("it closed its socket".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Err(format!("no hello within startup_timeout ({limit:?})"))
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
