//! The core's error types. [`DispatchError::status`] is the one place where an error becomes
//! an HTTP status; hosts never pick a status for an error themselves.

use std::fmt;

/// Why a request could not be answered by its app the normal way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DispatchError {
    /// No app is mounted at the request's path.
    NoRoute,
    /// The request is malformed in a way the host did not catch.
    BadRequest(String),
    /// The request body is larger than the app's `max_body_size`.
    BodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The client paused sending its body longer than `body_timeout`.
    BodyTimeout,
    /// A WebSocket handshake asked for a protocol version other than 13 (RFC 6455 section
    /// 4.4).
    UpgradeRequired,
    /// The app closed a WebSocket before accepting it (ASGI WebSocket spec: 403).
    WebSocketDenied,
    /// The app's queue is full: every thread is busy and the backlog is at its limit.
    Overloaded,
    /// The app did not start its response within `request_timeout`; for which app, and the
    /// limit, for the log.
    AppTimeout(String),
    /// The request waited for a thread (or a pool worker) longer than the app's
    /// `queue_timeout`, and never reached the app; how long, and for which app.
    QueueTimeout(String),
    /// The app raised (its traceback is already in the log).
    AppRaised(String),
    /// The app broke the gateway protocol: a bad status or header, a `str` body, etc.
    /// The message is already in the log.
    BadResponse(String),
    /// The pool worker running the request went away (it crashed, was killed or broke the
    /// protocol) before the response was complete.
    WorkerLost(String),
    /// A pool server (`pool_socket`) could not be reached; why.
    PoolUnreachable(String),
    /// The request's method is not one the resource answers (the status page: GET, HEAD).
    MethodNotAllowed,
    /// The host could not keep or read back a request body it buffers
    /// (`request_buffering`): its temporary file failed (a full disk, say).
    BodyStore(String),
}

impl DispatchError {
    /// A request that waited `waited` in app `app`'s queue, past its `queue_timeout`
    /// (`limit`): the text names both for the log.
    pub fn queue_timeout(
        app: &str,
        waited: std::time::Duration,
        limit: std::time::Duration,
    ) -> Self {
        DispatchError::QueueTimeout(format!(
            "a request waited {} ms in app `{app}`'s queue, past its queue_timeout ({} ms); \
             answered 504 without calling the app",
            waited.as_millis(),
            limit.as_millis()
        ))
    }

    /// A request app `app` gave no response head within its `request_timeout` (`limit`).
    pub fn app_timeout(app: &str, limit: std::time::Duration) -> Self {
        DispatchError::AppTimeout(format!(
            "app `{app}` gave no response within its request_timeout ({}); answered 504",
            portico_config::Seconds(limit)
        ))
    }

    /// The HTTP status the client gets for this error (RFC 9110, section 15).
    pub fn status(&self) -> u16 {
        match self {
            DispatchError::NoRoute => 404,
            DispatchError::BadRequest(_) => 400,
            DispatchError::BodyTimeout => 408,
            DispatchError::BodyTooLarge { .. } => 413,
            DispatchError::WebSocketDenied => 403,
            DispatchError::UpgradeRequired => 426,
            DispatchError::AppRaised(_)
            | DispatchError::BadResponse(_)
            | DispatchError::BodyStore(_) => 500,
            DispatchError::WorkerLost(_) | DispatchError::PoolUnreachable(_) => 502,
            DispatchError::Overloaded => 503,
            DispatchError::MethodNotAllowed => 405,
            // As mod_wsgi's queue-timeout and Passenger's max_request_queue_time answer.
            DispatchError::AppTimeout(_) | DispatchError::QueueTimeout(_) => 504,
        }
    }

    /// How loudly a host logs this error when it answers with it: the faults of the pool
    /// and of the host's body store, which nothing else has logged; `None` for the client's
    /// mistakes and for errors the app's thread has logged already (with the traceback).
    pub fn log_level(&self) -> Option<log::Level> {
        match self {
            // A request past request_timeout is a fault, logged as nginx logs "upstream timed
            // out", gunicorn its WORKER TIMEOUT and mod_wsgi "Timeout when reading response
            // headers": at a level a default `error_log` keeps.
            DispatchError::WorkerLost(_)
            | DispatchError::PoolUnreachable(_)
            | DispatchError::BodyStore(_)
            | DispatchError::AppTimeout(_) => Some(log::Level::Error),
            // The app is falling behind: a sysadmin wants to see it, though nothing failed.
            DispatchError::QueueTimeout(_) => Some(log::Level::Warn),
            _ => None,
        }
    }

    /// Extra response headers that go with the status (`Retry-After` for 503).
    pub fn extra_headers(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            DispatchError::Overloaded => &[("retry-after", "1")],
            DispatchError::UpgradeRequired => &[("sec-websocket-version", "13")],
            // RFC 9110 section 15.5.6: a 405 says which methods would do.
            DispatchError::MethodNotAllowed => &[("allow", "GET, HEAD")],
            _ => &[],
        }
    }
}

impl fmt::Display for DispatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DispatchError::NoRoute => write!(f, "no app is mounted at this path"),
            DispatchError::MethodNotAllowed => write!(f, "method not allowed here"),
            DispatchError::BadRequest(why) => write!(f, "bad request: {why}"),
            DispatchError::BodyTooLarge { limit } => {
                write!(f, "request body larger than max_body_size ({limit} bytes)")
            }
            DispatchError::BodyTimeout => write!(f, "timed out reading the request body"),
            DispatchError::Overloaded => write!(f, "the app's request queue is full"),
            DispatchError::UpgradeRequired => {
                write!(f, "unsupported WebSocket version (only 13 is)")
            }
            DispatchError::WebSocketDenied => {
                write!(f, "the app closed the WebSocket before accepting it")
            }
            DispatchError::AppTimeout(why) => write!(f, "{why}"),
            DispatchError::QueueTimeout(why) => write!(f, "{why}"),
            DispatchError::AppRaised(why) => write!(f, "the app raised: {why}"),
            DispatchError::BadResponse(why) => write!(f, "invalid response from the app: {why}"),
            DispatchError::WorkerLost(why) => write!(f, "the app's worker process was lost: {why}"),
            DispatchError::PoolUnreachable(why) => {
                write!(f, "the app's pool is unreachable: {why}")
            }
            DispatchError::BodyStore(why) => {
                write!(f, "cannot buffer the request body: {why}")
            }
        }
    }
}

impl std::error::Error for DispatchError {}

/// RFC 6455 section 4.2.2: 426 with `Sec-WebSocket-Version` for a version we do not speak,
/// 400 for anything else malformed.
impl From<crate::websocket::HandshakeError> for DispatchError {
    fn from(e: crate::websocket::HandshakeError) -> DispatchError {
        match e {
            crate::websocket::HandshakeError::UnsupportedVersion => DispatchError::UpgradeRequired,
            other => DispatchError::BadRequest(other.to_string()),
        }
    }
}

/// An app that could not be loaded: the interpreter, the virtualenv, the import or the callable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The app's name from the config.
    pub app: String,
    /// What went wrong; for an import error, the Python traceback.
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "app `{}` cannot be loaded: {}", self.app, self.message)
    }
}

impl std::error::Error for LoadError {}
