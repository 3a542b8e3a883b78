//! wsload: a WebSocket echo load generator for `bench/run.sh`.
//!
//! Opens N connections to an echo endpoint. Each keeps K text messages of a fixed size in
//! flight (K = 1: ping-pong, send one and wait for its echo): every echo that comes back is
//! checked against what was sent, its round trip is timed, and the next message goes out.
//! Echoes that arrive during the warm-up are not counted; those that arrive during the
//! measured window are. It runs on one thread (a current-thread tokio runtime), to be pinned
//! to one CPU with `taskset`. It offers no extensions, so frames are plain (no
//! permessage-deflate).
//!
//!     wsload [OPTIONS] ws://HOST:PORT/PATH     measure
//!     wsload --check ws://HOST:PORT/PATH       one message, exit 0 if it is echoed intact
//!     wsload --serve HOST:PORT                 an echo server, to see the tool's own ceiling
//!
//! Output of a measurement, one `key: value` a line (bench/run.sh reads `msg/s`, `p50`, `p99`):
//!
//!     connections: 64
//!     ...
//!     messages: 812345
//!     msg/s: 101543
//!     p50: 0.61ms
//!     p99: 1.20ms

use std::collections::VecDeque;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{connect_async_with_config, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const USAGE: &str = "\
usage: wsload [OPTIONS] ws://HOST:PORT/PATH
       wsload --check ws://HOST:PORT/PATH
       wsload --serve HOST:PORT

options:
  -c, --connections N   connections (default 64)
  -k, --depth K         messages in flight per connection; 1 is ping-pong (default 1)
  -s, --size BYTES      text message size (default 32)
  -w, --warmup SECONDS  unrecorded load before the measured window (default 2)
  -d, --duration SECS   measured window (default 8)
";

struct Options {
    connections: usize,
    depth: usize,
    size: usize,
    warmup: Duration,
    duration: Duration,
    url: String,
}

enum Mode {
    Measure(Options),
    Check(String),
    Serve(String),
}

fn parse_args() -> Result<Mode, String> {
    let mut args = std::env::args().skip(1);
    let mut opts = Options {
        connections: 64,
        depth: 1,
        size: 32,
        warmup: Duration::from_secs(2),
        duration: Duration::from_secs(8),
        url: String::new(),
    };
    let mut url = None;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "--check" => return Ok(Mode::Check(value("--check")?)),
            "--serve" => return Ok(Mode::Serve(value("--serve")?)),
            "-c" | "--connections" => opts.connections = positive(&arg, &value(&arg)?)?,
            "-k" | "--depth" => opts.depth = positive(&arg, &value(&arg)?)?,
            "-s" | "--size" => opts.size = positive(&arg, &value(&arg)?)?,
            "-w" | "--warmup" => opts.warmup = seconds(&arg, &value(&arg)?)?,
            "-d" | "--duration" => opts.duration = seconds(&arg, &value(&arg)?)?,
            other if other.starts_with('-') => return Err(format!("unknown option {other}")),
            other if url.is_none() => url = Some(other.to_string()),
            other => return Err(format!("unexpected argument {other}")),
        }
    }
    opts.url = url.ok_or("missing the ws:// URL")?;
    if opts.duration.is_zero() {
        return Err("--duration must be more than 0".into());
    }
    Ok(Mode::Measure(opts))
}

fn positive(name: &str, v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{name} wants a positive integer, got {v:?}")),
    }
}

fn seconds(name: &str, v: &str) -> Result<Duration, String> {
    match v.parse::<f64>() {
        Ok(s) if s >= 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!("{name} wants a number of seconds, got {v:?}")),
    }
}

/// `size` bytes of printable ASCII (valid UTF-8, so a legal text message).
fn payload(size: usize) -> Utf8Bytes {
    let text: String = (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    Utf8Bytes::from(text)
}

async fn connect(url: &str) -> Result<Ws, String> {
    // No config: tungstenite's defaults, and it never offers permessage-deflate. `true`
    // sets TCP_NODELAY, as every server here does on its side.
    let (ws, _response) = connect_async_with_config(url, None, true)
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))?;
    Ok(ws)
}

