//! The `portico.toml` schema: what a sysadmin writes, how it is read and how it is checked.
//!
//! Reading happens in two steps, and both report *every* problem they find with the file, the
//! line and the key, so a sysadmin fixes a config in one pass:
//! 1. [`Config::from_toml`] parses and type-checks (unknown keys are errors: `deny_unknown_fields`);
//! 2. [`Config::validate`] checks what types cannot say (mounts, targets, conflicts between apps).
//!
//! [`Config::load`] does both. Every field documents its default; docs/configuration.md is the
//! sysadmin-facing version of the same text.

mod error;
mod identity;
mod proxies;
mod units;

pub use error::{ConfigError, ConfigErrors};
pub use identity::{groups_of, login_of, lookup_group, lookup_user, user_name};
pub use proxies::TrustedProxies;
pub use units::{ByteSize, Seconds};

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A whole `portico.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The `[server]` table: listeners and server-wide settings. Default: all defaults.
    #[serde(default)]
    pub server: ServerConfig,
    /// The `[[app]]` tables: one per mounted application. Default: none (an error at validation).
    #[serde(default)]
    pub app: Vec<AppConfig>,
}

/// The `[server]` table. The nginx module ignores it: nginx's own directives play its part there.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Addresses to listen on, as `HOST:PORT` (`[::1]:8000` for IPv6). Default: `["127.0.0.1:8000"]`.
    #[serde(default = "ServerConfig::default_listen")]
    pub listen: Vec<String>,
    /// Threads that run the HTTP side (Pingora's worker threads). Python never runs on them.
    /// Default: 1.
    #[serde(default = "ServerConfig::default_threads")]
    pub threads: usize,
    /// Where the access log goes: `"-"` for standard output, a file path (relative to the
    /// config file), or `"off"`. Default: `"-"`.
    #[serde(default = "ServerConfig::default_access_log")]
    pub access_log: String,
    /// How long an idle keep-alive connection waits for its next request header; also the
    /// limit for receiving that header. (The first request on a new connection has Pingora's
    /// fixed 60 s.) Default: 5 s.
    #[serde(default = "ServerConfig::default_keepalive_timeout")]
    pub keepalive_timeout: Seconds,
    /// How long a response waits on a client that takes none of it (for one write of at most
    /// 256 KiB to be taken) before the connection is closed, as nginx's `send_timeout`: the
    /// app's thread and iterable are let go. `0`: no limit. Default: 60 s.
    #[serde(default = "ServerConfig::default_send_timeout")]
    pub send_timeout: Seconds,
    /// On SIGTERM, how long in-flight requests get to finish before the server exits.
    /// Default: 10 s.
    #[serde(default = "ServerConfig::default_graceful_timeout")]
    pub graceful_timeout: Seconds,
    /// Whether the plain listeners also speak HTTP/2 with prior knowledge (h2c, RFC 9113
    /// section 3.3) beside HTTP/1.x: a connection that opens with the HTTP/2 preface gets
    /// HTTP/2, any other gets HTTP/1 from its first differing byte. Default: true.
    #[serde(default = "ServerConfig::default_h2c")]
    pub h2c: bool,
    /// The `[server.tls]` table: TLS listeners (HTTP/1.1 and HTTP/2 chosen by ALPN, and
    /// `wss`). Default: none.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// A file the server writes its process id to, for `portico reload` and `portico
    /// status`; relative to the config file. Default: none.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// A path on the listeners that answers with the pools' status (JSON), as
    /// `portico status` shows it; reachable by anyone who can reach the listener, so
    /// choose one that is not guessable or keep it off public listeners. Default: none.
    #[serde(default)]
    pub status_path: Option<String>,
    /// Peers whose `X-Forwarded-For` and `X-Forwarded-Proto` headers are believed (a load
    /// balancer or proxy in front): for their requests the app sees the client's address and
    /// scheme from those headers. Addresses, networks (`10.0.0.0/8`) or `"*"`; `[]` believes
    /// no one. Default: `["127.0.0.1", "::1"]`, as gunicorn and uvicorn.
    #[serde(default = "ServerConfig::default_forwarded_allow_ips")]
    pub forwarded_allow_ips: Vec<String>,
}

/// The `[server.tls]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Addresses that speak TLS, as `HOST:PORT`. Required (at least one).
    pub listen: Vec<String>,
    /// PEM file with the certificate chain, leaf first; relative to the config file. Required.
    pub certificate: PathBuf,
    /// PEM file with the private key; relative to the config file. Required.
    pub key: PathBuf,
}

