//! `portico`: serve Python web apps from Pingora.
//!
//! This file only turns the command line into a config, checks it, and hands over. Exit
//! codes: 64 for a configuration error (EX_USAGE), 70 for an app that cannot be loaded
//! (EX_SOFTWARE), 71 for a listener that cannot be bound (EX_OSERR).

mod nginx_pools;
mod pool_cmd;
mod reload;
mod run_file;
mod stop;
mod watchdog;

use clap::{Parser, Subcommand};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service;
use portico_config::{
    AppConfig, Config, ConfigError, ConfigErrors, Interface, LifespanMode, LoopKind, Routing,
    TlsConfig,
};
use portico_core::pool::PoolHost;
use portico_core::{Dispatcher, HostInfo};
use portico_proxy::access_log::AccessLog;
use portico_proxy::listener::PorticoApp;
use portico_proxy::{Portico, PorticoProxy};
use reload::ConfigSnapshot;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

// Request buffers are allocated on the HTTP thread and freed on a Python thread, and response
// buffers the other way round; mimalloc frees across threads cheaply where glibc takes the
// other arena's lock (measured: +15% on a 64 KiB echo, +5% on a hello).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXIT_CONFIG: u8 = 64;
const EXIT_APP: u8 = 70;
const EXIT_BIND: u8 = 71;

