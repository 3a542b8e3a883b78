//! The worker process's end of its socket: each [`Kind::Request`] is submitted to the app
//! loaded in this process exactly as an in-process host submits it ([`App::submit`]), and the
//! exchange's events go back as frames. The worker is a host like the others, whose "client"
//! is the pool's host process.
//!
//! A pool server (`portico pool`) serves each host that connects to it the same way: there
//! the app's placement is a pool, so [`App::submit`] hands the request on to a worker.
//!
//! Two threads besides the app's own: the reader (requests, body pieces, cancels, window
//! updates) and a writer, which sends in batches what has piled up while it wrote. A stream's
//! exchange is pumped into frames by whichever thread wakes it (the app's thread as it
//! answers, the reader's when the host's window opens), one thread at a time per stream: a
//! thread of its own for that cost a hop per response, about 3.5% of a pooled request's CPU
//! time on the bench's hello.

use super::wire::{self, Frame, Kind, Reader, RequestKind, DATA_PIECE, INITIAL_WINDOW};
use crate::dispatcher::App;
use crate::error::DispatchError;
use crate::exchange::{AppEvent, BodyPiece, Exchange, FileBody, Inbound};
use bytes::{BufMut, Bytes, BytesMut};
use crossbeam_channel::Sender;
use portico_config::Interface;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

/// One request in this worker.
struct WorkerStream {
    exchange: Exchange,
    /// A WebSocket: told "service restart" (1012) when the host closes the connection.
    websocket: bool,
    /// Response body bytes the host still lets us send.
    credit: AtomicI64,
    waker: Waker,
    /// Client WebSocket items the app's queue had no room for yet (at most the host's
    /// window), and whether the host cancelled the stream behind them.
    inbound: Mutex<(VecDeque<Inbound>, bool)>,
    /// The client's message coming in pieces.
    assembler: Mutex<wire::WsAssembler>,
    /// Wake-ups not yet looked at ([`super::one_at_a_time`]): one thread at a time pumps the
    /// stream, so its frames go out in order.
    wakes: AtomicUsize,
    /// What is left of a file the app answers with (`wsgi.file_wrapper`, ASGI pathsend): read
    /// a piece at a time as the host's window allows, as an in-process host streams it.
    file: Mutex<Option<FileBody>>,
    /// The frames of a body piece larger than the host's window (a 100 MiB list item),
    /// and of what came after it, sent as the window opens: the piece waits here, in the
    /// app's process, not in the host's. Then whether the stream is over once they are out.
    staged: Mutex<(VecDeque<Frame>, bool)>,
}

impl WorkerStream {
    /// Hands waiting client items to the app while its queue has room; acknowledges those
    /// taken. Returns whether the stream is over (cancelled: what fit went to the app, the
    /// rest is dropped, and dropping the stream tells the app the client is gone).
    fn deliver_inbound(&self, id: u32, out: &Sender<Frame>) -> bool {
        let mut inbound = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        let mut taken = 0u32;
        while let Some(item) = inbound.0.pop_front() {
            if let Err(item) = self.exchange.try_push(item) {
                inbound.0.push_front(item);
                break;
            }
            taken += 1;
        }
        if taken > 0 {
            let _ = out.send(Frame::new(
                Kind::WsAck,
                id,
                Bytes::copy_from_slice(&taken.to_le_bytes()),
            ));
        }
        if inbound.1 {
            // The client is gone: what the app has no room for is dropped with it, as an
            // in-process host never reads what its app has no room for. Waiting for room
            // could wait forever on an app that never receives, which is then never told.
            inbound.0.clear();
            return true;
        }
        if !inbound.0.is_empty() {
            // Arms the waker for when the app has made room; room made meanwhile: look again.
            let mut cx = Context::from_waker(&self.waker);
            let mut room = pin!(self.exchange.has_room());
            if room.as_mut().poll(&mut cx).is_ready() {
                self.waker.wake_by_ref();
            }
        }
        false
    }
}

type Streams = Arc<Mutex<HashMap<u32, Arc<WorkerStream>>>>;

/// What every stream's pump needs: the table to leave when it is over, and the writer.
struct Link {
    streams: Streams,
    out: Sender<Frame>,
}

/// Pumps one stream on the thread that wakes it (the app's, or the reader's for window
/// updates and cancels): no hop to a thread of its own between the app and the writer.
struct StreamWaker {
    id: u32,
    stream: std::sync::Weak<WorkerStream>,
    link: Arc<Link>,
}