impl ServerConfig {
    fn default_listen() -> Vec<String> {
        vec!["127.0.0.1:8000".to_owned()]
    }
    fn default_threads() -> usize {
        1
    }
    fn default_access_log() -> String {
        "-".to_owned()
    }
    fn default_keepalive_timeout() -> Seconds {
        Seconds::from_secs(5)
    }
    fn default_graceful_timeout() -> Seconds {
        Seconds::from_secs(10)
    }
    fn default_send_timeout() -> Seconds {
        Seconds::from_secs(60)
    }
    fn default_h2c() -> bool {
        true
    }
    fn default_forwarded_allow_ips() -> Vec<String> {
        vec!["127.0.0.1".to_owned(), "::1".to_owned()]
    }

    /// `forwarded_allow_ips`, parsed. `validate` refuses a bad entry; were one here all the
    /// same, no peer would be trusted.
    pub fn trusted_proxies(&self) -> TrustedProxies {
        TrustedProxies::parse(&self.forwarded_allow_ips).unwrap_or_default()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: Self::default_listen(),
            threads: Self::default_threads(),
            access_log: Self::default_access_log(),
            keepalive_timeout: Self::default_keepalive_timeout(),
            send_timeout: Self::default_send_timeout(),
            graceful_timeout: Self::default_graceful_timeout(),
            pid_file: None,
            status_path: None,
            h2c: Self::default_h2c(),
            tls: None,
            forwarded_allow_ips: Self::default_forwarded_allow_ips(),
        }
    }
}

/// The gateway interface an app speaks.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Interface {
    /// PEP 3333. The default.
    #[default]
    Wsgi,
    /// ASGI 3.
    Asgi,
}

/// Which asyncio event loop an ASGI app runs on.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoopKind {
    /// uvloop when it can be imported, else asyncio's own. The default.
    #[default]
    Auto,
    /// asyncio's default loop.
    Asyncio,
    /// uvloop (refused at start-up when it is not installed).
    Uvloop,
}

/// Whether an ASGI app gets the lifespan protocol (startup/shutdown events).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LifespanMode {
    /// Run it; an app that raises on the lifespan scope is served without it. The default.
    #[default]
    Auto,
    /// Run it; any error in it stops the server from starting.
    On,
    /// Do not run it.
    Off,
}

/// Where an app's Python runs.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Inside the server's own process, on Python threads of its own. The default.
    #[default]
    InProcess,
    /// In a pool of worker processes that Portico supervises.
    Pool,
}

