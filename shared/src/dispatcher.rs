//! The one entry point a host uses: load the apps, route a request, submit it.

use crate::error::{DispatchError, LoadError};
use crate::exchange::{self, Exchange};
use crate::model::RequestHead;
use crate::model::ResponseHead;
use crate::pool::remote::RemotePool;
use crate::pool::wire::RequestKind;
use crate::pool::{Pool, PoolSettings, PoolStatus};
use crate::python::asgi::{AsgiContext, LifespanOutcome};
use crate::python::event_loop::{self, LoopShared, Work};
use crate::python::threads::{Job, JobKind, ThreadPool};
use crate::python::{self, wsgi::WsgiRunner};
use crate::router::{Route, Router};
use crate::websocket;
use bytes::Bytes;
use portico_config::{AppConfig, Interface, LifespanMode, Mode};
use pyo3::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// What the host tells apps about itself.
#[derive(Debug, Clone)]
pub struct HostInfo {
    /// `SERVER_SOFTWARE`, e.g. `portico/0.1.0`.
    pub server_software: String,
    /// Whether other processes serve the same app (`wsgi.multiprocess`): true under nginx
    /// with several workers, false for the single `portico` process.
    pub multiprocess: bool,
    /// How to start pool workers (`mode = "pool"`); `None` where this host cannot.
    pub pool: Option<crate::pool::PoolHost>,
}

/// A loaded app, ready for requests.
pub struct App {
    config: AppConfig,
    placement: Placement,
}

/// Where an app's requests run in this process.
enum Placement {
    /// WSGI: a bounded queue in front of `threads` Python threads.
    Threads(ThreadPool),
    /// ASGI: one event-loop thread; at most `limit` requests in flight.
    Loop {
        shared: Arc<LoopShared>,
        limit: usize,
        lifespan: bool,
    },
    /// `mode = "pool"`: worker processes, each running the app through this same core.
    Pool(Arc<Pool>),
    /// `mode = "pool"` with `pool_socket`: the workers of a pool server in another process.
    Remote(Arc<RemotePool>),
}

impl App {
    /// The app's configuration.
    pub fn config(&self) -> &AppConfig {
        &self.config
    }

    /// How long this process's part of the app has been stuck, as far as can be seen; `None`
    /// when it is not. WSGI: how long the thread longest on its current request has run it
    /// (whether or not its client is still there). ASGI: how long the event loop has left a
    /// ping unanswered; a call sends one when none is out, so a caller asks now and then
    /// (a pool worker's watch does). `None` for pooled placements, whose workers watch
    /// themselves.
    pub fn stuck_for(&self) -> Option<Duration> {
        match &self.placement {
            Placement::Threads(threads) => threads.longest_run(),
            Placement::Loop { shared, .. } => shared.unanswered_ping(),
            Placement::Pool(_) | Placement::Remote(_) => None,
        }
    }

    /// The status of the app's pool, when this process runs it.
    pub fn pool_status(&self) -> Option<PoolStatus> {
        match &self.placement {
            Placement::Pool(pool) => Some(pool.status()),
            _ => None,
        }
    }

    /// Keeps `event` among the latest events of the app's pool, when this process runs it
    /// (a pool server started in place of one that died says so there); otherwise nothing.
    pub fn record_pool_event(&self, event: &str) {
        if let Placement::Pool(pool) = &self.placement {
            pool.record_event(event.to_owned());
        }
    }

    /// Queues a request for the app's Python threads. The returned [`Exchange`] yields the
    /// response; [`DispatchError::Overloaded`] means the backlog is full.
    ///
    /// `body` is the whole request body, in the pieces it arrived in, when the host chose to
    /// read a small one before submitting (saving the app a round trip per piece); `None`
    /// means the app pulls the body through [`crate::exchange::AppEvent::NeedBody`].
    pub fn submit(
        &self,
        head: RequestHead,
        route: Route,
        body: Option<Vec<Bytes>>,
    ) -> Result<Exchange, DispatchError> {
        self.submit_job(JobKind::Http, head, route, body)
    }

    /// Whether the app takes WebSocket connections (ASGI apps do; a WSGI app gets an upgrade
    /// request as a plain HTTP request).
    pub fn accepts_websockets(&self) -> bool {
        match &self.placement {
            Placement::Loop { .. } => true,
            // The worker runs the app in-process: an ASGI app takes them there.
            Placement::Pool(_) | Placement::Remote(_) => self.config.interface == Interface::Asgi,
            Placement::Threads(_) => false,
        }
    }