impl Wake for StreamWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(stream) = self.stream.upgrade() {
            wake_stream(self.id, &stream, &self.link);
        }
    }
}

/// Watches a request the host cancelled until the app lets go of it, then tells the host
/// ([`Kind::Released`]). It keeps the stream (and so its exchange) until then.
struct ReleaseWatch {
    id: u32,
    stream: Arc<WorkerStream>,
    out: Sender<Frame>,
}

impl Wake for ReleaseWatch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let waker = Waker::from(self.clone());
        if self.stream.exchange.abandon_and_watch(&waker) {
            let _ = self.out.send(Frame::bare(Kind::Released, self.id));
        }
    }
}

/// Runs [`pump`] for `stream` unless another thread is running it, which then looks again.
fn wake_stream(id: u32, stream: &Arc<WorkerStream>, link: &Link) {
    super::one_at_a_time(&stream.wakes, || pump(id, stream, link));
}

/// Reads the host's first frame, the [`Kind::Settings`] of this worker's generation: returns
/// the text of the config file to load the app from. Reads that one frame and nothing more.
pub fn read_settings(mut socket: &UnixStream) -> Result<String, String> {
    use std::io::Read;
    let mut header = [0u8; wire::HEADER_LEN];
    socket
        .read_exact(&mut header)
        .map_err(|e| format!("no settings from the host: {e}"))?;
    let mut buf = BytesMut::from(&header[..]);
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > wire::MAX_PAYLOAD {
        return Err(format!("the host's first frame is {len} bytes long"));
    }
    buf.resize(wire::HEADER_LEN + len, 0);
    socket
        .read_exact(&mut buf[wire::HEADER_LEN..])
        .map_err(|e| format!("no settings from the host: {e}"))?;
    let frame = wire::decode(&mut buf)
        .map_err(|e| e.to_string())?
        .filter(|frame| frame.kind == Kind::Settings)
        .ok_or("the host's first frame was not its settings")?;
    let mut reader = Reader::new(frame.payload);
    let version = reader.u16().map_err(|e| e.to_string())?;
    if version != wire::VERSION {
        return Err(format!(
            "the host speaks pool protocol {version}, this worker {}: the portico and portico-worker binaries are of different versions",
            wire::VERSION
        ));
    }
    String::from_utf8(reader.rest().to_vec())
        .map_err(|_| "the host's settings are not UTF-8".to_owned())
}

/// Serves `app` over `socket` until the host closes it. Says hello first.
pub fn serve(socket: UnixStream, app: &App) -> std::io::Result<()> {
    let (out, frames) = crossbeam_channel::unbounded::<Frame>();
    let streams: Streams = Arc::new(Mutex::new(HashMap::new()));

    let mut hello = BytesMut::new();
    hello.put_u16_le(wire::VERSION);
    hello.put_u32_le(std::process::id());
    out.send(Frame::new(Kind::Hello, 0, hello.freeze()))
        .map_err(|_| std::io::Error::other("the writer stopped"))?;

    let writer = socket.try_clone()?;
    std::thread::Builder::new()
        .name("pool-writer".into())
        .spawn(move || super::write_frames(writer, frames, None))?;
    let link = Arc::new(Link {
        streams: streams.clone(),
        out: out.clone(),
    });
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        let watch = match app.config().request_timeout.as_limit() {
            Some(limit) => {
                let (done, out) = (&done, out.clone());
                Some(
                    std::thread::Builder::new()
                        .name("stuck-watch".into())
                        .spawn_scoped(scope, move || {
                            watch_for_a_stuck_thread(app, limit, done, &out)
                        })?,
                )
            }
            None => None,
        };
        let result = read_requests(socket, app, &link);
        done.store(true, Ordering::Release);
        if let Some(watch) = watch {
            watch.thread().unpark();
        }
        result
    });
    // The host is gone: every request with it. One that closed the connection cleanly
    // replaces or stops this worker (a reload's drain past graceful_timeout, the server's
    // stop), or has exited (its process closes the socket the same way): its WebSockets are
    // told so (1012, service restart), as their clients are; a broken connection leaves them
    // 1006 (closed without a close frame). A close that finds the app's queue full is
    // dropped, and the app sees 1006 instead.
    let streams = std::mem::take(&mut *streams.lock().unwrap_or_else(|e| e.into_inner()));
    if result.is_ok() {
        for stream in streams.values().filter(|stream| stream.websocket) {
            let _ = stream.exchange.try_push(Inbound::Closed {
                code: crate::websocket::close_code::SERVICE_RESTART,
                reason: "service restart".into(),
            });
        }
    }
    drop(streams);
    result
}