/// One `[[app]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// A short name for logs and for nginx's `portico_pass`. Required; unique.
    pub name: String,
    /// The URL prefix the app is mounted at; it becomes `SCRIPT_NAME`. Default: `"/"`.
    #[serde(default = "AppConfig::default_mount")]
    pub mount: String,
    /// What to call, as `module:callable` (`module` alone means `module:application`). Required.
    pub target: String,
    /// `"wsgi"` or `"asgi"`. Default: `"wsgi"`.
    #[serde(default)]
    pub interface: Interface,
    /// `"in-process"` or `"pool"`. Default: `"in-process"`.
    #[serde(default)]
    pub mode: Mode,
    /// Directories put in front of `sys.path` before the target is imported; relative ones are
    /// relative to the config file. Default: none.
    #[serde(default)]
    pub python_path: Vec<PathBuf>,
    /// A virtualenv whose site-packages the app uses. Default: none (the interpreter's own).
    #[serde(default)]
    pub python_home: Option<PathBuf>,
    /// Working directory to change to before the import. Default: the server's own.
    #[serde(default)]
    pub chdir: Option<PathBuf>,
    /// Python threads that run this app's requests. Default: 4.
    #[serde(default = "AppConfig::default_threads")]
    pub threads: usize,
    /// Requests that may wait for a free Python thread; when that many already wait, the next
    /// gets 503 with `Retry-After`. Default: 1024.
    #[serde(default = "AppConfig::default_queue_size")]
    pub queue_size: usize,
    /// How long a request may wait for a free Python thread (in pool mode, for a worker)
    /// before it gets 504 without reaching the app, as mod_wsgi's `queue-timeout`: after a
    /// burst, the app serves the clients still waiting, not a backlog whose clients gave up.
    /// Checked when a thread takes the request (in a pool, also when the pool's queue hands
    /// one out or takes one in). `0` means no limit (`request_timeout` still bounds the
    /// wait). Default: 0.
    #[serde(default)]
    pub queue_timeout: Seconds,
    /// Largest request body accepted; larger ones get 413. `0` means no limit. Default: `"100M"`.
    #[serde(default = "AppConfig::default_max_body_size")]
    pub max_body_size: ByteSize,
    /// How long the app may take to start its response before the client gets 504.
    /// `0` means no limit. Default: 60 s.
    #[serde(default = "AppConfig::default_request_timeout")]
    pub request_timeout: Seconds,
    /// Longest pause between two pieces of a request body before the read fails (408).
    /// Default: 60 s.
    #[serde(default = "AppConfig::default_body_timeout")]
    pub body_timeout: Seconds,
    /// Whether the whole request body is read before the app is called, as nginx's
    /// `proxy_request_buffering` and `uwsgi_request_buffering` do: a slow client then holds no
    /// app thread, and a chunked body reaches the app with a `Content-Length` (WSGI apps such
    /// as Django read only that many bytes). Off, the body streams to the app as it reads.
    /// Default: true for WSGI apps, false for ASGI apps (a task waiting for its body holds no
    /// thread, and streaming apps want the pieces as they come).
    #[serde(default)]
    pub request_buffering: Option<bool>,
    /// ASGI only: the event loop, `"auto"`, `"asyncio"` or `"uvloop"`. Default: `"auto"`.
    #[serde(default, rename = "loop")]
    pub event_loop: LoopKind,
    /// ASGI only: the lifespan protocol, `"auto"`, `"on"` or `"off"`. Default: `"auto"`.
    #[serde(default)]
    pub lifespan: LifespanMode,
    /// ASGI only: the largest WebSocket message accepted from a client; a larger one closes
    /// the connection with 1009. `0` means no limit. Default: `"16M"`.
    #[serde(default = "AppConfig::default_websocket_max_message_size")]
    pub websocket_max_message_size: ByteSize,
    /// ASGI only: whether WebSocket compression (permessage-deflate, RFC 7692) is offered to
    /// clients that ask for it. Default: true.
    #[serde(default = "AppConfig::default_true")]
    pub websocket_per_message_deflate: bool,
    /// Pool only: how many worker processes run the app (each with `threads` threads, or one
    /// event loop); with `max_processes`, the minimum. Default: 2.
    #[serde(default = "AppConfig::default_processes")]
    pub processes: usize,
    /// Pool only: up to how many workers run when every worker is busy (all its `threads`
    /// taken); those above `processes` stop after `idle_timeout` without a request.
    /// Default: `processes` (a fixed pool).
    #[serde(default)]
    pub max_processes: Option<usize>,
    /// Pool only: how long a worker above `processes` may sit idle before it is stopped.
    /// Default: 60 s.
    #[serde(default = "AppConfig::default_idle_timeout")]
    pub idle_timeout: Seconds,
    /// Pool only: how long a starting worker may take to load the app before it is killed
    /// and started again. `0` means no limit. Default: 60 s.
    #[serde(default = "AppConfig::default_startup_timeout")]
    pub startup_timeout: Seconds,
    /// Pool only: a worker that has been given this many requests is replaced (a new one
    /// starts, the old one finishes its requests and exits), as gunicorn's and mod_wsgi's
    /// `maximum-requests`. `0` means never. Default: 0.
    #[serde(default)]
    pub max_requests: u64,
    /// Pool only: up to this many requests are added to `max_requests` at random for each
    /// worker, so that workers are not all replaced at once. Default: 0.
    #[serde(default)]
    pub max_requests_jitter: u64,
    /// Pool only: a worker whose resident memory grows past this is replaced after its
    /// current requests. `0` means no limit. Default: 0.
    #[serde(default = "AppConfig::default_max_memory")]
    pub max_memory: ByteSize,
    /// Pool only: a worker that has served this long is replaced after its current requests,
    /// as for `max_requests` (mod_wsgi's `restart-interval`, uWSGI's `max-worker-lifetime`);
    /// each worker's limit is up to a tenth longer, at random, so that workers started
    /// together are not replaced together. `0` means no limit. Default: 0.
    #[serde(default)]
    pub max_lifetime: Seconds,
    /// Pool only: how long a worker being replaced (reload, `max_requests`, `max_memory`,
    /// `max_lifetime`, a request past `request_timeout`) gets to finish its requests before it is killed.
    /// Default: 30 s.
    #[serde(default = "AppConfig::default_graceful_timeout")]
    pub graceful_timeout: Seconds,
    /// Pool only: the user the workers run as (a name or a number); the server must run as
    /// root to switch. Default: the server's.
    #[serde(default)]
    pub user: Option<String>,
    /// Pool only: the group the workers run as (a name or a number). Default: the user's
    /// primary group when `user` is set, else the server's.
    #[serde(default)]
    pub group: Option<String>,
    /// Pool only: environment variables set for the workers, over the server's own.
    /// Default: none.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Pool only: the Unix socket of a pool that runs on its own (`portico pool --config
    /// FILE`, e.g. under systemd). `portico pool` listens on it; `portico serve` and nginx
    /// connect to it instead of starting workers. A relative path is relative to the config
    /// file's directory. Default: none (`portico serve` starts the workers itself, and nginx
    /// starts a `portico pool` of its own).
    #[serde(default)]
    pub pool_socket: Option<PathBuf>,
    /// Pool only: files whose change reloads the app when `touch`ed: a new generation of
    /// workers with the app's code as it is now and the settings the pool runs, as
    /// Passenger's `tmp/restart.txt`, mod_wsgi's touched WSGI script and uWSGI's
    /// `touch-reload` do. Looked at every second; a file that does not exist yet counts
    /// once it is created. Relative paths are relative to the config file's directory.
    /// Default: none.
    #[serde(default)]
    pub touch_reload: Vec<PathBuf>,
}

