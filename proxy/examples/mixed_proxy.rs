//! A Pingora proxy of your own that serves some paths from Python apps through Portico and
//! proxies every other request to an upstream: the embedding docs/embedding.md walks through.
//!
//! ```text
//! cargo build --release -p portico-proxy --example mixed_proxy --bin portico-worker
//! target/release/examples/mixed_proxy portico.toml 127.0.0.1:8000 127.0.0.1:9000
//! ```
//!
//! The apps come from `portico.toml` (its `[[app]]` tables, mounted at their `mount`; its
//! `[server]` table is not used); requests under no mount go to the upstream.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora::server::ExecutionPhase;
use portico_config::{Config, Routing};
use portico_core::pool::PoolHost;
use portico_core::{Dispatcher, HostInfo};
use portico_proxy::access_log::AccessLog;
use portico_proxy::Portico;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// The proxy: Portico first, the upstream for the rest.
struct MixedProxy {
    portico: Portico,
    upstream: String,
}

/// Per request: whether Portico answered it.
#[derive(Default)]
struct Served {
    by_portico: bool,
}

#[async_trait]
impl ProxyHttp for MixedProxy {
    type CTX = Served;

    fn new_ctx(&self) -> Served {
        Served::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Served) -> Result<bool> {
        // `Ok(true)`: an app (or Portico's error status) answered; `Ok(false)`: no mount
        // matched and the session is untouched, so Pingora goes on to `upstream_peer`.
        ctx.by_portico = self.portico.serve(session).await?;
        Ok(ctx.by_portico)
    }

    async fn upstream_peer(&self, _: &mut Session, _: &mut Served) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }

    async fn logging(&self, session: &mut Session, _: Option<&Error>, ctx: &mut Served) {
        // `Portico::serve` writes no access-log line itself.
        if ctx.by_portico {
            self.portico.log_access(session);
        }
    }
}

fn main() -> ExitCode {
    env_logger::init();
    let args: Vec<String> = std::env::args().collect();
    let [_, config_file, listen, upstream] = &args[..] else {
        eprintln!("usage: mixed_proxy PORTICO_TOML LISTEN UPSTREAM");
        return ExitCode::from(64);
    };
    // `Config::load` validates (every error at once, with file, line and key) and makes the
    // file's relative paths absolute; `Dispatcher::load` trusts what it is given.
    let config = match Config::load_for(Path::new(config_file), Routing::Mounts) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(64);
        }
    };
    // Pool workers are `portico-worker` processes, given the same file.
    let here = std::env::current_exe().unwrap_or_default();
    let worker_binary = std::env::var_os("PORTICO_WORKER")
        .map(PathBuf::from)
        .unwrap_or_else(|| here.with_file_name("../portico-worker"));
    let host = HostInfo {
        server_software: "mixed_proxy/0.1".into(),
        multiprocess: false,
        pool: Some(PoolHost {
            worker_binary,
            config_file: std::path::absolute(config_file).unwrap_or(config_file.into()),
            default_identity: None,
            config_text: std::fs::read_to_string(config_file)
                .unwrap_or_default()
                .into(),
        }),
    };
    let conf = ServerConf {
        grace_period_seconds: Some(10),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    // After `bootstrap` and never with Pingora's `daemon`: the apps' Python threads and pool
    // supervisors do not survive a fork.
    let dispatcher = match Dispatcher::load(&config.app, &host) {
        Ok(dispatcher) => Arc::new(dispatcher),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(70);
        }
    };
    let access_log = AccessLog::open("-").expect("standard output");
    let portico = Portico::new(dispatcher.clone(), access_log, Duration::from_secs(5));
    // A graceful stop closes the open WebSockets with 1012, so that clients reconnect.
    let stopping = portico.clone();
    let mut phases = server.watch_execution_phase();
    std::thread::spawn(move || {
        while let Ok(phase) = phases.blocking_recv() {
            if matches!(phase, ExecutionPhase::GracefulTerminate) {
                stopping.stop_websockets();
            }
        }
    });
    let proxy = MixedProxy {
        portico,
        upstream: upstream.clone(),
    };
    let mut service = http_proxy_service(&server.configuration, proxy);
    service.add_tcp(listen);
    server.add_service(service);
    // `run` returns when Pingora stops (`run_forever` would exit the process): then the
    // pools stop, ASGI apps get their lifespan shutdown and the apps' atexit functions run.
    server.run(pingora::server::RunArgs::default());
    dispatcher.shutdown(Duration::from_secs(10));
    ExitCode::SUCCESS
}