/// Asks the host to replace this worker once it is stuck past `request_timeout` (see
/// [`App::stuck_for`]): a WSGI thread still in one request (a loop, a deadlock, a C call
/// that holds the GIL), whether or not its client waited for the 504, or an ASGI event loop
/// that runs nothing else. A client that gave up sooner would otherwise leave the worker
/// stuck, and the least-busy choice, seeing nothing in flight, would keep giving it
/// requests (uWSGI's harakiri and mod_wsgi's request-timeout act on the thread too, not on
/// the client). An ASGI request that only awaits past the limit gets its 504 and costs
/// nothing more: its loop serves on.
fn watch_for_a_stuck_thread(app: &App, limit: Duration, done: &AtomicBool, out: &Sender<Frame>) {
    let tick = (limit / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let what = match app.config().interface {
        Interface::Wsgi => {
            "a request ran past request_timeout ({limit}) and its thread is still in the app"
        }
        Interface::Asgi => {
            "its event loop has run nothing else for longer than request_timeout ({limit})"
        }
    };
    while !done.load(Ordering::Acquire) {
        std::thread::park_timeout(tick);
        if app.stuck_for().is_some_and(|stuck| stuck > limit) {
            let why = what.replace("{limit}", &format!("{limit:?}"));
            let _ = out.send(Frame::new(Kind::Recycle, 0, Bytes::from(why)));
            return;
        }
    }
}

fn read_requests(socket: UnixStream, app: &App, link: &Arc<Link>) -> std::io::Result<()> {
    match super::read_frames(&socket, |frame| handle(frame, app, link)) {
        super::ReadEnd::Closed => Ok(()),
        super::ReadEnd::Failed(e) => Err(e),
        super::ReadEnd::Protocol(e) => Err(std::io::Error::other(e)),
    }
}

fn handle(frame: Frame, app: &App, link: &Arc<Link>) -> Result<(), wire::WireError> {
    let (streams, out) = (&link.streams, &link.out);
    let id = frame.stream;
    let lookup = || {
        streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    };
    match frame.kind {
        Kind::Request => {
            let request = wire::decode_request(frame.payload)?;
            let websocket = request.kind == RequestKind::WebSocket;
            let submitted = match request.kind {
                RequestKind::Http => app.submit(
                    request.head,
                    request.route,
                    request.body.map(|body| vec![body]),
                ),
                RequestKind::WebSocket => app.submit_websocket(request.head, request.route),
            };
            match submitted {
                Ok(exchange) => {
                    let stream = Arc::new_cyclic(|me| WorkerStream {
                        exchange,
                        websocket,
                        credit: AtomicI64::new(i64::from(INITIAL_WINDOW)),
                        waker: Waker::from(Arc::new(StreamWaker {
                            id,
                            stream: me.clone(),
                            link: link.clone(),
                        })),
                        inbound: Mutex::new((VecDeque::new(), false)),
                        assembler: Mutex::new(wire::WsAssembler::default()),
                        wakes: AtomicUsize::new(0),
                        file: Mutex::new(None),
                        staged: Mutex::new((VecDeque::new(), false)),
                    });
                    streams
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id, stream.clone());
                    // The waker fires when the app has something; it is run now only if the
                    // app was that quick (saves a look per request).
                    if stream.exchange.arm(&stream.waker) {
                        wake_stream(id, &stream, link);
                    }
                }
                Err(e) => {
                    let _ = out.send(Frame::new(Kind::Failed, id, wire::encode_error(&e)));
                }
            }
        }
        Kind::Body | Kind::BodyEnd | Kind::BodyFailed => {
            let piece = match frame.kind {
                Kind::Body => BodyPiece::Data(frame.payload),
                Kind::BodyEnd => BodyPiece::End,
                _ => BodyPiece::Failed(wire::decode_error(frame.payload)?),
            };
            if let Some(stream) = lookup() {
                stream.exchange.send_body(piece);
            }
        }
        Kind::Cancel => {
            // Dropping the exchange tells the app the client is gone; client items still
            // waiting for the app go first (the pump drops the stream after them).
            let stream = lookup();
            let waiting = stream.as_ref().is_some_and(|s| {
                let mut inbound = s.inbound.lock().unwrap_or_else(|e| e.into_inner());
                inbound.1 = true;
                !inbound.0.is_empty()
            });
            if let (true, Some(stream)) = (waiting, &stream) {
                wake_stream(id, stream, link);
            } else {
                streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            }
            // The host counts the request against the worker's threads until the app lets
            // go of it. A WebSocket whose client messages still wait for the app (ASGI's: a
            // task, no thread) and a stream already over are released at once.
            match stream.filter(|_| !waiting) {
                Some(stream) => {
                    let watch = Waker::from(Arc::new(ReleaseWatch {
                        id,
                        stream: stream.clone(),
                        out: link.out.clone(),
                    }));
                    if stream.exchange.abandon_and_watch(&watch) {
                        let _ = link.out.send(Frame::bare(Kind::Released, id));
                    }
                }
                None => {
                    let _ = link.out.send(Frame::bare(Kind::Released, id));
                }
            }
        }
        Kind::WsIn | Kind::WsClosed => {
            let Some(stream) = lookup() else {
                return Ok(());
            };
            let item = if frame.kind == Kind::WsIn {
                let message = stream
                    .assembler
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(frame.payload)?;
                match message {
                    Some(message) => Inbound::Message(message),
                    None => return Ok(()),
                }
            } else {
                let (code, reason) = wire::decode_close(frame.payload)?;
                Inbound::Closed { code, reason }
            };
            stream
                .inbound
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .0
                .push_back(item);
            // Through the pump, which runs on one thread at a time: handing the item to the
            // app can wake this stream again on this thread.
            wake_stream(id, &stream, link);
        }
        Kind::Window => {
            let mut r = Reader::new(frame.payload);
            let increment = r.u32()?;
            r.end()?;
            if let Some(stream) = lookup() {
                stream
                    .credit
                    .fetch_add(i64::from(increment), Ordering::AcqRel);
                wake_stream(id, &stream, link);
            }
        }
        Kind::StatusQuery => {
            let _ = out.send(Frame::new(
                Kind::Status,
                id,
                wire::encode_status(app.pool_status().as_ref()),
            ));
        }
        other => return Err(wire::WireError(format!("the host sent a {other:?} frame"))),
    }
    Ok(())
}