    /// Hands a WebSocket handshake to the app (ASGI "Websocket" spec). The exchange yields
    /// [`crate::exchange::AppEvent::WsAccept`], a denial (`Head`...) or a close; after an
    /// accept the host pushes the client's messages with [`Exchange::try_push`].
    pub fn submit_websocket(
        &self,
        head: RequestHead,
        route: Route,
    ) -> Result<Exchange, DispatchError> {
        self.submit_job(JobKind::WebSocket, head, route, None)
    }

    /// The WebSocket handshake of `head` (RFC 6455 section 4.2.1) for this app: `None` when
    /// the request is no WebSocket upgrade, or the app takes no WebSockets (serve it as
    /// HTTP); else the parsed handshake, with permessage-deflate negotiated as the app's
    /// `websocket_per_message_deflate` allows, or the error to answer with.
    pub fn websocket_handshake(
        &self,
        head: &RequestHead,
    ) -> Option<Result<websocket::Handshake, DispatchError>> {
        if !self.accepts_websockets() {
            return None;
        }
        let deflate = websocket::DeflateConfig {
            enabled: self.config.websocket_per_message_deflate,
            ..Default::default()
        };
        match websocket::parse_handshake(&head.method, head.version, &head.headers, &deflate) {
            websocket::Upgrade::NotWebSocket => None,
            websocket::Upgrade::Invalid(e) => Some(Err(e.into())),
            websocket::Upgrade::WebSocket(handshake) => Some(Ok(handshake)),
        }
    }

    /// The relay for a WebSocket this app accepted: a codec with the negotiated extensions
    /// and the app's `websocket_max_message_size` (0: no limit).
    pub fn websocket_relay(&self, handshake: &websocket::Handshake) -> websocket::Relay {
        let config = websocket::Config {
            max_message_size: match self.config.websocket_max_message_size.0 {
                0 => usize::MAX,
                n => usize::try_from(n).unwrap_or(usize::MAX),
            },
            ..Default::default()
        };
        websocket::Relay::new(websocket::Codec::new(&config, handshake.deflate))
    }

    fn submit_job(
        &self,
        kind: JobKind,
        head: RequestHead,
        route: Route,
        body: Option<Vec<Bytes>>,
    ) -> Result<Exchange, DispatchError> {
        let wire_kind = match kind {
            JobKind::Http => RequestKind::Http,
            JobKind::WebSocket => RequestKind::WebSocket,
        };
        match &self.placement {
            Placement::Pool(pool) => return pool.submit(wire_kind, head, route, body),
            Placement::Remote(remote) => return remote.submit(wire_kind, head, route, body),
            _ => {}
        }
        let admission = match &self.placement {
            Placement::Threads(threads) => match threads.admit() {
                Some(ticket) => Some(ticket),
                None => return Err(DispatchError::Overloaded),
            },
            _ => None,
        };
        let (exchange, responder) = exchange::channel_holding(admission);
        let job = Job {
            kind,
            head,
            route,
            responder,
            body,
            queued: None,
        };
        let queued = match &self.placement {
            Placement::Threads(threads) => threads.submit(job),
            Placement::Loop { shared, limit, .. } => {
                if shared.in_flight.fetch_add(1, Ordering::AcqRel) >= *limit {
                    shared.in_flight.fetch_sub(1, Ordering::AcqRel);
                    false
                } else {
                    shared.push(Work::Request(job));
                    true
                }
            }
            Placement::Pool(_) | Placement::Remote(_) => unreachable!("submitted above"),
        };
        if queued {
            Ok(exchange)
        } else {
            Err(DispatchError::Overloaded)
        }
    }
}

/// Where a status page gets a pool's status from.
enum StatusSource {
    Local(Arc<Pool>),
    Remote(Arc<RemotePool>),
}

/// What a reload did for one pooled app (see [`Dispatcher::reload`]).
#[derive(Debug)]
pub struct Reloaded {
    /// The app's name.
    pub app: String,
    /// `None` when its new generation took the settings the file has now; else it kept
    /// those it had, and this is the text of the file they were read from.
    pub kept_settings_of: Option<Arc<str>>,
    /// Whether the new generation serves; the error when it could not load the app, and
    /// the old generation serves on.
    pub outcome: Result<(), String>,
}

