//! Portico's Pingora host.
//!
//! [`PorticoProxy`] is a [`ProxyHttp`] that answers every request from the Python apps of a
//! [`Dispatcher`]; put it in a Pingora server of your own with
//! [`pingora::proxy::http_proxy_service`], or run the `portico` binary, which does exactly that.
//! To mix Portico into a proxy of your own, call [`Portico::serve`] from your
//! `request_filter`: it answers the requests that fall under an app's mount and leaves the
//! others to you.
//!
//! Python never runs on Pingora's threads: a request is handed to the app's own Python
//! threads and the response comes back as events (see `portico_core::exchange`).

pub mod access_log;
pub mod error_log;
pub mod listener;
mod serve;
mod spool;
mod websocket;

use access_log::AccessLog;
use async_trait::async_trait;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use portico_core::Dispatcher;
use std::sync::Arc;
use std::time::Duration;

/// `server.send_timeout`'s default, as nginx's.
const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// The apps of one server and how requests to them are served. Cheap to clone.
#[derive(Clone)]
pub struct Portico {
    dispatcher: Arc<Dispatcher>,
    access_log: AccessLog,
    keepalive_timeout: Duration,
    /// How long a write to the client may wait (`server.send_timeout`); `None`: no limit.
    send_timeout: Option<Duration>,
    server_cert: Option<Arc<str>>,
    status_path: Option<Arc<str>>,
    /// Peers whose `X-Forwarded-For` and `X-Forwarded-Proto` are believed.
    trusted_proxies: Arc<portico_config::TrustedProxies>,
    /// Set once the server stops: open WebSockets close with 1012.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Portico {
    /// Serves the apps of `dispatcher`, logging to `access_log`; idle keep-alive connections
    /// wait `keepalive_timeout` for their next request.
    pub fn new(
        dispatcher: Arc<Dispatcher>,
        access_log: AccessLog,
        keepalive_timeout: Duration,
    ) -> Portico {
        Portico {
            dispatcher,
            access_log,
            keepalive_timeout,
            send_timeout: Some(DEFAULT_SEND_TIMEOUT),
            server_cert: None,
            status_path: None,
            trusted_proxies: Arc::default(),
            stopping: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// Tells the WebSockets this host serves that the server is stopping: each client gets a
    /// close frame with 1012 (service restart) and each app a `websocket.disconnect` with
    /// that code, as uvicorn closes them, so that clients reconnect at once rather than being
    /// cut without a word when the grace period ends. New WebSockets accepted after this are
    /// closed the same way. [`listener::PorticoApp`] calls it when a graceful stop begins; a
    /// Pingora server with a `ServerApp` of its own calls it from its `cleanup`.
    pub fn stop_websockets(&self) {
        self.stopping.send_replace(true);
    }

    /// How long a response may wait on a client that takes none of it before the connection
    /// is closed (`server.send_timeout`, as nginx's `send_timeout`); `None`: no limit.
    /// Default: 60 s.
    pub fn with_send_timeout(mut self, timeout: Option<Duration>) -> Portico {
        self.send_timeout = timeout;
        self
    }

    /// The PEM certificate the TLS listeners present, for the ASGI `tls` extension's
    /// `server_cert`.
    pub fn with_server_cert(mut self, pem: Option<String>) -> Portico {
        self.server_cert = pem.map(Arc::from);
        self
    }

    /// Believes the `X-Forwarded-For` and `X-Forwarded-Proto` headers of requests from
    /// these peers (`server.forwarded_allow_ips`): the app sees the client's address and
    /// scheme they name. Default: no peer (a `Portico` built by hand trusts no one).
    pub fn with_trusted_proxies(mut self, trusted: portico_config::TrustedProxies) -> Portico {
        self.trusted_proxies = Arc::new(trusted);
        self
    }

    /// Answers GET `path` with the pools' status (JSON, as `portico status` shows it).
    pub fn with_status_path(mut self, path: Option<String>) -> Portico {
        self.status_path = path.map(Arc::from);
        self
    }

    /// Writes `session`'s line to the access log given to [`Portico::new`] (nothing when it
    /// is off). [`PorticoProxy`] calls it from its `logging` for every request; a proxy of
    /// your own calls it from its `logging` for the requests [`Portico::serve`] answered
    /// (`serve` itself writes no line, since the request's status is known only at the end).
    pub fn log_access(&self, session: &Session) {
        if !self.access_log.enabled() {
            return;
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let req = session.req_header();
        // The client the app saw: the one a trusted proxy names, else the peer (as uvicorn
        // logs it behind --proxy-headers).
        let client = session.client_addr().and_then(|a| a.as_inet()).map_or_else(
            || "-".to_owned(),
            |peer| {
                portico_core::forwarded::client_address(
                    peer.ip(),
                    req.headers
                        .get_all("x-forwarded-for")
                        .iter()
                        .map(|v| v.as_bytes()),
                    &self.trusted_proxies,
                )
                .to_string()
            },
        );
        let protocol = match req.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2.0",
            _ => "HTTP/1.1",
        };
        self.access_log.log(&access_log::Entry {
            client: &client,
            method: req.method.as_str(),
            target: req.raw_path(),
            protocol,
            status,
            bytes: session.body_bytes_sent(),
            referer: req.headers.get("referer").map(|v| v.as_bytes()),
            user_agent: req.headers.get("user-agent").map(|v| v.as_bytes()),
        });
    }

    /// The dispatcher behind this host.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Serves `session` if an app is mounted at its path.
    ///
    /// Returns `Ok(false)` without touching the session when no mount matches, so the caller
    /// can serve the request another way. `Ok(true)` means the response (the app's, or an
    /// error status) has been written. `Err` means the response could not be completed
    /// (client gone, or an app failed after its head was sent): the connection must not be
    /// reused.
    pub async fn serve(&self, session: &mut Session) -> pingora::Result<bool> {
        serve::serve(self, session).await
    }
}

/// A [`ProxyHttp`] that serves every request from Portico's apps and proxies nothing:
/// paths under no mount get 404.
#[derive(Clone)]
pub struct PorticoProxy {
    portico: Portico,
}

impl PorticoProxy {
    /// Wraps a [`Portico`].
    pub fn new(portico: Portico) -> PorticoProxy {
        PorticoProxy { portico }
    }
}

#[async_trait]
impl ProxyHttp for PorticoProxy {
    type CTX = ();

    /// Runs once per request, before anything else. Portico keeps no per-request context.
    fn new_ctx(&self) {}

    /// Runs once, when the service is built, to choose the modules every response passes
    /// through. Pingora's default adds its response compression module, switched off (level
    /// 0), which still builds a context and runs its filters for every request. Portico adds
    /// none: its apps compress what they want compressed, and a request costs about a
    /// microsecond less.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    /// Runs after the request header is read. Portico answers every request here and returns
    /// `Ok(true)` ("response sent"), so Pingora never looks for an upstream. The default
    /// (Pingora's) returns `Ok(false)`.
    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        // A request under no mount, answered 404, may be followed by pipelined ones too
        // (`Portico::serve` enables pipelining for those it serves).
        session.as_downstream_mut().set_pipelining_enabled(true);
        if !self.portico.serve(session).await? {
            serve::respond_error(session, &portico_core::DispatchError::NoRoute).await?;
        }
        Ok(true)
    }

    /// Never called: `request_filter` answers every request. Errors if it ever is.
    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Error::e_explain(ErrorType::InternalError, "portico has no upstream")
    }

    /// Runs when `request_filter` failed. Once a response head went out, the only honest
    /// thing left is to close the connection so the client sees the response is cut short;
    /// before that, Pingora's default (an error status) applies. Never reuses the connection.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, _ctx: &mut ()) -> FailToProxy {
        let code = if session.response_written().is_some() {
            0
        } else {
            match e.etype() {
                ErrorType::HTTPStatus(code) => *code,
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => 0,
                _ => 500,
            }
        };
        if code > 0 {
            let _ = session.respond_error(code).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Client disconnects are normal life for a server, not errors worth a log line.
    fn suppress_error_log(&self, _session: &Session, _ctx: &(), e: &Error) -> bool {
        matches!(
            e.etype(),
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed
        )
    }

    /// Runs last for every request, also failed ones: writes the access-log line
    /// ([`Portico::log_access`]).
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, _ctx: &mut ()) {
        self.portico.log_access(session);
    }
}
