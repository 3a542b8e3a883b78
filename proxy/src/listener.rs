//! What serves a Portico listener: HTTP/1.x and WebSocket, h2c (HTTP/2 with prior knowledge,
//! RFC 9113 section 3.3) on the same plain port, and HTTP/2 by ALPN on TLS.
//!
//! Pingora's own h2c switch reads exactly 24 bytes (the HTTP/2 preface) before it answers
//! anything, and does so again on every reused keep-alive connection, without a timeout: a
//! short HTTP/1.0 request (`GET / HTTP/1.0` plus an empty line is 18 bytes) then never gets an
//! answer, and idle keep-alive connections never time out. So Portico looks at the first
//! bytes itself, stops at the first one that differs from the preface, and hands the
//! connection to an HTTP/1 app or an HTTP/2 app accordingly; keep-alive reuse stays inside the
//! HTTP/1 app.

use crate::PorticoProxy;
use async_trait::async_trait;
use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::protocols::http::v2::server::H2Options;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::time::fast_timeout::fast_timeout;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The client connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a new connection may take to send its first bytes (Pingora's own limit for the
/// first request header).
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(60);

/// The app behind every Portico listener.
pub struct PorticoApp {
    http1: Arc<HttpProxy<PorticoProxy>>,
    http2: Arc<HttpProxy<PorticoProxy>>,
    h2c: bool,
    open: OpenConnections,
    /// The host, told when a graceful stop begins.
    portico: crate::Portico,
}

/// How many connections a listener is serving now, so that a graceful stop can end as soon
/// as the last one is done instead of always waiting out its grace period.
#[derive(Clone, Default)]
pub struct OpenConnections(Arc<AtomicUsize>);

impl OpenConnections {
    /// Connections accepted and not yet closed (each HTTP/2 connection counts once,
    /// whatever its streams; a WebSocket counts until it closes).
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    fn hold(&self) -> HeldConnection {
        self.0.fetch_add(1, Ordering::AcqRel);
        HeldConnection(self.0.clone())
    }
}

/// One connection in [`OpenConnections`], counted until it is dropped.
struct HeldConnection(Arc<AtomicUsize>);

impl Drop for HeldConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PorticoApp {
    /// Serves `proxy` on HTTP/1.x and, by ALPN on TLS, HTTP/2; with `h2c`, plain connections
    /// that open with the HTTP/2 preface get HTTP/2 too. `h2` tunes HTTP/2 (streams, windows);
    /// an HTTP/2 connection with no stream open for `h2_idle` is closed, as nginx applies its
    /// `keepalive_timeout` to HTTP/2 connections.
    pub fn new(
        conf: &Arc<ServerConf>,
        proxy: PorticoProxy,
        h2c: bool,
        h2: H2Options,
        h2_idle: Duration,
    ) -> PorticoApp {
        let build = |preface_seen: bool| {
            let mut app = HttpProxy::new(proxy.clone(), conf.clone());
            app.handle_init_modules();
            let mut options = HttpServerOptions::default();
            // Only the HTTP/2 app reads the preface, and only once this app has seen it.
            options.h2c = preface_seen;
            // At least a second, as for HTTP/1 keep-alive: Pingora's wait for an idle h2
            // connection ends at once for 0, before a first request can arrive.
            options.h2_idle_timeout = Some(h2_idle.max(Duration::from_secs(1)));
            app.server_options = Some(options);
            app.h2_options = Some(h2.clone());
            Arc::new(app)
        };
        PorticoApp {
            http1: build(false),
            http2: build(true),
            h2c,
            open: OpenConnections::default(),
            portico: proxy.portico.clone(),
        }
    }

    /// The count of the connections this app is serving, to watch from elsewhere.
    pub fn open_connections(&self) -> OpenConnections {
        self.open.clone()
    }
}

#[async_trait]
impl ServerApp for PorticoApp {
    /// Runs once per accepted connection. Returns `None`: the connection is served to its
    /// end here (HTTP/1 keep-alive reuse included), never handed back for reuse.
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _held = self.open.hold();
        if self.h2c && stream.get_ssl_digest().is_none() && stream.as_any().is::<TcpStream>() {
            let mut tcp = stream
                .into_any()
                .downcast::<TcpStream>()
                .expect("checked to be a TCP stream");
            // A connection that has sent nothing yet when the server stops is closed, as
            // nginx closes idle connections on a graceful stop.
            let mut stopping = shutdown.clone();
            let preface = tokio::select! {
                // Bytes already there are served, not dropped for the stop.
                biased;
                preface = opens_with_preface(&mut tcp) => preface?,
                _ = stopping.wait_for(|stop| *stop) => return None,
            };
            stream = tcp;
            if preface {
                return self.http2.process_new(stream, shutdown).await;
            }
        }
        loop {
            stream = self.http1.process_new(stream, shutdown).await?;
        }
    }

    /// Runs once the listeners have stopped accepting on a graceful stop: open WebSockets are
    /// closed with 1012 ([`crate::Portico::stop_websockets`]), and both HTTP apps are told, so
    /// that keep-alive connections waiting for their next request close at once (Pingora's
    /// default for a `ServerApp` does nothing).
    async fn cleanup(&self) {
        self.portico.stop_websockets();
        self.http1.cleanup().await;
        self.http2.cleanup().await;
    }
}

/// Reads the first bytes of a plain connection, just as far as they match the HTTP/2
/// preface, and puts them back. `None` when the client left or sent nothing in time.
async fn opens_with_preface(stream: &mut TcpStream) -> Option<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut seen = 0;
    while seen < buf.len() {
        let read = fast_timeout(FIRST_BYTES_TIMEOUT, stream.read(&mut buf[seen..]))
            .await
            .ok()?
            .ok()?;
        if read == 0 {
            return None;
        }
        seen += read;
        if buf[..seen] != H2_PREFACE[..seen] {
            stream.rewind(&buf[..seen]);
            return Some(false);
        }
    }
    stream.rewind(&buf);
    Some(true)
}