/// Hands the stream's waiting client items to the app, then sends what the app produced, as
/// long as the host's window allows.
fn pump(id: u32, stream: &WorkerStream, link: &Link) {
    let leave = || {
        link.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    };
    if stream.deliver_inbound(id, &link.out) {
        leave();
        return;
    }
    while stream.credit.load(Ordering::Acquire) > 0 {
        {
            let mut staged = stream.staged.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(frame) = staged.0.pop_front() {
                let size = if frame.kind == Kind::Data {
                    frame.payload.len()
                } else {
                    0
                };
                let _ = link.out.send(frame);
                stream.credit.fetch_sub(size as i64, Ordering::AcqRel);
                continue;
            }
            if staged.1 {
                drop(staged);
                leave();
                return;
            }
        }
        {
            let mut file = stream.file.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(body) = file.as_mut() {
                match send_file_piece(id, body, &link.out) {
                    Ok(0) => *file = None,
                    Ok(sent) => {
                        stream.credit.fetch_sub(sent as i64, Ordering::AcqRel);
                        continue;
                    }
                    Err(()) => {
                        drop(file);
                        leave();
                        return;
                    }
                }
            }
        }
        let event = {
            let mut cx = Context::from_waker(&stream.waker);
            let mut next = pin!(stream.exchange.next());
            match next.as_mut().poll(&mut cx) {
                Poll::Pending => return,
                Poll::Ready(event) => event,
            }
        };
        if let Some(AppEvent::File(body)) = event {
            *stream.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(body);
            continue;
        }
        let mut out = Paced {
            id,
            out: &link.out,
            room: stream.credit.load(Ordering::Acquire),
            sent: 0,
            staged: VecDeque::new(),
        };
        let over = send_event(event, &mut out);
        stream.credit.fetch_sub(out.sent as i64, Ordering::AcqRel);
        if !out.staged.is_empty() {
            // Sent on as the host's window opens (the loop above), the end with them.
            *stream.staged.lock().unwrap_or_else(|e| e.into_inner()) = (out.staged, over);
            continue;
        }
        if over {
            leave();
            return;
        }
    }
}

/// Where one event's frames go: to the writer while the host's window has room for their
/// body bytes, and from the first [`Kind::Data`] frame it has no room for on, staged in
/// order, so that a body piece larger than the window goes out as the host takes it.
struct Paced<'a> {
    id: u32,
    out: &'a Sender<Frame>,
    /// What the window allowed when the event was taken, less what has been sent since.
    room: i64,
    /// Body bytes sent.
    sent: usize,
    staged: VecDeque<Frame>,
}