#[derive(Parser)]
#[command(
    name = "portico",
    version,
    about = "Serve Python WSGI and ASGI apps from Pingora, in-process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one app at `/`, configured from the command line (like gunicorn or uvicorn).
    Run(Box<RunArgs>),
    /// Serve what a portico.toml says.
    Serve {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Only check a portico.toml: exit 0 if it is valid, 64 with every problem listed if not.
    Check {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Check it as nginx reads it (`portico_config`): its locations route requests, so
        /// apps need no mounts of their own.
        #[arg(long)]
        nginx: bool,
    },
    /// Run the pooled apps (mode = "pool") on their own, each on its `pool_socket`, for
    /// `portico serve` and nginx to connect to (e.g. as a systemd service). SIGHUP reloads.
    Pool(Box<pool_cmd::PoolArgs>),
    /// Reload the pooled apps of a running server (SIGHUP to the pid in `server.pid_file`):
    /// new workers with the new code take over, the old ones finish their requests.
    Reload {
        /// The running server's config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the running server's pools: each worker's pid, generation, requests served and
    /// in flight, memory, and the latest restarts with their reasons (from
    /// `server.status_path`, or from the pools themselves).
    Status {
        /// The running server's config file.
        #[arg(long, short, required_unless_present = "nginx")]
        config: Option<PathBuf>,
        /// Instead: the pools that the nginx with this pid file started (`pid` in
        /// nginx.conf; Debian's is /run/nginx.pid).
        #[arg(long, value_name = "PID_FILE", conflicts_with = "config")]
        nginx: Option<PathBuf>,
        /// Print the JSON the status path answers with.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The app, as MODULE:CALLABLE (MODULE alone means MODULE:application).
    target: String,
    /// The gateway interface the app speaks.
    #[arg(long, default_value = "wsgi", value_parser = ["wsgi", "asgi"])]
    interface: String,
    /// Address to listen on; repeat for several.
    #[arg(long, short, default_value = "127.0.0.1:8000")]
    bind: Vec<String>,
    /// Python threads for the app.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Threads for the HTTP side.
    #[arg(long, default_value_t = 1)]
    server_threads: usize,
    /// Change to this directory before importing the app.
    #[arg(long)]
    chdir: Option<PathBuf>,
    /// Put this directory in front of sys.path; repeat for several. Default: the working
    /// directory, as gunicorn does.
    #[arg(long)]
    python_path: Vec<PathBuf>,
    /// A virtualenv to take packages from.
    #[arg(long)]
    python_home: Option<PathBuf>,
    /// Access log: `-` (standard output), `off`, or a file.
    #[arg(long, default_value = "-")]
    access_log: String,
    /// ASGI: the event loop.
    #[arg(long = "loop", default_value = "auto", value_parser = ["auto", "asyncio", "uvloop"])]
    event_loop: String,
    /// ASGI: the lifespan protocol.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    lifespan: String,
    /// ASGI: do not offer WebSocket compression (permessage-deflate).
    #[arg(long)]
    no_ws_deflate: bool,
    /// Address to listen on with TLS (needs --tls-certificate and --tls-key); repeat for several.
    #[arg(long)]
    tls_bind: Vec<String>,
    /// PEM certificate chain for the TLS listeners.
    #[arg(long)]
    tls_certificate: Option<PathBuf>,
    /// PEM private key for the TLS listeners.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Peers whose X-Forwarded-For and X-Forwarded-Proto are believed: addresses or networks,
    /// comma-separated, `*` for all, `""` for none (uvicorn's and gunicorn's flag).
    #[arg(long, default_value = "127.0.0.1,::1")]
    forwarded_allow_ips: String,
    /// Run the app in N worker processes of its own (a pool, as `mode = "pool"` with
    /// `processes = N`), as gunicorn's and uvicorn's --workers; without it the app runs
    /// inside this process.
    #[arg(long, short = 'w')]
    workers: Option<usize>,
}

fn main() -> ExitCode {
    // SIGHUP (reload) is taken by a thread of its own with sigwait: blocked here, before any
    // thread starts, so that every thread inherits the mask and none is interrupted by it.
    block_sighup();
    portico_core::tune_allocator();
    init_logging();
    let cli = Cli::parse();
    let (config, source, file) = match cli.command {
        Command::Run(args) => match config_from_args(*args) {
            Ok((config, None)) => (config, "command line".to_owned(), None),
            Ok((config, Some(pool_toml))) => match run_file::RunFile::write(&pool_toml) {
                Ok(file) => {
                    let snapshot = match ConfigSnapshot::read(file.path()) {
                        Ok(snapshot) => snapshot,
                        Err(e) => return config_failed(&e),
                    };
                    return serve(config, "command line", Some(snapshot), Some(file));
                }
                Err(e) => {
                    eprintln!("portico: cannot write the config file of the workers: {e}");
                    return ExitCode::FAILURE;
                }
            },
            Err(e) => return config_failed(&e),
        },
        // One reading of the file, for the server and its pool workers alike.
        Command::Serve { config } => match ConfigSnapshot::read(&config).and_then(|snapshot| {
            Config::from_text(&snapshot.text(), &config, Routing::Mounts).map(|c| (c, snapshot))
        }) {
            Ok((c, snapshot)) => (c, config.display().to_string(), Some(snapshot)),
            Err(e) => return config_failed(&e),
        },
        Command::Reload { config } => return reload(&config),
        Command::Pool(args) => return pool_cmd::run(*args),
        Command::Status {
            config,
            nginx,
            json,
        } => {
            return match (nginx, config) {
                (Some(pid_file), _) => nginx_status(&pid_file, json),
                (None, Some(config)) => status(&config, json),
                (None, None) => unreachable!("clap requires --config or --nginx"),
            }
        }
        Command::Check { config, nginx } => {
            let routing = if nginx {
                Routing::Elsewhere
            } else {
                Routing::Mounts
            };
            return match Config::load_for(&config, routing) {
                Ok(c) => {
                    // The certificate and key are loaded as `serve` would load them.
                    if let Some(Err(e)) = c.server.tls.as_ref().map(check_tls_files) {
                        eprintln!(
                            "portico: invalid configuration:\n  {}: server.tls: {e}",
                            config.display()
                        );
                        return ExitCode::from(EXIT_CONFIG);
                    }
                    println!("{}: ok ({} app(s))", config.display(), c.app.len());
                    ExitCode::SUCCESS
                }
                Err(e) => config_failed(&e),
            };
        }
    };
    serve(config, &source, file, None)
}

fn init_logging() {
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Info)
        .filter_module("pingora_core", log::LevelFilter::Warn)
        .filter_module("pingora_proxy", log::LevelFilter::Warn)
        .parse_env("PORTICO_LOG")
        .format_target(false)
        .init();
}

fn config_failed(e: &ConfigErrors) -> ExitCode {
    eprintln!("portico: invalid configuration:");
    for error in &e.0 {
        eprintln!("  {error}");
    }
    ExitCode::from(EXIT_CONFIG)
}

/// `portico run`: the same Config a file would give, checked by the same `validate`, with
/// errors named by the flag rather than the TOML key; with `--workers`, also the config file
/// text its pool workers load the app from.
fn config_from_args(args: RunArgs) -> Result<(Config, Option<String>), ConfigErrors> {
    let mut app = AppConfig::new("app", &args.target);
    app.interface = match args.interface.as_str() {
        "asgi" => Interface::Asgi,
        _ => Interface::Wsgi,
    };
    app.event_loop = match args.event_loop.as_str() {
        "asyncio" => LoopKind::Asyncio,
        "uvloop" => LoopKind::Uvloop,
        _ => LoopKind::Auto,
    };
    app.lifespan = match args.lifespan.as_str() {
        "on" => LifespanMode::On,
        "off" => LifespanMode::Off,
        _ => LifespanMode::Auto,
    };
    app.websocket_per_message_deflate = !args.no_ws_deflate;
    app.threads = args.threads;
    app.chdir = args.chdir;
    app.python_home = args.python_home;
    app.python_path = if !args.python_path.is_empty() {
        args.python_path
    } else if app.chdir.is_some() {
        // Import from the directory changed to, as gunicorn's --chdir does.
        Vec::new()
    } else {
        std::env::current_dir().into_iter().collect()
    };
    if let Some(workers) = args.workers {
        app.mode = portico_config::Mode::Pool;
        app.processes = workers;
    }
    let pool_toml = args.workers.map(|processes| {
        run_file::RunApp {
            target: &args.target,
            interface: &args.interface,
            event_loop: &args.event_loop,
            lifespan: &args.lifespan,
            ws_deflate: !args.no_ws_deflate,
            threads: args.threads,
            processes,
            chdir: app.chdir.as_deref(),
            python_home: app.python_home.as_deref(),
            python_path: &app.python_path,
        }
        .to_toml(&app.name)
    });
    let mut config = Config {
        server: Default::default(),
        app: vec![app],
    };
    config.server.listen = args.bind;
    let tls_given =
        !args.tls_bind.is_empty() || args.tls_certificate.is_some() || args.tls_key.is_some();
    if tls_given {
        config.server.tls = Some(TlsConfig {
            listen: args.tls_bind,
            certificate: args.tls_certificate.unwrap_or_default(),
            key: args.tls_key.unwrap_or_default(),
        });
    }
    config.server.threads = args.server_threads;
    config.server.access_log = args.access_log;
    config.server.forwarded_allow_ips = args
        .forwarded_allow_ips
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    const FLAGS: [(&str, &str); 12] = [
        ("server.tls.listen", "--tls-bind"),
        ("server.tls.certificate", "--tls-certificate"),
        ("server.tls.key", "--tls-key"),
        ("server.listen", "--bind"),
        ("server.threads", "--server-threads"),
        ("server.forwarded_allow_ips", "--forwarded-allow-ips"),
        ("app[0].processes", "--workers"),
        ("app[0].target", "TARGET"),
        ("app[0].threads", "--threads"),
        ("app[0].chdir", "--chdir"),
        ("app[0].python_path", "--python-path"),
        ("app[0].python_home", "--python-home"),
    ];
    config
        .validate("", Path::new("portico run"))
        .map_err(|errors| {
            ConfigErrors(
                errors
                    .0
                    .into_iter()
                    .map(|e| {
                        let key = e.key.as_deref().unwrap_or_default();
                        let flag = FLAGS
                            .iter()
                            .find(|(k, _)| key.starts_with(k))
                            .map_or(key, |(_, flag)| flag);
                        ConfigError::file(
                            Path::new("portico run"),
                            format!("{flag}: {}", e.message),
                        )
                    })
                    .collect(),
            )
        })?;
    Ok((config, pool_toml))
}

/// Serves `config` (read from the file of `snapshot`, if any). `run_file` is the file
/// `portico run --workers` wrote for its workers: kept until the server stops.
fn serve(
    config: Config,
    source: &str,
    snapshot: Option<ConfigSnapshot>,
    run_file: Option<run_file::RunFile>,
) -> ExitCode {
    // Pool workers read their app from the same text; `portico-worker` sits beside us.
    let pool = snapshot.as_ref().and_then(|snapshot| {
        let worker_binary = std::env::current_exe()
            .ok()?
            .with_file_name("portico-worker");
        Some(PoolHost {
            worker_binary,
            config_file: snapshot.path().to_path_buf(),
            default_identity: None,
            config_text: snapshot.text(),
        })
    });
    let host = HostInfo {
        server_software: format!("portico/{}", env!("CARGO_PKG_VERSION")),
        multiprocess: false,
        pool,
    };
    if let Some(tls) = &config.server.tls {
        // Pingora reads these files inside its listener thread and panics there, leaving a
        // process that serves nothing: check them here instead.
        if let Err(e) = check_tls_files(tls) {
            eprintln!("portico: invalid configuration:\n  {source}: server.tls: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    // Fail with a clear message now rather than a panic inside Pingora later.
    if let Err(e) = try_listen_addresses(&config.server) {
        eprintln!("portico: {e}");
        return ExitCode::from(EXIT_BIND);
    }
    let access_log = match AccessLog::open(&config.server.access_log) {
        Ok(log) => log,
        Err(e) => {
            eprintln!(
                "portico: {source}: server.access_log: cannot open {}: {e}",
                config.server.access_log
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The apps once all that can fail without them has been checked: an app that has run its
    // lifespan startup gets its shutdown whatever happens next (ASGI lifespan spec).
    // (Ports are only tried above, not held: none is bound while an app imports.)
    let dispatcher = match Dispatcher::load(&config.app, &host) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("portico: {e}");
            return ExitCode::from(EXIT_APP);
        }
    };
    let grace = config.server.graceful_timeout.0;
    let give_up = |dispatcher: &Dispatcher, code: u8| {
        dispatcher.shutdown(grace);
        ExitCode::from(code)
    };
    // Again, for a port taken while the apps imported: Pingora would panic on it.
    if let Err(e) = try_listen_addresses(&config.server) {
        eprintln!("portico: {e}");
        return give_up(&dispatcher, EXIT_BIND);
    }

    let pid_file = match PidFile::write(config.server.pid_file.as_deref()) {
        Ok(pid_file) => pid_file,
        Err(e) => {
            eprintln!("portico: {source}: server.pid_file: {e}");
            return give_up(&dispatcher, EXIT_CONFIG);
        }
    };
    reload_on_sighup(dispatcher.clone(), snapshot);

    let conf = ServerConf {
        threads: config.server.threads,
        // Pingora stops accepting at once, then waits the whole grace period for requests in
        // flight before it drops what is left.
        grace_period_seconds: Some(config.server.graceful_timeout.0.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let portico = Portico::new(
        dispatcher.clone(),
        access_log.clone(),
        config.server.keepalive_timeout.0,
    )
    .with_server_cert(
        config
            .server
            .tls
            .as_ref()
            .and_then(|t| leaf_certificate(&t.certificate)),
    )
    .with_status_path(config.server.status_path.clone())
    .with_send_timeout(config.server.send_timeout.as_limit())
    .with_trusted_proxies(config.server.trusted_proxies());
    let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
    // Larger flow-control windows than HTTP/2's 64 KiB default, so uploads are not throttled
    // to one window per round trip.
    h2.initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20);
    let app = PorticoApp::new(
        &server.configuration,
        PorticoProxy::new(portico),
        config.server.h2c,
        h2,
        config.server.keepalive_timeout.0,
    );
    let open_connections = app.open_connections();
    let mut service = Service::new("portico".to_owned(), app);
    for addr in &config.server.listen {
        service.add_tcp(addr);
        if config.server.h2c {
            log::info!("listening on http://{addr} (HTTP/1.x, h2c, WebSocket)");
        } else {
            log::info!("listening on http://{addr} (HTTP/1.x, WebSocket)");
        }
    }
    if let Some(tls) = &config.server.tls {
        for addr in &tls.listen {
            let mut settings = match pingora::listeners::tls::TlsSettings::intermediate(
                &tls.certificate.to_string_lossy(),
                &tls.key.to_string_lossy(),
            ) {
                Ok(settings) => settings,
                Err(e) => {
                    eprintln!("portico: {source}: server.tls: {e}");
                    return give_up(&dispatcher, EXIT_CONFIG);
                }
            };
            // ALPN offers h2 and http/1.1 (RFC 7301).
            settings.enable_h2();
            service.add_tls_with_settings(addr, None, settings);
            log::info!("listening on https://{addr} (HTTP/1.1, HTTP/2, WebSocket)");
        }
    }
    for app in dispatcher.apps() {
        let c = app.config();
        let placement = match (c.mode, &c.pool_socket) {
            (portico_config::Mode::InProcess, _) => counted(c.threads, "Python thread"),
            (portico_config::Mode::Pool, Some(socket)) => {
                format!("pool server at {}", socket.display())
            }
            (portico_config::Mode::Pool, None) => {
                let processes = match c.max_processes.filter(|&max| max > c.processes) {
                    Some(max) => format!("{} (up to {max} on demand)", c.processes),
                    None => c.processes.to_string(),
                };
                let several = c.processes > 1 || c.max_processes.is_some_and(|max| max > 1);
                format!(
                    "pool of {processes} worker {}, {} each",
                    if several { "processes" } else { "process" },
                    counted(c.threads, "Python thread")
                )
            }
        };
        log::info!(
            "mounted app `{}` at {} from {} ({:?}, {placement})",
            c.name,
            c.mount,
            c.target,
            c.interface,
        );
    }
    server.add_service(service);
    // With no request left, the ASGI apps get their lifespan shutdown.
    let finish = stop::Finish::new(move || {
        dispatcher.shutdown(grace);
        log::info!("stopped");
        access_log.flush(Duration::from_secs(1));
        drop(pid_file);
        drop(run_file);
    });
    stop::end_early_when_idle(
        server.watch_execution_phase(),
        open_connections,
        grace,
        finish.clone(),
    );
    // `run` returns once Pingora has stopped serving (`run_forever` would exit the process).
    server.run(pingora::server::RunArgs::default());
    if !finish.run() {
        // The watcher took the finish and exits the process once it is done.
        loop {
            std::thread::park();
        }
    }
    ExitCode::SUCCESS
}

fn block_sighup() {
    // SAFETY: a signal set on the stack, filled by sigemptyset/sigaddset, given to
    // pthread_sigmask for the calling thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// A thread that reloads the pooled apps on each SIGHUP (blocked everywhere by
/// [`block_sighup`]).
fn reload_on_sighup(dispatcher: Arc<Dispatcher>, config: Option<ConfigSnapshot>) {
    let spawned = std::thread::Builder::new()
        .name("sighup".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: as in block_sighup; sigwait writes the signal number to `sig`.
            let waited = unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGHUP);
                libc::sigwait(&set, &mut sig)
            };
            if waited != 0 {
                return;
            }
            log::info!("SIGHUP: reloading the pooled apps");
            let scope = reload::Scope {
                routing: Routing::Mounts,
                prepare: &|_| {},
                serves: &|_| true,
                uses_server_table: true,
            };
            reload::reload(&dispatcher, config.as_ref(), &scope);
        });
    if let Err(e) = spawned {
        log::error!("cannot start the SIGHUP thread (reloads will not work): {e}");
    }
}

/// `server.pid_file`, written at start and removed at exit.
struct PidFile(Option<PathBuf>);

impl PidFile {
    fn write(path: Option<&Path>) -> std::io::Result<PidFile> {
        if let Some(path) = path {
            std::fs::write(path, format!("{}\n", std::process::id()))?;
        }
        Ok(PidFile(path.map(Path::to_path_buf)))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The config and pid of the server `portico reload`/`status` talk to.
fn running_server(config_path: &Path) -> Result<(Config, u32), ExitCode> {
    let config = Config::load(config_path).map_err(|e| config_failed(&e))?;
    let Some(pid_file) = &config.server.pid_file else {
        eprintln!(
            "portico: {}: server.pid_file is not set, so the running server cannot be found",
            config_path.display()
        );
        return Err(ExitCode::from(EXIT_CONFIG));
    };
    let pid = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match pid {
        Some(pid) if is_portico(pid) => Ok((config, pid)),
        Some(pid) => {
            // A pid file left by a server that was killed, its pid since taken by another
            // program: signalling that would harm it and tell the user nothing.
            eprintln!(
                "portico: no server is running for {}: pid {pid} in {} is not a running \
                 portico process (a stale pid file?)",
                config_path.display(),
                pid_file.display()
            );
            Err(ExitCode::FAILURE)
        }
        None => {
            eprintln!(
                "portico: no server is running for {} (no pid in {})",
                config_path.display(),
                pid_file.display()
            );
            Err(ExitCode::FAILURE)
        }
    }
}

/// Binds each listen address once and lets it go: the first that cannot be bound, and why.
fn try_listen_addresses(server: &portico_config::ServerConfig) -> Result<(), String> {
    let tls_listen = server.tls.iter().flat_map(|t| t.listen.iter());
    for addr in server.listen.iter().chain(tls_listen) {
        std::net::TcpListener::bind(addr.as_str())
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    }
    Ok(())
}

/// `1 Python thread`, `4 Python threads`.
fn counted(n: usize, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

/// Whether process `pid` runs a portico binary: the program its command line names (or, if
/// that cannot be read, its executable) is this one or is named like it.
fn is_portico(pid: u32) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let own = std::env::current_exe().ok();
    let named_portico = |path: &Path| {
        own.as_deref() == Some(path)
            || path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("portico"))
    };
    let proc_dir = Path::new("/proc").join(pid.to_string());
    if let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) {
        let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        return named_portico(Path::new(std::ffi::OsStr::from_bytes(program)));
    }
    std::fs::read_link(proc_dir.join("exe")).is_ok_and(|exe| named_portico(&exe))
}

fn reload(config_path: &Path) -> ExitCode {
    let pid = match running_server(config_path) {
        Ok((_, pid)) => pid,
        Err(code) => return code,
    };
    // SAFETY: kill() only sends a signal to the pid the server wrote.
    if unsafe { libc::kill(pid as i32, libc::SIGHUP) } != 0 {
        eprintln!(
            "portico: cannot signal the server (pid {pid}): {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::FAILURE;
    }
    println!("portico: reload requested (SIGHUP to pid {pid}); the server's log tells how it went");
    ExitCode::SUCCESS
}

/// Writes a report to standard output. A reader that has had enough (`portico status | head`)
/// ends the command quietly, as it ends Unix tools, instead of a panic on the broken pipe.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("portico: cannot write the report: {e}");
        std::process::exit(1);
    }
}

fn status(config_path: &Path, json: bool) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => return config_failed(&e),
    };
    let pooled: Vec<&AppConfig> = config
        .app
        .iter()
        .filter(|a| a.mode == portico_config::Mode::Pool)
        .collect();
    if !pooled.is_empty() && pooled.iter().all(|a| a.pool_socket.is_some()) {
        // A `portico pool` runs them: ask it on each socket.
        let sockets = pooled
            .iter()
            .map(|&app| (app, app.pool_socket.clone().unwrap_or_default()))
            .collect::<Vec<_>>();
        return pool_status(&sockets, json);
    }
    let config = match running_server(config_path) {
        Ok((config, _)) => config,
        Err(code) => return code,
    };
    let (Some(path), Some(addr)) = (&config.server.status_path, config.server.listen.first())
    else {
        eprintln!(
            "portico: {}: portico status needs server.status_path and a plain server.listen address",
            config_path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let target = if json {
        path.clone()
    } else {
        format!("{path}?format=text")
    };
    match http_get(addr, &target) {
        Ok(body) => {
            emit(&body);
            if json {
                emit("\n");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("portico: cannot read the status from http://{addr}{path}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The status of the pools an nginx master started, asked on their sockets.
fn nginx_status(pid_file: &Path, json: bool) -> ExitCode {
    let master = match nginx_pools::master_pid(pid_file) {
        Ok(pid) => pid,
        Err(e) => {
            eprintln!("portico: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !nginx_pools::is_running(master) {
        eprintln!(
            "portico: nginx is not running: no process has pid {master}, from {} (a stale pid \
             file?)",
            pid_file.display()
        );
        return ExitCode::FAILURE;
    }
    let pools = nginx_pools::pools_of(master);
    if pools.is_empty() {
        eprintln!(
            "portico: nginx (master pid {master}) runs no pool: none of its apps has \
             mode = \"pool\" without a pool_socket (for those, use --config)"
        );
        return ExitCode::FAILURE;
    }
    // Each pool's apps, from the config its watchdog was started with.
    let mut configs = Vec::new();
    for pool in &pools {
        // As nginx reads it: its locations route the requests (`portico check --nginx`).
        match Config::load_for(&pool.config, Routing::Elsewhere) {
            Ok(config) => configs.push(config),
            Err(e) => return config_failed(&e),
        }
    }
    let mut sockets = Vec::new();
    for (pool, config) in pools.iter().zip(&configs) {
        let served = |app: &&AppConfig| {
            app.mode == portico_config::Mode::Pool
                && if pool.apps.is_empty() {
                    app.pool_socket.is_none()
                } else {
                    pool.apps.contains(&app.name)
                }
        };
        for app in config.app.iter().filter(served) {
            let socket = (app.pool_socket.clone())
                .unwrap_or_else(|| pool_cmd::socket_in(&pool.socket_dir, &app.name));
            sockets.push((app, socket));
        }
    }
    pool_status(&sockets, json)
}

/// The status of pools run by `portico pool`, asked on their sockets.
fn pool_status(apps: &[(&AppConfig, PathBuf)], json: bool) -> ExitCode {
    let mut failed = false;
    let mut objects = Vec::new();
    for (app, socket) in apps {
        match portico_core::pool::remote::RemotePool::new(app, socket)
            .status(std::time::Duration::from_secs(5))
        {
            Ok(status) if json => objects.push(status.to_json()),
            Ok(status) => emit(&status.to_text()),
            Err(e) => {
                eprintln!("portico: app `{}`: {e}", app.name);
                failed = true;
            }
        }
    }
    if json {
        emit(&format!("[{}]\n", objects.join(",")));
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// A minimal HTTP/1.0 GET of the server's own status path.
fn http_get(addr: &str, target: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(stream, "GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        let line = head.lines().next().unwrap_or_default();
        return Err(std::io::Error::other(format!("the server answered {line}")));
    }
    Ok(body.to_owned())
}

/// The first PEM certificate of a chain file (the leaf).
fn leaf_certificate(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    const END: &str = "-----END CERTIFICATE-----";
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let end = text[start..].find(END)? + start + END.len();
    Some(format!("{}\n", &text[start..end]))
}

/// Loads the certificate chain and key the way Pingora will, and checks that they match.
fn check_tls_files(tls: &TlsConfig) -> Result<(), String> {
    use pingora::tls::{version, ServerConfig};
    pingora::tls::install_default_crypto_provider();
    let (certs, key) = match pingora::tls::load_certs_and_key_files(
        &tls.certificate.to_string_lossy(),
        &tls.key.to_string_lossy(),
    ) {
        Ok(Some(pair)) => pair,
        Ok(None) => {
            return Err(format!(
                "no certificate in {} or no private key in {}",
                tls.certificate.display(),
                tls.key.display()
            ))
        }
        Err(e) => return Err(format!("cannot load certificate or key: {e}")),
    };
    ServerConfig::builder_with_protocol_versions(&[&version::TLS12, &version::TLS13])
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map(drop)
        .map_err(|e| {
            format!(
                "certificate {} and key {} do not work together: {e}",
                tls.certificate.display(),
                tls.key.display()
            )
        })
}