/// All the apps of one server, and the router between them.
pub struct Dispatcher {
    apps: Vec<App>,
    router: Router,
}

impl Dispatcher {
    /// Starts the interpreter, imports every app and starts its threads. Fails on the first
    /// app that cannot be loaded, with its traceback.
    pub fn load(configs: &[AppConfig], host: &HostInfo) -> Result<Dispatcher, LoadError> {
        let in_process: Vec<&AppConfig> = configs
            .iter()
            .filter(|c| c.mode == Mode::InProcess)
            .collect();
        if let Some(first) = in_process.first() {
            let home = in_process.iter().find_map(|c| c.python_home.as_deref());
            python::init_interpreter(home, &first.name)?;
        }
        let mut apps = Vec::with_capacity(configs.len());
        for config in configs {
            let fail = |message: String| LoadError {
                app: config.name.clone(),
                message,
            };
            if config.mode == Mode::Pool {
                let placement = match (&config.pool_socket, &host.pool) {
                    (Some(socket), _) => Placement::Remote(RemotePool::new(config, socket)),
                    (None, Some(pool_host)) => Placement::Pool(Pool::start(config, pool_host, &host.server_software)?),
                    (None, None) => {
                        return Err(fail(
                            "mode = \"pool\" needs a pool_socket on this host (a `portico pool` to connect to)"
                                .into(),
                        ))
                    }
                };
                apps.push(App {
                    config: config.clone(),
                    placement,
                });
                continue;
            }
            let placement = match config.interface {
                Interface::Wsgi => {
                    let runner = Python::attach(|py| -> Result<WsgiRunner, LoadError> {
                        let callable = python::load_callable(py, config)?;
                        WsgiRunner::new(
                            py,
                            &config.name,
                            callable,
                            config.threads > 1,
                            host.multiprocess,
                            &host.server_software,
                        )
                        .map_err(|e| fail(python::format_exception(py, &e)))
                    })?;
                    Placement::Threads(
                        ThreadPool::start(config, Arc::new(runner))
                            .map_err(|e| fail(format!("cannot start threads: {e}")))?,
                    )
                }
                Interface::Asgi => {
                    let ctx = Python::attach(|py| -> Result<AsgiContext, LoadError> {
                        let callable = python::load_callable(py, config)?;
                        AsgiContext::new(py, config, callable).map_err(fail)
                    })?;
                    let ctx = Arc::new(ctx);
                    let shared = LoopShared::new()
                        .map_err(|e| fail(format!("cannot create an eventfd: {e}")))?;
                    event_loop::spawn(ctx.clone(), shared.clone())
                        .map_err(|e| fail(format!("cannot start the event loop thread: {e}")))?;
                    let lifespan = ctx.lifespan() != LifespanMode::Off && {
                        let (tx, rx) = mpsc::channel();
                        shared.push(Work::LifespanStartup(tx));
                        match rx.recv() {
                            Ok(LifespanOutcome::Started) => true,
                            Ok(LifespanOutcome::Unsupported) => false,
                            Ok(LifespanOutcome::Failed(message)) => {
                                return Err(fail(format!("lifespan startup failed: {message}")))
                            }
                            Err(_) => {
                                return Err(fail(
                                    "the event loop stopped during lifespan startup".into(),
                                ))
                            }
                        }
                    };
                    Placement::Loop {
                        shared,
                        limit: config.queue_size,
                        lifespan,
                    }
                }
            };
            apps.push(App {
                config: config.clone(),
                placement,
            });
        }
        if in_process.is_empty() {
            return Ok(Dispatcher {
                router: Router::new(
                    configs
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (c.mount.as_str(), i)),
                ),
                apps,
            });
        }
        // Everything imported so far (the apps, their frameworks, asyncio) lives as long as
        // the process: moved out of the collector's generations, it is no longer traversed
        // by every full collection, which otherwise stalls a loop for milliseconds (measured
        // on an ASGI hello: p99 4.7 ms with, 1.3 ms without those pauses).
        Python::attach(|py| -> PyResult<()> {
            py.import("gc")?.call_method0("freeze")?;
            Ok(())
        })
        .map_err(|e| LoadError {
            app: String::new(),
            message: Python::attach(|py| python::format_exception(py, &e)),
        })?;
        let router = Router::new(
            configs
                .iter()
                .enumerate()
                .map(|(i, c)| (c.mount.as_str(), i)),
        );
        Ok(Dispatcher { apps, router })
    }

    /// The app serving `raw_path` (still percent-encoded) and how the path splits.
    pub fn route(&self, raw_path: &[u8]) -> Option<(&App, Route)> {
        let route = self.router.route(raw_path)?;
        Some((&self.apps[route.app], route))
    }

    /// Runs the ASGI lifespan shutdown of every app that completed its startup, waiting up to
    /// `timeout` for each (and before it, as long for ASGI requests still running: see
    /// `finish_running_calls`), then the apps' `atexit` functions. Call once, after the last
    /// request has been served.
    pub fn shutdown(&self, timeout: Duration) {
        for app in &self.apps {
            if let Placement::Pool(pool) = &app.placement {
                pool.stop(timeout);
            }
            if let Placement::Remote(remote) = &app.placement {
                remote.close();
            }
            if let Placement::Loop {
                shared, lifespan, ..
            } = &app.placement
            {
                finish_running_calls(&app.config.name, shared, timeout);
                if !lifespan {
                    continue;
                }
                let (tx, rx) = mpsc::channel();
                shared.push(Work::LifespanShutdown(tx));
                if rx.recv_timeout(timeout).is_err() {
                    log::warn!(
                        "app `{}`: lifespan shutdown did not complete within {timeout:?}",
                        app.config.name
                    );
                }
            }
        }
        python::run_exit_functions(timeout.min(ATEXIT_LIMIT));
    }

    /// Reloads every pooled app: a new generation of workers with the app's code as it is
    /// now takes over once ready, the old one finishes its requests with its own settings.
    /// `next` is the config file read again (its apps as this host runs them, and its text):
    /// a pooled app in it whose settings are the same for the server
    /// ([`AppConfig::same_for_the_server`]) gets a generation with all its new settings; any
    /// other, or every one when `next` is `None`, keeps its settings. In-process apps keep
    /// their code (their interpreter is the server's). Returns what each pool did.
    pub fn reload(&self, next: Option<(&[AppConfig], Arc<str>)>) -> Vec<Reloaded> {
        let mut outcomes = Vec::new();
        for app in &self.apps {
            match &app.placement {
                Placement::Pool(pool) => {
                    let settings = next.as_ref().and_then(|(apps, text)| {
                        apps.iter()
                            .find(|new| new.same_for_the_server(&app.config))
                            .map(|new| PoolSettings {
                                app: new.clone(),
                                file_text: text.clone(),
                            })
                    });
                    outcomes.push(Reloaded {
                        app: app.config.name.clone(),
                        kept_settings_of: settings.is_none().then(|| pool.settings_text()),
                        outcome: pool.reload(settings),
                    });
                }
                Placement::Remote(remote) => log::info!(
                    "app `{}` is pooled by the server at {}: reload that server (`kill -HUP`, or `systemctl reload`)",
                    app.config.name,
                    remote.socket().display()
                ),
                _ => log::info!(
                    "app `{}` runs in-process: a reload keeps its code (restart the server to load new code)",
                    app.config.name
                ),
            }
        }
        outcomes
    }

    /// The status page of every pooled app, as an exchange whose one event is the whole
    /// response (JSON, or lines of text with `text`): pools in other processes are asked on
    /// a thread of its own, so the host's thread never waits for them. Both hosts serve
    /// their status URL with it. A `method` other than GET or HEAD is answered 405.
    pub fn status_exchange(&self, method: &str, text: bool) -> Exchange {
        if !matches!(method, "GET" | "HEAD") {
            let (exchange, responder) = exchange::channel();
            let _ = responder.try_send(exchange::AppEvent::Failed(DispatchError::MethodNotAllowed));
            return exchange;
        }
        // One entry per pool: under nginx every location that passes to an app is an app
        // of its own here, and all of them reach the same pool.
        #[derive(PartialEq)]
        enum Key<'a> {
            Local(*const Pool),
            Remote(&'a std::path::Path),
        }
        let mut seen: Vec<Key<'_>> = Vec::new();
        let sources: Vec<(String, StatusSource)> = self
            .apps
            .iter()
            .filter_map(|app| {
                let (source, identity) = match &app.placement {
                    Placement::Pool(pool) => (
                        StatusSource::Local(pool.clone()),
                        Key::Local(Arc::as_ptr(pool)),
                    ),
                    Placement::Remote(remote) => (
                        StatusSource::Remote(remote.clone()),
                        Key::Remote(remote.socket()),
                    ),
                    _ => return None,
                };
                if seen.contains(&identity) {
                    return None;
                }
                seen.push(identity);
                Some((app.config.name.clone(), source))
            })
            .collect();
        let (exchange, responder) = exchange::channel();
        let render = move || {
            let pools: Vec<Result<PoolStatus, (String, String)>> = sources
                .into_iter()
                .map(|(name, source)| match source {
                    StatusSource::Local(pool) => Ok(pool.status()),
                    StatusSource::Remote(remote) => remote
                        .status(Duration::from_secs(2))
                        .map_err(|why| (name, why)),
                })
                .collect();
            let (body, content_type) = if text {
                let lines: Vec<String> = pools
                    .iter()
                    .map(|p| match p {
                        Ok(status) => status.to_text(),
                        Err((app, why)) => format!("app {app}: unavailable: {why}\n"),
                    })
                    .collect();
                (lines.concat(), "text/plain; charset=utf-8")
            } else {
                let objects: Vec<String> = pools
                    .iter()
                    .map(|p| match p {
                        Ok(status) => status.to_json(),
                        Err((app, why)) => crate::pool::unavailable_json(app, why),
                    })
                    .collect();
                (format!("[{}]", objects.join(",")), "application/json")
            };
            let headers = vec![
                (
                    Bytes::from_static(b"content-type"),
                    Bytes::from_static(content_type.as_bytes()),
                ),
                (
                    Bytes::from_static(b"cache-control"),
                    Bytes::from_static(b"no-store"),
                ),
            ];
            let event = match ResponseHead::with_status(200, "OK", headers) {
                Ok(head) => exchange::AppEvent::Whole(head, Bytes::from(body)),
                Err(e) => exchange::AppEvent::Failed(DispatchError::BadResponse(e)),
            };
            let _ = responder.send_blocking(event);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("portico-status".into())
            .spawn(render)
        {
            log::error!("cannot start the status thread: {e}");
        }
        exchange
    }

    /// The loaded apps, in config order.
    pub fn apps(&self) -> &[App] {
        &self.apps
    }
}

