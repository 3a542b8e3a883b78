//! `portico-worker`: one process of an app's pool (`mode = "pool"`). The pool's host process
//! starts it (never a person) with its end of a Unix socket on descriptor 3, on which the host
//! first sends the text of `--config` as it read it for this worker's generation; the worker
//! loads the app named by `--app` from it through the same core as in-process hosting, and
//! serves the host's requests until the host closes the socket.

use portico_config::{Config, Mode, Routing};
use portico_core::pool::{worker, WORKER_FD};
use portico_core::{Dispatcher, HostInfo};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

// Request frames are decoded on the reader thread and freed on the app's threads, and
// response frames the other way round: the same cross-thread traffic as `portico`'s, for which
// mimalloc was measured faster than glibc's arenas (see `main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A bad command line or configuration (as `portico`'s, EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// The app could not be loaded (as `portico`'s).
const EXIT_APP: u8 = 70;

fn main() -> ExitCode {
    portico_core::tune_allocator();
    // Every line through the logger: one write each, with its time, so that the lines of
    // workers starting together do not interleave on the stderr they share; and with the
    // worker's pid, as gunicorn's lines carry theirs, to tell whose traceback a line is.
    let pid = std::process::id();
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Info)
        .parse_env("PORTICO_LOG")
        .format(move |out, record| {
            use std::io::Write;
            writeln!(
                out,
                "[{} {:<5} worker {pid}] {}",
                out.timestamp(),
                record.level(),
                record.args()
            )
        })
        .init();
    portico_proxy::error_log::follow_from_environment();
    let mut config_file = None;
    let mut app_name = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => config_file = args.next().map(PathBuf::from),
            "--app" => app_name = args.next(),
            other => {
                log::error!("portico-worker: unknown argument {other:?} (it is started by portico for mode = \"pool\")");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let (Some(config_file), Some(app_name)) = (config_file, app_name) else {
        log::error!("portico-worker: needs --config FILE --app NAME (it is started by portico for mode = \"pool\")");
        return ExitCode::from(EXIT_CONFIG);
    };
    if let Err(e) = portico_core::pool::check_libpython() {
        log::error!("portico-worker: {e}");
        return ExitCode::from(EXIT_APP);
    }
    // SAFETY: the host put our end of the socket on this descriptor (dup2 before exec), and
    // nothing else in this process owns it.
    let socket = unsafe { UnixStream::from_raw_fd(WORKER_FD) };
    // The settings of this worker's generation, as the host read them from `--config`
    // (which names the file in errors, and whose directory relative paths are taken from).
    let text = match worker::read_settings(&socket) {
        Ok(text) => text,
        Err(e) => {
            log::error!("portico-worker: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = match Config::from_text(&text, &config_file, Routing::Elsewhere) {
        Ok(config) => config,
        Err(errors) => {
            let lines: Vec<String> = errors.0.iter().map(|e| format!("  {e}")).collect();
            log::error!(
                "portico-worker: invalid configuration:\n{}",
                lines.join("\n")
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(mut app) = config.app.into_iter().find(|a| a.name == app_name) else {
        log::error!(
            "portico-worker: {} has no app named `{app_name}`",
            config_file.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    // Inside the worker the app runs in-process: the pool is the transport around it.
    app.mode = Mode::InProcess;
    // PEP 3333's `wsgi.multiprocess`: whether other processes may serve the same app, as
    // mod_wsgi says for a daemon process group of more than one process.
    let multiprocess = app
        .max_processes
        .unwrap_or(app.processes)
        .max(app.processes)
        > 1;
    let host = HostInfo {
        // The front end's name when it is not `portico serve` (the pool nginx starts sets
        // it), so that the app sees the same SERVER_SOFTWARE pooled or in-process.
        server_software: std::env::var("PORTICO_SERVER_SOFTWARE")
            .unwrap_or_else(|_| format!("portico/{}", env!("CARGO_PKG_VERSION"))),
        multiprocess,
        pool: None,
    };
    let dispatcher = match Dispatcher::load(std::slice::from_ref(&app), &host) {
        Ok(dispatcher) => dispatcher,
        Err(e) => {
            log::error!("portico-worker: {e}");
            return ExitCode::from(EXIT_APP);
        }
    };
    if let Err(e) = worker::serve(socket, &dispatcher.apps()[0]) {
        log::error!("app `{}`: pool worker: {e}", app.name);
    }
    // The app's graceful_timeout bounds its lifespan shutdown too; 0 means no limit, as
    // everywhere else (the host waits as long).
    dispatcher.shutdown(app.graceful_timeout.as_limit().unwrap_or(Duration::MAX));
    ExitCode::SUCCESS
}
