//! The one entry point a host uses: load the apps, route a request, submit it.

use crate::error::{DispatchError, LoadError};
use crate::exchange::{self, Exchange};
use crate::model::RequestHead;
use crate::python::threads::{Job, ThreadPool};
use crate::python::{self, wsgi::WsgiRunner};
use crate::router::{Route, Router};
use bytes::Bytes;
use portico_config::{AppConfig, Interface};
use pyo3::prelude::*;
use std::sync::Arc;

/// What the host tells apps about itself.
#[derive(Debug, Clone)]
pub struct HostInfo {
    /// `SERVER_SOFTWARE`, e.g. `portico/0.1.0`.
    pub server_software: String,
    /// Whether other processes serve the same app (`wsgi.multiprocess`): true under nginx
    /// with several workers, false for the single `portico` process.
    pub multiprocess: bool,
}

/// A loaded app, ready for requests.
pub struct App {
    config: AppConfig,
    threads: ThreadPool,
}

impl App {
    /// The app's configuration.
    pub fn config(&self) -> &AppConfig {
        &self.config
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
        let (exchange, responder) = exchange::channel();
        let queued = self.threads.submit(Job {
            head,
            route,
            responder,
            body,
        });
        if queued {
            Ok(exchange)
        } else {
            Err(DispatchError::Overloaded)
        }
    }
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
        let home = configs.iter().find_map(|c| c.python_home.as_deref());
        python::init_interpreter(home, configs.first().map_or("", |c| c.name.as_str()))?;
        let mut apps = Vec::with_capacity(configs.len());
        for config in configs {
            let fail = |message: String| LoadError {
                app: config.name.clone(),
                message,
            };
            let runner = Python::attach(|py| -> Result<WsgiRunner, LoadError> {
                let callable = python::load_callable(py, config)?;
                match config.interface {
                    Interface::Wsgi => WsgiRunner::new(
                        py,
                        &config.name,
                        callable,
                        config.threads > 1,
                        host.multiprocess,
                        &host.server_software,
                    )
                    .map_err(|e| fail(python::format_exception(py, &e))),
                    Interface::Asgi => Err(fail("the asgi interface is not available yet".into())),
                }
            })?;
            let threads = ThreadPool::start(
                &config.name,
                config.threads,
                config.queue_size,
                Arc::new(runner),
            )
            .map_err(|e| fail(format!("cannot start threads: {e}")))?;
            apps.push(App {
                config: config.clone(),
                threads,
            });
        }
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

    /// The loaded apps, in config order.
    pub fn apps(&self) -> &[App] {
        &self.apps
    }
}
