//! Pingora alone: a `ProxyHttp` that answers every request with a fixed "Hello, world!" from
//! `request_filter`, running no Python and forwarding nothing.
//!
//! It is the floor of every row Portico serves through Pingora in `bench/run.sh`: what
//! Pingora's HTTP/1 server costs per request on its own (the `pingora-fixed` row). A Portico
//! row can come close to it, never under it.
//!
//! ```text
//! cargo run --release --example fixed_response -p portico-proxy -- 127.0.0.1:8000
//! ```

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

// As the `portico` binary, so that the two differ only in what they do per request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The proxy: it never has an upstream.
struct FixedResponse;

#[async_trait]
impl ProxyHttp for FixedResponse {
    type CTX = ();

    fn new_ctx(&self) {}

    // No downstream modules, as `PorticoProxy`: Pingora's default adds a switched-off
    // compression module that still runs for every request.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        // `request_filter` answers every request, so Pingora never asks for a peer.
        Error::e_explain(ErrorType::InternalError, "fixed_response has no upstream")
    }

    async fn request_filter(&self, session: &mut Session, _: &mut ()) -> Result<bool> {
        const BODY: &[u8] = b"Hello, world!";
        let mut head = ResponseHeader::build(200, Some(2))?;
        head.insert_header("content-type", "text/plain")?;
        head.insert_header("content-length", BODY.len())?;
        session.set_keepalive(Some(75));
        session.write_response_header(Box::new(head), false).await?;
        session
            .write_response_body(Some(Bytes::from_static(BODY)), true)
            .await?;
        Ok(true)
    }
}

fn main() {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8000".to_owned());
    // One thread, as `portico`'s default and as each bench row's one server CPU.
    let conf = ServerConf {
        threads: 1,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(&server.configuration, FixedResponse);
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever();
}