impl AppConfig {
    /// Whether the host reads the whole request body before calling the app:
    /// `request_buffering`, or by default whether the app is a WSGI app.
    pub fn buffers_request_body(&self) -> bool {
        self.request_buffering
            .unwrap_or(self.interface == Interface::Wsgi)
    }

    fn default_mount() -> String {
        "/".to_owned()
    }
    fn default_threads() -> usize {
        4
    }
    fn default_queue_size() -> usize {
        1024
    }
    fn default_max_body_size() -> ByteSize {
        ByteSize(100 * 1024 * 1024)
    }
    fn default_request_timeout() -> Seconds {
        Seconds::from_secs(60)
    }
    fn default_body_timeout() -> Seconds {
        Seconds::from_secs(60)
    }
    fn default_websocket_max_message_size() -> ByteSize {
        ByteSize(16 * 1024 * 1024)
    }
    fn default_true() -> bool {
        true
    }
    fn default_processes() -> usize {
        2
    }
    fn default_startup_timeout() -> Seconds {
        Seconds::from_secs(60)
    }
    fn default_graceful_timeout() -> Seconds {
        Seconds::from_secs(30)
    }
    fn default_idle_timeout() -> Seconds {
        Seconds::from_secs(60)
    }
    fn default_max_memory() -> ByteSize {
        ByteSize(0)
    }

    /// An app with every optional key at its default.
    pub fn new(name: &str, target: &str) -> AppConfig {
        AppConfig {
            name: name.to_owned(),
            mount: Self::default_mount(),
            target: target.to_owned(),
            interface: Interface::default(),
            mode: Mode::default(),
            python_path: Vec::new(),
            python_home: None,
            chdir: None,
            threads: Self::default_threads(),
            queue_size: Self::default_queue_size(),
            queue_timeout: Seconds::default(),
            max_body_size: Self::default_max_body_size(),
            request_timeout: Self::default_request_timeout(),
            body_timeout: Self::default_body_timeout(),
            request_buffering: None,
            event_loop: LoopKind::default(),
            lifespan: LifespanMode::default(),
            websocket_max_message_size: Self::default_websocket_max_message_size(),
            websocket_per_message_deflate: true,
            processes: Self::default_processes(),
            max_processes: None,
            idle_timeout: Self::default_idle_timeout(),
            startup_timeout: Self::default_startup_timeout(),
            max_requests: 0,
            max_requests_jitter: 0,
            max_memory: ByteSize(0),
            max_lifetime: Seconds::default(),
            graceful_timeout: Self::default_graceful_timeout(),
            user: None,
            group: None,
            env: Default::default(),
            pool_socket: None,
            touch_reload: Vec::new(),
        }
    }

    /// The module and callable names of [`AppConfig::target`].
    pub fn target_parts(&self) -> (&str, &str) {
        split_target(&self.target)
    }

    /// Whether the server would act the same on this app's requests with `other`'s
    /// settings: the keys of [`SERVER_SIDE_APP_KEYS`] are equal. A reload gives a pooled app
    /// whose server-side settings are unchanged a new generation with all its new settings.
    pub fn same_for_the_server(&self, other: &AppConfig) -> bool {
        // One line per key of SERVER_SIDE_APP_KEYS, in its order.
        self.name == other.name
            && self.mount == other.mount
            && self.interface == other.interface
            && self.mode == other.mode
            && self.pool_socket == other.pool_socket
            && self.max_body_size == other.max_body_size
            && self.body_timeout == other.body_timeout
            && self.request_buffering == other.request_buffering
            && self.websocket_max_message_size == other.websocket_max_message_size
            && self.websocket_per_message_deflate == other.websocket_per_message_deflate
    }

    /// The mount without its trailing slash: `""` for `/`, `"/api"` for `/api/`.
    pub fn script_name(&self) -> &str {
        self.mount.trim_end_matches('/')
    }
}

