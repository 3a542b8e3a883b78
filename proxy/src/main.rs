//! `portico`: serve Python web apps from Pingora.
//!
//! This file only turns the command line into a config, checks it, and hands over. Exit
//! codes: 64 for a configuration error (EX_USAGE), 70 for an app that cannot be loaded
//! (EX_SOFTWARE), 71 for a listener that cannot be bound (EX_OSERR).

use clap::{Parser, Subcommand};
use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use portico_config::{AppConfig, Config, ConfigError, ConfigErrors, Interface};
use portico_core::{Dispatcher, HostInfo};
use portico_proxy::access_log::AccessLog;
use portico_proxy::{Portico, PorticoProxy};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

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
    about = "Serve Python WSGI apps from Pingora, in-process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one app at `/`, configured from the command line (like gunicorn or uvicorn).
    Run(RunArgs),
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
}

fn main() -> ExitCode {
    portico_core::tune_allocator();
    init_logging();
    let cli = Cli::parse();
    let (config, source) = match cli.command {
        Command::Run(args) => match config_from_args(args) {
            Ok(config) => (config, "command line".to_owned()),
            Err(e) => return config_failed(&e),
        },
        Command::Serve { config } => match Config::load(&config) {
            Ok(c) => (c, config.display().to_string()),
            Err(e) => return config_failed(&e),
        },
        Command::Check { config } => {
            return match Config::load(&config) {
                Ok(c) => {
                    println!("{}: ok ({} app(s))", config.display(), c.app.len());
                    ExitCode::SUCCESS
                }
                Err(e) => config_failed(&e),
            }
        }
    };
    serve(config, &source)
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
/// errors named by the flag rather than the TOML key.
fn config_from_args(args: RunArgs) -> Result<Config, ConfigErrors> {
    let mut app = AppConfig::new("app", &args.target);
    app.interface = match args.interface.as_str() {
        "asgi" => Interface::Asgi,
        _ => Interface::Wsgi,
    };
    app.threads = args.threads;
    app.chdir = args.chdir;
    app.python_home = args.python_home;
    app.python_path = if args.python_path.is_empty() {
        std::env::current_dir().into_iter().collect()
    } else {
        args.python_path
    };
    let mut config = Config {
        server: Default::default(),
        app: vec![app],
    };
    config.server.listen = args.bind;
    config.server.threads = args.server_threads;
    config.server.access_log = args.access_log;
    const FLAGS: [(&str, &str); 7] = [
        ("server.listen", "--bind"),
        ("server.threads", "--server-threads"),
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
    Ok(config)
}

fn serve(config: Config, source: &str) -> ExitCode {
    let host = HostInfo {
        server_software: format!("portico/{}", env!("CARGO_PKG_VERSION")),
        multiprocess: false,
    };
    // Apps first: an app that cannot import must fail before any port is bound.
    let dispatcher = match Dispatcher::load(&config.app, &host) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("portico: {e}");
            return ExitCode::from(EXIT_APP);
        }
    };
    for addr in &config.server.listen {
        // Fail with a clear message now rather than a panic inside Pingora later.
        if let Err(e) = std::net::TcpListener::bind(addr.as_str()) {
            eprintln!("portico: cannot listen on {addr}: {e}");
            return ExitCode::from(EXIT_BIND);
        }
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
        access_log,
        config.server.keepalive_timeout.0,
    );
    let mut service =
        http_proxy_service_with_name(&server.configuration, PorticoProxy::new(portico), "portico");
    for addr in &config.server.listen {
        service.add_tcp(addr);
        log::info!("listening on http://{addr}");
    }
    for app in dispatcher.apps() {
        let c = app.config();
        log::info!(
            "mounted app `{}` at {} from {} ({:?}, {} Python threads)",
            c.name,
            c.mount,
            c.target,
            c.interface,
            c.threads
        );
    }
    server.add_service(service);
    server.run_forever()
}