/// The longest the apps' `atexit` functions may take as the process stops.
const ATEXIT_LIMIT: Duration = Duration::from_secs(10);

/// How long requests cancelled as the server stops get to run their `finally` and return.
const CANCELLED_GRACE: Duration = Duration::from_secs(1);

/// Before an ASGI app's lifespan shutdown: waits up to `timeout` for the calls of requests
/// whose responses have ended but whose app has not returned (Starlette's `BackgroundTasks`
/// run there, after the response), and for those cut short as the server stopped; then
/// cancels what is left and gives it [`CANCELLED_GRACE`] for its cleanup. So the lifespan's
/// resources (a database, a client) are still there for them, as uvicorn waits for its tasks
/// before the lifespan shutdown (ASGI lifespan spec: shutdown comes once the server has
/// stopped serving requests).
fn finish_running_calls(name: &str, shared: &LoopShared, timeout: Duration) {
    let running = || shared.in_flight.load(Ordering::Acquire);
    let settled = |limit: Duration| {
        let deadline = Instant::now().checked_add(limit);
        while running() > 0 {
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    };
    let count = running();
    if count == 0 {
        return;
    }
    log::info!(
        "app `{name}`: waiting up to {timeout:?} for {count} request(s) still running in the \
         app (background tasks, say) before its lifespan shutdown"
    );
    if settled(timeout) {
        return;
    }
    log::warn!(
        "app `{name}`: {} request(s) still running after {timeout:?}: cancelled",
        running()
    );
    shared.push(Work::CancelRunning);
    if !settled(CANCELLED_GRACE) {
        log::warn!(
            "app `{name}`: {} request(s) still running {CANCELLED_GRACE:?} after they were \
             cancelled; the lifespan shutdown goes ahead",
            running()
        );
    }
}