/// Splits `module:callable`; a bare module means its `application` attribute, as in mod_wsgi.
pub fn split_target(target: &str) -> (&str, &str) {
    match target.split_once(':') {
        Some((module, callable)) => (module, callable),
        None => (target, "application"),
    }
}

/// What differs between two texts of a config file that a reload leaves unapplied, setting
/// by setting: "server.KEY" for a key of `[server]` (and its tables), "app \`NAME\`: KEY, KEY"
/// for the keys of an app, and apps added or removed. Apps for which `skip(name)` holds (a
/// pool whose new generation took its new settings, or one the caller reports itself) are
/// left out. Texts that do not parse give nothing.
pub fn changed_settings(before: &str, after: &str, skip: impl Fn(&str) -> bool) -> Vec<String> {
    let (Ok(before), Ok(after)) = (before.parse::<toml::Table>(), after.parse::<toml::Table>())
    else {
        return Vec::new();
    };
    let mut changed = Vec::new();
    let server = |t: &toml::Table| t.get("server").and_then(|v| v.as_table()).cloned();
    let (old, new) = (
        server(&before).unwrap_or_default(),
        server(&after).unwrap_or_default(),
    );
    changed.extend(changed_keys(&old, &new).map(|k| format!("server.{k}")));
    let (old_apps, new_apps) = (app_tables(&before), app_tables(&after));
    for (name, old) in &old_apps {
        match new_apps.iter().find(|(n, _)| n == name) {
            Some(_) if skip(name) => {}
            Some((_, new)) => {
                let keys: Vec<String> = changed_keys(old, new).collect();
                if !keys.is_empty() {
                    changed.push(format!("app `{name}`: {}", keys.join(", ")));
                }
            }
            None => changed.push(format!("app `{name}` removed")),
        }
    }
    for (name, _) in &new_apps {
        if !old_apps.iter().any(|(n, _)| n == name) {
            changed.push(format!("app `{name}` added"));
        }
    }
    changed
}

/// The keys of app `name` whose values differ between two texts of a config file, in order
/// (none when either text does not parse or has no such app).
pub fn changed_app_keys(before: &str, after: &str, name: &str) -> Vec<String> {
    let (Ok(before), Ok(after)) = (before.parse::<toml::Table>(), after.parse::<toml::Table>())
    else {
        return Vec::new();
    };
    let find = |t: &toml::Table| app_tables(t).into_iter().find(|(n, _)| n == name);
    match (find(&before), find(&after)) {
        (Some((_, old)), Some((_, new))) => changed_keys(&old, &new).collect(),
        _ => Vec::new(),
    }
}