/// Reads the next data message, skipping control frames (tungstenite answers pings itself).
async fn next_data(ws: &mut Ws) -> Result<Message, String> {
    loop {
        match ws.next().await {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return Ok(m),
            Some(Ok(Message::Close(frame))) => return Err(format!("server closed: {frame:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("reading: {e}")),
            None => return Err("connection closed".into()),
        }
    }
}

fn check_echo(reply: &Message, sent: &Utf8Bytes) -> Result<(), String> {
    match reply {
        Message::Text(t) if t.as_str() == sent.as_str() => Ok(()),
        Message::Text(t) => Err(format!(
            "echo differs: sent {} bytes, got {} bytes of text",
            sent.len(),
            t.len()
        )),
        other => Err(format!(
            "echo is not a text message: {} bytes of binary",
            other.len()
        )),
    }
}

/// What one connection measured: round trips (ns) of the echoes inside the window.
struct ConnResult {
    rtts: Vec<u64>,
}

async fn run_conn(
    mut ws: Ws,
    msg: Utf8Bytes,
    depth: usize,
    measure_from: Instant,
    end: Instant,
) -> Result<ConnResult, String> {
    let mut rtts = Vec::with_capacity(1 << 16);
    let mut sent_at: VecDeque<Instant> = VecDeque::with_capacity(depth);
    for _ in 0..depth {
        sent_at.push_back(Instant::now());
        ws.feed(Message::Text(msg.clone()))
            .await
            .map_err(|e| format!("sending: {e}"))?;
    }
    ws.flush().await.map_err(|e| format!("sending: {e}"))?;
    while let Some(t0) = sent_at.pop_front() {
        let reply = next_data(&mut ws).await?;
        let now = Instant::now();
        check_echo(&reply, &msg)?;
        if now >= measure_from && now < end {
            rtts.push((now - t0).as_nanos() as u64);
        }
        if now < end {
            sent_at.push_back(Instant::now());
            ws.send(Message::Text(msg.clone()))
                .await
                .map_err(|e| format!("sending: {e}"))?;
        }
    }
    // A clean close; a server that does not answer within a second is left alone.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        ws.close(None).await.ok();
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    Ok(ConnResult { rtts })
}

fn fmt_ms(ns: u64) -> String {
    format!("{:.2}ms", ns as f64 / 1e6)
}

async fn measure(o: Options) -> Result<(), String> {
    let msg = payload(o.size);
    // Connect every connection first, so the handshakes are not part of the load.
    let mut conns = Vec::with_capacity(o.connections);
    for _ in 0..o.connections {
        conns.push(connect(&o.url).await?);
    }
    let start = Instant::now();
    let measure_from = start + o.warmup;
    let end = measure_from + o.duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|ws| tokio::spawn(run_conn(ws, msg.clone(), o.depth, measure_from, end)))
        .collect();
    let mut rtts = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => rtts.extend(r.rtts),
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("task failed: {e}")),
        }
    }
    rtts.sort_unstable();
    let pct = |p: f64| -> u64 {
        if rtts.is_empty() {
            return 0;
        }
        let i = ((p / 100.0) * rtts.len() as f64).ceil() as usize;
        rtts[i.clamp(1, rtts.len()) - 1]
    };
    let secs = o.duration.as_secs_f64();
    println!("url: {}", o.url);
    println!("connections: {}", o.connections);
    println!("in flight per connection: {}", o.depth);
    println!("message: {} bytes of text", o.size);
    println!("warm-up: {:.1}s", o.warmup.as_secs_f64());
    println!("measured: {secs:.1}s");
    println!("messages: {}", rtts.len());
    println!("msg/s: {:.0}", rtts.len() as f64 / secs);
    println!("p50: {}", fmt_ms(pct(50.0)));
    println!("p90: {}", fmt_ms(pct(90.0)));
    println!("p99: {}", fmt_ms(pct(99.0)));
    println!("max: {}", fmt_ms(rtts.last().copied().unwrap_or(0)));
    println!("errors: {}", errors.len());
    if let Some(e) = errors.first() {
        println!("first error: {e}");
        return Err(format!(
            "{} of {} connections failed",
            errors.len(),
            o.connections
        ));
    }
    if rtts.is_empty() {
        return Err("no echo arrived in the measured window".into());
    }
    Ok(())
}

async fn check(url: String) -> Result<(), String> {
    let mut ws = connect(&url).await?;
    let msg = payload(32);
    ws.send(Message::Text(msg.clone()))
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let reply = tokio::time::timeout(Duration::from_secs(5), next_data(&mut ws))
        .await
        .map_err(|_| "no echo within 5 s".to_string())??;
    check_echo(&reply, &msg)?;
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    Ok(())
}

async fn serve(addr: String) -> Result<(), String> {
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("binding {addr}: {e}"))?;
    eprintln!("wsload: echo server on {addr}");
    loop {
        let (tcp, _) = listener
            .accept()
            .await
            .map_err(|e| format!("accepting: {e}"))?;
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            while let Some(Ok(m)) = ws.next().await {
                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn main() -> ExitCode {
    let mode = match parse_args() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("wsload: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match mode {
            Mode::Measure(o) => measure(o).await,
            Mode::Check(url) => check(url).await,
            Mode::Serve(addr) => serve(addr).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsload: {e}");
            ExitCode::FAILURE
        }
    }
}