impl Paced<'_> {
    fn send(&mut self, kind: Kind, payload: Bytes) {
        self.push(Frame::new(kind, self.id, payload));
    }

    fn push(&mut self, frame: Frame) {
        let kind = frame.kind;
        if !self.staged.is_empty() || (kind == Kind::Data && self.room <= 0) {
            self.staged.push_back(frame);
            return;
        }
        if kind == Kind::Data {
            self.room -= frame.payload.len() as i64;
            self.sent += frame.payload.len();
        }
        let _ = self.out.send(frame);
    }

    /// A body as [`Kind::Data`] frames of at most [`DATA_PIECE`].
    fn data(&mut self, payload: &Bytes) {
        let mut at = 0;
        while at < payload.len() {
            let end = (at + DATA_PIECE).min(payload.len());
            self.send(Kind::Data, payload.slice(at..end));
            at = end;
        }
    }
}

/// Frames for one event, into `out`; returns whether the stream is over.
fn send_event(event: Option<AppEvent>, out: &mut Paced<'_>) -> bool {
    match event {
        Some(AppEvent::NeedBody) => out.send(Kind::NeedBody, Bytes::new()),
        Some(AppEvent::Head(head)) => {
            let mut payload = BytesMut::new();
            wire::encode_head(&head, &mut payload);
            out.send(Kind::Head, payload.freeze());
        }
        Some(AppEvent::Whole(head, body)) => {
            let mut payload = BytesMut::with_capacity(256);
            wire::encode_head(&head, &mut payload);
            if body.len() <= DATA_PIECE {
                let body = std::slice::from_ref(&body);
                out.push(Frame::with_body(Kind::Whole, out.id, payload, body));
                return true;
            }
            out.send(Kind::Head, payload.freeze());
            out.data(&body);
            out.send(Kind::End, Bytes::new());
            return true;
        }
        Some(AppEvent::Body(body)) => out.data(&body),
        // Paced by the window in `pump`, which takes these before they get here.
        Some(AppEvent::File(_)) => {}
        Some(AppEvent::End) => {
            out.send(Kind::End, Bytes::new());
            return true;
        }
        Some(AppEvent::Trailers(fields)) => out.send(Kind::Trailers, wire::encode_headers(&fields)),
        Some(AppEvent::EarlyHint(links)) => out.send(Kind::EarlyHint, wire::encode_links(&links)),
        Some(AppEvent::Failed(e)) => {
            out.send(Kind::Failed, wire::encode_error(&e));
            return true;
        }
        Some(AppEvent::WsAccept {
            subprotocol,
            headers,
        }) => out.send(
            Kind::WsAccept,
            wire::encode_accept(subprotocol.as_deref(), &headers),
        ),
        Some(AppEvent::WsSend(message)) => {
            // A message goes whole, as far as the window has any room (the host counts it
            // whole), however large the app made it: `websocket_max_message_size` bounds
            // only the client's messages.
            out.sent += message.len();
            for frame in wire::ws_message_frames(Kind::WsSend, out.id, message) {
                out.push(frame);
            }
        }
        Some(AppEvent::WsClose { code, reason }) => {
            out.send(Kind::WsClose, wire::encode_close(code, &reason))
        }
        None => {
            let e = DispatchError::BadResponse("the app thread stopped".into());
            out.send(Kind::Failed, wire::encode_error(&e));
            return true;
        }
    }
    false
}

/// Sends the next piece of a file response: the bytes sent (0 once the file is done), or
/// `Err` when reading it failed, which fails the response.
fn send_file_piece(id: u32, body: &mut FileBody, out: &Sender<Frame>) -> Result<usize, ()> {
    let want = body.len.unwrap_or(u64::MAX).min(DATA_PIECE as u64) as usize;
    if want == 0 {
        return Ok(0);
    }
    let mut piece = vec![0u8; want];
    let read = loop {
        match body.file.read_at(&mut piece, body.offset) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let e = DispatchError::BadResponse(format!("cannot read the app's file: {e}"));
                let _ = out.send(Frame::new(Kind::Failed, id, wire::encode_error(&e)));
                return Err(());
            }
        }
    };
    // A file shorter than promised ends where it ends, as the in-process host's does.
    if read == 0 {
        return Ok(0);
    }
    piece.truncate(read);
    body.offset += read as u64;
    if let Some(len) = body.len.as_mut() {
        *len -= read as u64;
    }
    let _ = out.send(Frame::new(Kind::Data, id, Bytes::from(piece)));
    Ok(read)
}