/// The `[[app]]` tables of a config file, with their names.
fn app_tables(config: &toml::Table) -> Vec<(String, toml::Table)> {
    config
        .get("app")
        .and_then(|v| v.as_array())
        .map(|apps| {
            apps.iter()
                .filter_map(|a| a.as_table())
                .map(|a| {
                    let name = a.get("name").and_then(|n| n.as_str()).unwrap_or("");
                    (name.to_owned(), a.clone())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The keys of an `[[app]]` table that the server acts on itself, even for a pooled app:
/// how requests are routed to it and read for it, and how its WebSockets are relayed. A new
/// generation of pool workers cannot change them; every other key of a pooled app is its
/// workers' (see [`AppConfig::same_for_the_server`]).
pub const SERVER_SIDE_APP_KEYS: [&str; 10] = [
    "name",
    "mount",
    "interface",
    "mode",
    "pool_socket",
    "max_body_size",
    "body_timeout",
    "request_buffering",
    "websocket_max_message_size",
    "websocket_per_message_deflate",
];

/// The keys whose values differ between two tables, or that only one has, in order.
fn changed_keys<'a>(
    old: &'a toml::Table,
    new: &'a toml::Table,
) -> impl Iterator<Item = String> + 'a {
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(move |k| old.get(*k) != new.get(*k))
        .cloned()
}

/// What maps request paths to the apps of a config, which decides whether their `mount`s
/// must differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// `portico serve`: each app's `mount` routes requests to it, so no two may share one.
    Mounts,
    /// nginx's locations (`portico_pass` mounts an app at its location), or nothing (the
    /// pool processes serve what a host routed to them): `mount` is not used.
    Elsewhere,
}

impl Config {
    /// Reads, parses and validates a config file for `portico serve`. Every error names
    /// `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Config::load_for(path, Routing::Mounts)
    }

    /// [`Config::load`] for a reader whose requests are routed as `routing` says.
    pub fn load_for(path: &Path, routing: Routing) -> Result<Config, ConfigErrors> {
        Config::from_text(&Config::read_text(path)?, path, routing)
    }

    /// The text of a config file, for [`Config::from_text`]; an error names `path`.
    pub fn read_text(path: &Path) -> Result<String, ConfigErrors> {
        std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors::single(ConfigError::file(path, format!("cannot read: {e}"))))
    }

    /// [`Config::load_for`] of a file's text read already: errors name `path`, and relative
    /// paths in it are taken from `path`'s directory.
    pub fn from_text(text: &str, path: &Path, routing: Routing) -> Result<Config, ConfigErrors> {
        let (config, mut errors, refused) = Config::parse_all(text, path);
        let Some(mut config) = config else {
            return Err(ConfigErrors(errors));
        };
        // Absolute, so that a relative `--config` (whose directory is "") still gives
        // absolute paths: an app's `chdir` moves the working directory after they are read.
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        config.resolve_paths(&std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()));
        if let Err(more) = config.validate_for(text, path, routing) {
            // A refused key was read as its default: what is said of that default is moot.
            errors.extend(
                more.0
                    .into_iter()
                    .filter(|e| !e.key.as_ref().is_some_and(|k| refused.contains(k))),
            );
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            errors.sort_by_key(|e| e.line);
            Err(ConfigErrors(errors))
        }
    }

    /// Parses and type-checks, and goes on past a refused entry: each is reported (with its
    /// key) and read again without it, so one pass names every unknown key and every value
    /// of the wrong type. Returns the config read without the refused entries (if the rest
    /// parses), the errors, and the refused keys.
    fn parse_all(text: &str, path: &Path) -> (Option<Config>, Vec<ConfigError>, Vec<String>) {
        let mut errors = Vec::new();
        let mut refused: Vec<String> = Vec::new();
        // Refused entries are blanked out byte for byte, so lines and spans stay the same.
        let mut remaining = text.to_owned();
        for _ in 0..100 {
            let e = match toml::from_str::<Config>(&remaining) {
                Ok(config) => return (Some(config), errors, refused),
                Err(e) => e,
            };
            let entry = e
                .span()
                .and_then(|span| error::entry_at(&remaining, span.start));
            // A required key that was refused is then missing too, and said again: that
            // costs a line, where guessing which table it was could hide a real one.
            errors.push(ConfigError::from_toml(
                &e,
                text,
                path,
                entry.as_ref().map(|(key, _)| key.clone()),
            ));
            let Some((key, bytes)) = entry else {
                break;
            };
            let mut blanked = std::mem::take(&mut remaining).into_bytes();
            for b in &mut blanked[bytes] {
                if *b != b'\n' {
                    *b = b' ';
                }
            }
            remaining = String::from_utf8(blanked).unwrap_or_default();
            refused.push(key);
        }
        (None, errors, refused)
    }

    /// Makes relative paths (`python_path`, `python_home`, `chdir`, `pool_socket`,
    /// `touch_reload`, the TLS files, `pid_file` and an `access_log` file) relative to `base`
    /// (the config file's directory), so a config means the same from any working directory,
    /// as nginx takes its relative paths from its prefix.
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for app in &mut self.app {
            app.python_path.iter_mut().for_each(resolve);
            app.python_home.iter_mut().for_each(resolve);
            app.chdir.iter_mut().for_each(resolve);
            app.pool_socket.iter_mut().for_each(resolve);
            app.touch_reload.iter_mut().for_each(resolve);
        }
        if let Some(tls) = &mut self.server.tls {
            resolve(&mut tls.certificate);
            resolve(&mut tls.key);
        }
        self.server.pid_file.iter_mut().for_each(resolve);
        if !matches!(self.server.access_log.as_str(), "-" | "off") {
            let mut file = PathBuf::from(&self.server.access_log);
            resolve(&mut file);
            self.server.access_log = file.to_string_lossy().into_owned();
        }
    }

    /// Parses and type-checks TOML text. `path` is only used in error messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        match Config::parse_all(text, path) {
            (Some(config), errors, _) if errors.is_empty() => Ok(config),
            (_, errors, _) => Err(ConfigErrors(errors)),
        }
    }

    /// Checks what the types cannot, and reports all problems at once. `text` and `path` are
    /// the file the config came from, so each error can name its line.
    pub fn validate(&self, text: &str, path: &Path) -> Result<(), ConfigErrors> {
        self.validate_for(text, path, Routing::Mounts)
    }

    /// [`Config::validate`] for a reader whose requests are routed as `routing` says.
    pub fn validate_for(
        &self,
        text: &str,
        path: &Path,
        routing: Routing,
    ) -> Result<(), ConfigErrors> {
        let locator = error::Locator::new(text, path);
        let mut errors = Vec::new();
        let mut err = |key: String, message: String| errors.push(locator.error(&key, message));

        if let Some(path) = &self.server.status_path {
            if !path.starts_with('/') {
                err(
                    "server.status_path".into(),
                    format!("`{path}` must start with `/`"),
                );
            }
        }
        if self.server.listen.is_empty() && self.server.tls.is_none() {
            err("server.listen".into(), "needs at least one address".into());
        }
        if let Err(bad) = TrustedProxies::parse(&self.server.forwarded_allow_ips) {
            for (i, why) in bad {
                err(format!("server.forwarded_allow_ips[{i}]"), why);
            }
        }
        for (i, addr) in self.server.listen.iter().enumerate() {
            if let Some(j) = self.server.listen[..i]
                .iter()
                .position(|other| other == addr)
            {
                err(
                    format!("server.listen[{i}]"),
                    format!("`{addr}` is also server.listen[{j}]"),
                );
            }
            if addr.parse::<std::net::SocketAddr>().is_err() {
                err(
                    format!("server.listen[{i}]"),
                    format!("`{addr}` is not HOST:PORT with a numeric IP (e.g. 127.0.0.1:8000)"),
                );
            }
        }
        let plain = self.server.listen.iter().map(|a| ("server.listen", a));
        let secure = self
            .server
            .tls
            .iter()
            .flat_map(|t| t.listen.iter().map(|a| ("server.tls.listen", a)));
        let all: Vec<(&str, &String)> = plain.collect();
        for (i, addr) in secure.enumerate() {
            let key = format!("server.tls.listen[{i}]");
            if addr.1.parse::<std::net::SocketAddr>().is_err() {
                err(
                    key.clone(),
                    format!(
                        "`{}` is not HOST:PORT with a numeric IP (e.g. 0.0.0.0:8443)",
                        addr.1
                    ),
                );
            }
            if all.iter().any(|(_, other)| *other == addr.1) {
                err(key, format!("`{}` is also in server.listen", addr.1));
            }
        }
        if let Some(tls) = &self.server.tls {
            if tls.listen.is_empty() {
                err(
                    "server.tls.listen".into(),
                    "needs at least one address".into(),
                );
            }
            for (k, file) in [("certificate", &tls.certificate), ("key", &tls.key)] {
                if !file.is_file() {
                    err(
                        format!("server.tls.{k}"),
                        format!("`{}` is not a readable file", file.display()),
                    );
                }
            }
        }
        if self.server.threads == 0 {
            err("server.threads".into(), "must be at least 1".into());
        }
        if self.app.is_empty() {
            err(
                "app".into(),
                "no [[app]] table: there is nothing to serve".into(),
            );
        }

        // One interpreter and one working directory per process: in-process apps must agree.
        let mut in_process_first: Option<(usize, &AppConfig)> = None;
        for (i, app) in self.app.iter().enumerate() {
            let key = |k: &str| format!("app[{i}].{k}");
            if app.name.is_empty()
                || !app
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                err(
                    key("name"),
                    format!(
                        "`{}` must be non-empty letters, digits, `-`, `_` or `.`",
                        app.name
                    ),
                );
            }
            if let Some(j) = self.app[..i]
                .iter()
                .position(|other| other.name == app.name)
            {
                err(
                    key("name"),
                    format!("`{}` is also the name of app[{j}]", app.name),
                );
            }
            if !app.mount.starts_with('/') {
                err(key("mount"), format!("`{}` must start with `/`", app.mount));
            } else if app.mount.contains(['?', '#', '%'])
                || app.mount.contains("//")
                || !app.mount.bytes().all(|b| b.is_ascii_graphic())
            {
                err(
                    key("mount"),
                    format!(
                        "`{}` must be a plain ASCII path prefix (no spaces, `?`, `#`, `%` or `//`)",
                        app.mount
                    ),
                );
            }
            if let Some(j) = self.app[..i]
                .iter()
                .position(|other| other.script_name() == app.script_name())
                .filter(|_| routing == Routing::Mounts)
            {
                err(
                    key("mount"),
                    format!(
                        "`{}` is also the mount of app[{j}] (a file for nginx, whose locations route requests, is checked with `portico check --nginx`)",
                        app.mount
                    ),
                );
            }
            let (module, callable) = app.target_parts();
            if !is_dotted_name(module) || !is_dotted_name(callable) {
                err(
                    key("target"),
                    format!(
                        "`{}` is not `module:callable` (e.g. `myproject.wsgi:application`)",
                        app.target
                    ),
                );
            }
            if app.threads == 0 {
                err(key("threads"), "must be at least 1".into());
            }
            if app.queue_size == 0 {
                err(key("queue_size"), "must be at least 1".into());
            }
            if app.processes == 0 {
                err(key("processes"), "must be at least 1".into());
            }
            if let Some(max) = app.max_processes {
                if max < app.processes {
                    err(
                        key("max_processes"),
                        format!("must be at least processes ({})", app.processes),
                    );
                }
            }
            for (k, dir) in app
                .python_path
                .iter()
                .enumerate()
                .map(|(k, d)| (format!("python_path[{k}]"), d))
                .chain(app.chdir.iter().map(|d| ("chdir".to_owned(), d)))
                .chain(
                    app.python_home
                        .iter()
                        .map(|d| ("python_home".to_owned(), d)),
                )
            {
                if !dir.is_dir() {
                    err(key(&k), format!("`{}` is not a directory", dir.display()));
                }
            }
            // Who the workers run as: named now, so that a typo stops the start here and not
            // at the first worker. In-process there is nobody to switch: the app runs as the
            // server, in its environment, and a silent ignore would run it as root.
            if let Some(user) = &app.user {
                if let Err(why) = lookup_user(user) {
                    err(key("user"), why);
                }
            }
            if let Some(group) = &app.group {
                if let Err(why) = lookup_group(group) {
                    err(key("group"), why);
                }
            }
            if app.mode == Mode::InProcess {
                for k in ["user", "group", "env"] {
                    if locator.app_sets(i, k) {
                        err(
                            key(k),
                            "is only for mode = \"pool\" (an in-process app runs as the server, in its environment)".into(),
                        );
                    }
                }
                // An in-process ASGI app's requests go to its event loop at once: none waits
                // for a thread, so a queue_timeout there would be a limit that never acts.
                if app.interface == Interface::Asgi && app.queue_timeout.as_limit().is_some() {
                    err(
                        key("queue_timeout"),
                        "is for WSGI apps and pooled apps (an in-process ASGI app's requests wait for no thread)".into(),
                    );
                }
                // The pool's own settings mean nothing in-process: said, not ignored, so a
                // pool left at `mode`'s default is not taken for one that recycles its workers.
                for k in POOL_ONLY {
                    if locator.app_sets(i, k) {
                        err(
                            key(k),
                            "is only for mode = \"pool\" (this app runs in-process: set mode = \"pool\", or remove it)".into(),
                        );
                    }
                }
            }
            for (j, file) in app.touch_reload.iter().enumerate() {
                if file.is_dir() {
                    err(
                        key(&format!("touch_reload[{j}]")),
                        format!(
                            "`{}` is a directory: name a file, whose change reloads the app",
                            file.display()
                        ),
                    );
                }
            }
            if let Some(socket) = &app.pool_socket {
                if app.mode != Mode::Pool {
                    err(
                        key("pool_socket"),
                        "is only for mode = \"pool\" (an in-process app has no pool to connect to)"
                            .into(),
                    );
                }
                if let Some(j) = self.app[..i]
                    .iter()
                    .position(|other| other.pool_socket.as_ref() == Some(socket))
                {
                    err(
                        key("pool_socket"),
                        format!("`{}` is also the pool_socket of app[{j}]", socket.display()),
                    );
                }
                if socket.as_os_str().len() > 107 {
                    err(
                        key("pool_socket"),
                        format!(
                            "`{}` is longer than a Unix socket path may be (107 bytes)",
                            socket.display()
                        ),
                    );
                }
            }
            if app.mode == Mode::InProcess {
                match in_process_first {
                    Some((j, first)) => {
                        if first.python_home != app.python_home {
                            err(
                                key("python_home"),
                                format!("in-process apps share one interpreter, but app[{j}] uses a different python_home"),
                            );
                        }
                        if first.chdir != app.chdir {
                            err(
                                key("chdir"),
                                format!("in-process apps share one working directory, but app[{j}] uses a different chdir"),
                            );
                        }
                    }
                    None => in_process_first = Some((i, app)),
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// The pool's settings that an in-process app cannot have (besides `user`, `group`, `env`
/// and `pool_socket`, refused with their own reasons).
const POOL_ONLY: [&str; 10] = [
    "processes",
    "max_processes",
    "idle_timeout",
    "startup_timeout",
    "max_requests",
    "max_requests_jitter",
    "max_memory",
    "max_lifetime",
    "graceful_timeout",
    "touch_reload",
];

fn is_dotted_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            let mut chars = part.chars();
            matches!(chars.next(), Some(c) if c.is_alphabetic() || c == '_')
                && chars.all(|c| c.is_alphanumeric() || c == '_')
        })
}

#[cfg(test)]
mod tests;
