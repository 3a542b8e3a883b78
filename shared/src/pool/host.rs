//! The host's end of one worker's socket. A request becomes a stream: its head goes out as a
//! [`Kind::Request`] frame, and the worker's frames come back into the request's exchange as
//! the very [`AppEvent`]s an in-process app thread would send through the same
//! [`Responder`]. So the host's serving code cannot tell a pooled app from an in-process one.
//!
//! Two threads per worker: a writer that batches frames onto the socket, and a reader that
//! decodes the worker's frames and hands each to its stream. A stream never blocks the
//! reader: what its exchange has no room for waits in the stream's queue, bounded by the
//! flow-control window the host grants ([`Kind::Window`]) as the host takes the body.

use super::wire::{
    self, Frame, Kind, Reader, RequestKind, WireError, INITIAL_WINDOW, WS_INBOUND_WINDOW,
};
use super::Delivery;
use super::PoolStatus;
use crate::error::DispatchError;
use crate::exchange::{self, AppEvent, AppWaker, BodyPiece, Exchange, Inbound, Responder};
use crate::model::RequestHead;
use crate::router::Route;
use crate::websocket::close_code;
use bytes::Bytes;
use crossbeam_channel::Sender;
use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

/// One live worker process, as the host talks to it.
pub(crate) struct WorkerConn {
    /// The worker's process id.
    pub(crate) pid: u32,
    /// The app it runs, for messages.
    app: String,
    out: Sender<Frame>,
    streams: Mutex<HashMap<u32, Arc<HostStream>>>,
    next_stream: AtomicU32,
    alive: AtomicBool,
    /// Requests on this worker now.
    pub(crate) in_flight: AtomicUsize,
    /// Requests the host gave up on (their client left, or timed out) that the app may
    /// still run: they take a thread until the worker says the app let go
    /// ([`Kind::Released`]).
    cancelled_running: AtomicUsize,
    /// Requests this worker has finished.
    pub(crate) served: AtomicU64,
    /// When it finished each of its last [`RECENT`] requests (as [`crate::clock::stamp`]s),
    /// the one at `served % RECENT` the oldest.
    recent_answers: [AtomicU64; RECENT],
    /// The socket, to close it from the host's side.
    socket: UnixStream,
    /// Requests this worker was given.
    pub(crate) taken: AtomicU64,
    /// Requests that failed because it was lost (each got 502, or was cut after its head).
    pub(crate) requests_lost: AtomicU64,
    /// Held through [`WorkerConn::lost`]: its reader and its supervisor may both find it gone,
    /// and the one that comes second returns only once the first has counted what failed.
    losing: Mutex<()>,
    /// Being replaced: it takes no new requests and finishes those it has.
    draining: AtomicBool,
    /// Started on demand, above `processes`: it gets a request only when the others are
    /// busier, so that it can go idle once the burst is over.
    pub(crate) on_demand: AtomicBool,
    /// Why it should be replaced, once something asked for that.
    recycle: Mutex<Option<String>>,
    /// The app's `request_timeout` for a WSGI app: a request cancelled unanswered past it
    /// means a thread stuck in the app, so a worker to replace. (`None` for ASGI: a task
    /// that awaits past it blocks nothing; a stuck loop is reported by the worker itself.
    /// `None` too for a connection to a pool server, which finds its stuck workers itself.)
    request_timeout: Option<Duration>,
    /// Status queries waiting for their answer, by stream.
    status_waiters: Mutex<HashMap<u32, mpsc::Sender<Option<PoolStatus>>>>,
    /// What the writer did with the requests: those it never wrote whole can go elsewhere.
    delivery: Arc<Delivery>,
    /// Request frames given to the writer (counted under the stream table's lock).
    queued: AtomicU64,
    /// Where a request that never reached this worker goes instead, once it is lost: another
    /// worker of the pool, or a new connection to the pool server.
    redirect: OnceLock<Redirect>,
    /// Where such a request waits when no worker is live (see [`Park`]).
    park: OnceLock<Park>,
    /// Told each time a request ends, and when the worker is lost, so that one waiting in
    /// the pool can have its place.
    on_free: OnceLock<OnFree>,
    /// The host closed the connection on purpose (the worker is being replaced or stopped,
    /// or the host stops), rather than the worker going away.
    closed_on_purpose: AtomicBool,
    /// Found stuck in the app (see [`WorkerConn::request_recycle_stuck`]).
    stuck: AtomicBool,
}

/// Gives the connection a request that never reached a lost one should go to.
pub(crate) type Redirect = Box<dyn Fn() -> Option<Arc<WorkerConn>> + Send + Sync>;

/// Keeps a request that never reached a lost worker until a worker is ready, when
/// [`Redirect`] finds none live; gives it back when it cannot.
pub(crate) type Park = Box<dyn Fn(Moved) -> Result<(), Box<Moved>> + Send + Sync>;

/// How many of a worker's last answers tell whether it answers quickly.
const RECENT: usize = 8;

/// Tells the pool that a request on the connection ended.
pub(crate) type OnFree = Box<dyn Fn() + Send + Sync>;

/// How often one request may be moved to another connection.
const MOST_MOVES: u8 = 2;

/// The largest body that goes inside its request's frame.
const INLINE_BODY_LIMIT: usize = 1 << 20;

/// A whole body the host has, in pieces of at most [`wire::DATA_PIECE`], then its end.
fn held_body(pieces: &[Bytes]) -> VecDeque<BodyPiece> {
    let mut held = VecDeque::new();
    for piece in pieces {
        let mut at = 0;
        while at < piece.len() {
            let end = (at + wire::DATA_PIECE).min(piece.len());
            held.push_back(BodyPiece::Data(piece.slice(at..end)));
            at = end;
        }
    }
    held.push_back(BodyPiece::End);
    held
}

/// How many connections one move may try: one picked can refuse (lost, or draining since it
/// was picked), and the next pick passes it over.
pub(crate) const REDIRECT_TRIES: usize = 3;

impl WorkerConn {
    /// The limit past which a request given up on unanswered means a stuck worker, for the
    /// app's `config` (see [`WorkerConn::start`]).
    pub(crate) fn stuck_after(config: &portico_config::AppConfig) -> Option<Duration> {
        match config.interface {
            portico_config::Interface::Wsgi => config.request_timeout.as_limit(),
            portico_config::Interface::Asgi => None,
        }
    }

    /// Starts the reader and writer threads on a socket whose worker has said hello. A
    /// request given up on unanswered past `stuck_after` gets the worker replaced.
    pub(crate) fn start(
        socket: UnixStream,
        pid: u32,
        app: &str,
        stuck_after: Option<Duration>,
    ) -> std::io::Result<Arc<WorkerConn>> {
        let (out, frames) = crossbeam_channel::unbounded();
        let conn = Arc::new(WorkerConn {
            pid,
            app: app.to_owned(),
            socket: socket.try_clone()?,
            out,
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU32::new(1),
            alive: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            cancelled_running: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            recent_answers: Default::default(),
            taken: AtomicU64::new(0),
            requests_lost: AtomicU64::new(0),
            losing: Mutex::new(()),
            draining: AtomicBool::new(false),
            on_demand: AtomicBool::new(false),
            recycle: Mutex::new(None),
            request_timeout: stuck_after,
            status_waiters: Mutex::new(HashMap::new()),
            delivery: Arc::new(Delivery::default()),
            queued: AtomicU64::new(0),
            redirect: OnceLock::new(),
            park: OnceLock::new(),
            on_free: OnceLock::new(),
            closed_on_purpose: AtomicBool::new(false),
            stuck: AtomicBool::new(false),
        });
        let writer = socket.try_clone()?;
        let delivery = conn.delivery.clone();
        std::thread::Builder::new()
            .name(format!("{app}-pool-w{pid}"))
            .spawn(move || super::write_frames(writer, frames, Some(&delivery)))?;
        let reader_conn = conn.clone();
        let name = app.to_owned();
        std::thread::Builder::new()
            .name(format!("{app}-pool-r{pid}"))
            .spawn(move || {
                let why = match super::read_frames(&socket, |frame| dispatch(&reader_conn, frame)) {
                    super::ReadEnd::Closed => "the worker closed its socket".to_owned(),
                    super::ReadEnd::Failed(e) => format!("reading from the worker failed: {e}"),
                    super::ReadEnd::Protocol(e) => e.to_string(),
                };
                reader_conn.lost(&why);
                log::debug!("app `{name}`: worker {pid}: connection closed: {why}");
            })?;
        Ok(conn)
    }

    /// What is at the other end, for messages: a worker, or a pool server (pid 0: a host
    /// does not know its pool server's).
    fn peer(&self) -> String {
        if self.pid == 0 {
            "its pool server".to_owned()
        } else {
            format!("worker {}", self.pid)
        }
    }

    /// Whether the worker can take requests.
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.draining.load(Ordering::SeqCst)
    }

    /// Whether the worker finished its last [`RECENT`] requests within `within`: it is
    /// busy with quick ones.
    pub(crate) fn answers_quickly(&self, within: Duration) -> bool {
        let served = self.served.load(Ordering::Relaxed);
        let oldest = self.recent_answers[served as usize % RECENT].load(Ordering::Relaxed);
        served >= RECENT as u64 && crate::clock::since(oldest) < within
    }

    /// Whether the worker is gone (exited, or its socket failed).
    pub(crate) fn is_lost(&self) -> bool {
        !self.alive.load(Ordering::Acquire)
    }

    /// Stops giving the worker requests. A request that raced with this is refused by
    /// [`WorkerConn::submit`] (and goes to another worker), so once `in_flight` is 0 after
    /// this, it stays 0.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Closes the connection: the worker sees its host gone, finishes and exits. WebSockets
    /// still open on it are closed with 1012 (service restart), as uvicorn closes them when
    /// it stops, so that clients reconnect at once: they would take 1011 for a server bug.
    pub(crate) fn close(&self) {
        self.closed_on_purpose.store(true, Ordering::Release);
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    /// Asks the supervisor to replace a worker that is stuck in the app (a request past
    /// `request_timeout`): as [`WorkerConn::request_recycle`], except that it takes no new
    /// request from now on, since one would wait behind the stuck thread (or blocked event
    /// loop) and time out too: new requests go to the other workers, or wait for its
    /// replacement. Its other requests finish as a drained worker's do; once closed, it gets
    /// no time for a lifespan shutdown its app cannot run.
    pub(crate) fn request_recycle_stuck(&self, why: String) {
        self.stuck.store(true, Ordering::Release);
        self.start_draining();
        self.request_recycle(why);
    }

    /// Whether the host closed the connection on purpose (the worker is being replaced or
    /// stopped), rather than the worker going away.
    pub(crate) fn is_closed_on_purpose(&self) -> bool {
        self.closed_on_purpose.load(Ordering::Acquire)
    }

    /// Whether the worker was found stuck in the app.
    pub(crate) fn is_stuck(&self) -> bool {
        self.stuck.load(Ordering::Acquire)
    }

    /// Asks the supervisor to replace the worker, for `why` (the first reason wins).
    pub(crate) fn request_recycle(&self, why: String) {
        let mut recycle = self.recycle.lock().unwrap_or_else(|e| e.into_inner());
        if recycle.is_none() {
            *recycle = Some(why);
        }
    }

    /// Why the worker should be replaced, if something asked.
    pub(crate) fn recycle_reason(&self) -> Option<String> {
        self.recycle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends a request to the worker; the exchange yields its response.
    pub(crate) fn submit(
        self: &Arc<Self>,
        kind: RequestKind,
        head: &RequestHead,
        route: &Route,
        body: Option<&[Bytes]>,
    ) -> Result<Exchange, DispatchError> {
        let (exchange, request) = Moved::new(kind, head, route, body);
        match self.enqueue(request) {
            Ok(()) => Ok(exchange),
            Err(_) => Err(DispatchError::WorkerLost(format!(
                "app `{}`, {} is gone",
                self.app,
                self.peer()
            ))),
        }
    }

    /// Gives the worker a request (new, or one that never reached a lost worker); hands it
    /// back when this worker takes none.
    pub(crate) fn enqueue(self: &Arc<Self>, request: Moved) -> Result<(), Box<Moved>> {
        // Counted before the drain check (both sequentially consistent): a drainer that
        // sees no request in flight can be sure none slips in after.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let stream = {
            // Checked and sent under the table's lock, which `lost` takes to end the
            // connection: every request it does not find in the table was never sent.
            let mut streams = self.lock_streams();
            if !self.is_alive() {
                drop(streams);
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                return Err(Box::new(request));
            }
            let id = loop {
                // After 2^32 requests the ids come round: skip 0 (the connection's) and any
                // still in use (a WebSocket open since then).
                let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
                if id != 0 && !streams.contains_key(&id) {
                    break id;
                }
            };
            let stream = Arc::new_cyclic(|me| HostStream {
                id,
                me: me.clone(),
                conn: Arc::downgrade(self),
                started: Instant::now(),
                request: request.request.clone(),
                state: Mutex::new(request.state),
                wakes: AtomicUsize::new(0),
            });
            streams.insert(id, stream.clone());
            self.queued.fetch_add(1, Ordering::Relaxed);
            // The writer lives as long as this connection: the send cannot fail.
            let _ = self.out.send(Frame {
                stream: id,
                ..request.request
            });
            stream
        };
        self.taken.fetch_add(1, Ordering::Relaxed);
        // Watches for the client leaving from now on.
        stream.service();
        Ok(())
    }

    /// Sets where requests that never reached this worker go once it is lost.
    pub(crate) fn set_redirect(&self, redirect: Redirect) {
        let _ = self.redirect.set(redirect);
    }

    /// Sets where those requests wait when no worker is live.
    pub(crate) fn set_park(&self, park: Park) {
        let _ = self.park.set(park);
    }

    /// Sets what to tell when a request ends.
    pub(crate) fn set_on_free(&self, on_free: OnFree) {
        let _ = self.on_free.set(on_free);
    }

    /// Asks the peer (a pool server) for its pool's status and waits up to `limit` for the
    /// answer; `None` when it has no pool, errors when it does not answer.
    pub(crate) fn query_status(&self, limit: Duration) -> Result<Option<PoolStatus>, String> {
        let (tx, rx) = mpsc::channel();
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.status_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        self.send(Frame::bare(Kind::StatusQuery, id));
        let answer = rx.recv_timeout(limit);
        self.status_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        answer.map_err(|_| format!("no answer within {limit:?}"))
    }

    fn lock_streams(&self) -> MutexGuard<'_, HashMap<u32, Arc<HostStream>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove(&self, id: u32) {
        if self.lock_streams().remove(&id).is_some() {
            // Sequentially consistent: see the pool's `waiting`.
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let served = self.served.fetch_add(1, Ordering::Relaxed);
            self.recent_answers[served as usize % RECENT]
                .store(crate::clock::stamp(), Ordering::Relaxed);
            self.tell_free();
        }
    }

    /// Tells the pool that a request no longer takes a place here (see [`OnFree`]).
    fn tell_free(&self) {
        if let Some(on_free) = self.on_free.get() {
            on_free();
        }
    }

    /// The worker's threads taken: requests in flight, and those given up on that the app
    /// may still run.
    pub(crate) fn busy(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst) + self.cancelled_running.load(Ordering::SeqCst)
    }

    fn send(&self, frame: Frame) {
        // A gone writer means a gone worker, which the reader reports.
        let _ = self.out.send(frame);
    }

    /// The worker is gone (it exited, or broke the protocol): every request it had fails
    /// with 502 (or, after its head, is cut), and it takes no more.
    ///
    /// Requests the writer never wrote whole never reached it, so they go to another worker
    /// (or a new connection to the pool server) instead, as nginx passes a request it could
    /// not send to the next upstream. One written whole may have been read and acted on,
    /// even if the worker died a moment later: it fails like any other in flight.
    pub(crate) fn lost(&self, why: &str) {
        // Called only by the connection's reader and its pool's supervisor threads, never
        // from inside itself.
        let _one_at_a_time = self.losing.lock().unwrap_or_else(|e| e.into_inner());
        let (streams, queued) = {
            let mut table = self.lock_streams();
            self.alive.store(false, Ordering::Release);
            // A response the worker ended whole is not its to lose: it stays in the table,
            // where its stream's waker finds it, until the client has taken the rest.
            let streams: Vec<Arc<HostStream>> = table
                .extract_if(|_, stream| !stream.lock().finished)
                .map(|(_, stream)| stream)
                .collect();
            (streams, self.queued.load(Ordering::Relaxed))
        };
        // The writer's next write fails, and a write it is blocked in returns.
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        let unwritten = self.delivery.unwritten(queued, Duration::from_secs(1));
        let on_purpose = self.closed_on_purpose.load(Ordering::Acquire);
        for stream in streams {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if unwritten.contains(&stream.id) && self.move_elsewhere(&stream) {
                continue;
            }
            if on_purpose && stream.is_open_websocket() {
                stream.deliver(AppEvent::WsClose {
                    code: close_code::SERVICE_RESTART,
                    reason: "service restart".into(),
                });
                stream.deliver(AppEvent::End);
                continue;
            }
            self.requests_lost.fetch_add(1, Ordering::Relaxed);
            stream.deliver(AppEvent::Failed(DispatchError::WorkerLost(format!(
                "app `{}`, {}: {why}",
                self.app,
                self.peer()
            ))));
        }
        // Requests waiting in the pool may now go elsewhere (or make the pool grow).
        self.cancelled_running.store(0, Ordering::SeqCst);
        self.tell_free();
    }

    /// Moves a request that never reached this worker to where [`WorkerConn::set_redirect`]
    /// says; whether it went.
    fn move_elsewhere(&self, stream: &Arc<HostStream>) -> bool {
        let Some(redirect) = self.redirect.get() else {
            return false;
        };
        let mut moved = {
            let mut state = stream.lock();
            if state.moves >= MOST_MOVES || state.responder.is_none() {
                return false;
            }
            Moved {
                state: std::mem::take(&mut *state),
                request: stream.request.clone(),
            }
        };
        moved.state.moves += 1;
        for _ in 0..REDIRECT_TRIES {
            let Some(next) = redirect() else {
                break;
            };
            match next.enqueue(moved) {
                Ok(()) => {
                    log::debug!(
                        "worker {}: a request it never got went to another",
                        self.pid
                    );
                    return true;
                }
                // That one was lost or began draining since it was picked: it is picked no
                // more, so ask again.
                Err(back) => moved = *back,
            }
        }
        if let Some(park) = self.park.get() {
            match park(moved) {
                Ok(()) => return true,
                Err(back) => moved = *back,
            }
        }
        *stream.lock() = moved.state;
        false
    }
}

/// One frame from the worker, to its stream.
fn dispatch(conn: &Arc<WorkerConn>, frame: Frame) -> Result<(), WireError> {
    match frame.kind {
        Kind::Hello => {
            // A pool server's connection is used before its hello is read (so that
            // connecting never waits on the host's thread): the version is checked here.
            let mut r = Reader::new(frame.payload);
            let version = r.u16()?;
            r.u32()?;
            r.end()?;
            if version != wire::VERSION {
                return Err(WireError(format!(
                    "the peer speaks pool protocol {version}, this host {}: its binary is of another version",
                    wire::VERSION
                )));
            }
            return Ok(());
        }
        Kind::Recycle => {
            conn.request_recycle_stuck(String::from_utf8_lossy(&frame.payload).into_owned());
            return Ok(());
        }
        Kind::Released => {
            // The thread of a request given up on is free (a worker that sends more than it
            // was asked for frees none).
            let released =
                conn.cancelled_running
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if released.is_ok() {
                conn.tell_free();
            }
            return Ok(());
        }
        Kind::Status => {
            let status = wire::decode_status(frame.payload)?;
            let waiter = conn
                .status_waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&frame.stream);
            if let Some(waiter) = waiter {
                let _ = waiter.send(status);
            }
            return Ok(());
        }
        _ => {}
    }
    let Some(stream) = conn.lock_streams().get(&frame.stream).cloned() else {
        // A request the host has given up on (the client left): its frames are dropped.
        return Ok(());
    };
    let event = match frame.kind {
        Kind::NeedBody => {
            stream.lock().awaiting_body = true;
            AppEvent::NeedBody
        }
        Kind::Head => {
            let mut r = Reader::new(frame.payload);
            let head = wire::decode_head(&mut r)?;
            r.end()?;
            AppEvent::Head(head)
        }
        Kind::Whole => {
            let mut r = Reader::new(frame.payload);
            let head = wire::decode_head(&mut r)?;
            AppEvent::Whole(head, r.rest())
        }
        Kind::Data => {
            let mut state = stream.lock();
            state.in_window += frame.payload.len();
            // A broken worker, not only a broken stream: as a flow-control violation is a
            // connection error in HTTP/2 (RFC 9113, section 6.9.1).
            if state.in_window > INITIAL_WINDOW as usize + wire::DATA_PIECE {
                return Err(WireError(format!(
                    "a worker sent {} bytes of response body beyond the window of {INITIAL_WINDOW}",
                    state.in_window - INITIAL_WINDOW as usize
                )));
            }
            drop(state);
            AppEvent::Body(frame.payload)
        }
        Kind::End => AppEvent::End,
        Kind::Failed => AppEvent::Failed(wire::decode_error(frame.payload)?),
        Kind::Trailers => AppEvent::Trailers(wire::decode_headers(frame.payload)?),
        Kind::EarlyHint => AppEvent::EarlyHint(wire::decode_links(frame.payload)?),
        Kind::WsAccept => {
            let (subprotocol, headers) = wire::decode_accept(frame.payload)?;
            {
                let mut state = stream.lock();
                state.answered = true;
                state.accepted = true;
            }
            AppEvent::WsAccept {
                subprotocol,
                headers,
            }
        }
        Kind::WsSend => {
            let mut state = stream.lock();
            // A worker starts a message only while its window has room, and counts it whole
            // (a message is not cut to fit): one begun with the window full is the same
            // violation as body bytes past it.
            if !state.assembler.in_message() && state.in_window >= INITIAL_WINDOW as usize {
                return Err(WireError(format!(
                    "a worker began a WebSocket message with its window of {INITIAL_WINDOW} bytes full ({} not taken yet)",
                    state.in_window
                )));
            }
            let message = state.assembler.push(frame.payload)?;
            match message {
                Some(message) => {
                    state.in_window += message.len();
                    AppEvent::WsSend(message)
                }
                None => return Ok(()),
            }
        }
        Kind::WsClose => {
            let (code, reason) = wire::decode_close(frame.payload)?;
            AppEvent::WsClose { code, reason }
        }
        Kind::WsAck => {
            let mut r = Reader::new(frame.payload);
            let count = r.u32()?;
            r.end()?;
            {
                let mut state = stream.lock();
                state.inbound_credit = state.inbound_credit.saturating_add(count);
            }
            stream.service();
            return Ok(());
        }
        other => return Err(WireError(format!("a worker sent a {other:?} frame"))),
    };
    stream.deliver(event);
    Ok(())
}

/// A request on its way to a worker: its exchange's app side, and what is sent.
pub(crate) struct Moved {
    state: StreamState,
    /// The request frame, numbered when it is sent.
    request: Frame,
}

impl Moved {
    /// A new request for some worker, and the host's half of its exchange.
    pub(crate) fn new(
        kind: RequestKind,
        head: &RequestHead,
        route: &Route,
        body: Option<&[Bytes]>,
    ) -> (Exchange, Moved) {
        let (exchange, responder) = exchange::channel();
        // A body too large for one frame (nginx's client_body_buffer_size can hold more)
        // goes as Body frames when the worker asks, as a streamed one does.
        let whole: usize = body.map_or(0, |pieces| pieces.iter().map(Bytes::len).sum());
        let (inline, held) = match body {
            Some(pieces) if whole > INLINE_BODY_LIMIT => (None, Some(held_body(pieces))),
            _ => (body, None),
        };
        let request = Moved {
            state: StreamState {
                responder: Some(responder),
                websocket: kind == RequestKind::WebSocket,
                inbound_credit: WS_INBOUND_WINDOW,
                held_body: held,
                ..StreamState::default()
            },
            request: wire::request_frame(kind, head, route, inline),
        };
        (exchange, request)
    }

    /// Whether nobody waits for the answer any more (the client left, or timed out).
    pub(crate) fn abandoned(&self) -> bool {
        self.state.responder.as_ref().is_none_or(|r| r.host_gone())
    }

    /// Answers the request with `error`: it reaches no worker.
    pub(crate) fn fail(mut self, error: DispatchError) {
        if let Some(responder) = self.state.responder.take() {
            let _ = responder.try_send(AppEvent::Failed(error));
        }
    }
}

/// One request on a worker, from the host's side.
struct HostStream {
    id: u32,
    /// When this worker was given it: past `request_timeout` unanswered, the worker's thread
    /// is stuck. The time it waited in the pool's queue does not count.
    started: Instant,
    /// The request as sent, for another worker if this one never got it.
    request: Frame,
    /// This stream, for its waker: a response the worker ended whole is served to its end
    /// even after the connection is gone.
    me: Weak<HostStream>,
    conn: Weak<WorkerConn>,
    state: Mutex<StreamState>,
    /// Calls to [`HostStream::service`] not yet answered ([`super::one_at_a_time`]): a pool
    /// server's worker end pumps the exchange on the thread that fills it, which can wake
    /// this stream again from inside its service.
    wakes: AtomicUsize,
}

#[derive(Default)]
struct StreamState {
    /// Times the request was moved to another connection.
    moves: u8,
    /// The app side of the request's exchange; `None` once the request is over.
    responder: Option<Responder>,
    /// The worker has sent the response head.
    answered: bool,
    /// A WebSocket: the client's messages are forwarded to the worker.
    websocket: bool,
    /// A WebSocket the worker accepted.
    accepted: bool,
    /// Client messages the worker still takes before it acknowledges some.
    inbound_credit: u32,
    /// The client's side is over (its close went to the worker).
    inbound_done: bool,
    /// The app's WebSocket message coming in pieces.
    assembler: wire::WsAssembler,
    /// The worker's events that the exchange had no room for yet.
    queue: VecDeque<AppEvent>,
    /// The worker waits for a piece of request body.
    awaiting_body: bool,
    /// The request's whole body, when the host had it but it was too large to go with the
    /// request: given piece by piece as the worker asks, instead of the exchange's.
    held_body: Option<VecDeque<BodyPiece>>,
    /// Response body taken by the host since the last window update.
    unacked: u32,
    /// Response body the worker has sent and not yet been given back in a window update:
    /// a worker keeps it within [`INITIAL_WINDOW`] and one piece ([`wire::DATA_PIECE`]),
    /// so that what waits here for a slow client is bounded.
    in_window: usize,
    /// The worker has ended the response (or failed): once the queue is empty the stream is
    /// over.
    finished: bool,
}

impl AppWaker for HostStream {
    fn wake(&self) {
        // A stream that is over has no responder left, and its service returns at once.
        if let Some(me) = self.me.upgrade() {
            me.service();
        }
    }
}

impl HostStream {
    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An event from the worker: queued behind any that wait, then as many as fit go on.
    /// A WebSocket the worker has accepted (not one it is refusing with a response).
    fn is_open_websocket(&self) -> bool {
        self.lock().accepted
    }

    fn deliver(self: &Arc<Self>, event: AppEvent) {
        {
            let mut state = self.lock();
            if matches!(
                event,
                AppEvent::End | AppEvent::Failed(_) | AppEvent::Whole(..)
            ) {
                state.finished = true;
            }
            if matches!(event, AppEvent::Head(_) | AppEvent::Whole(..)) {
                state.answered = true;
            }
            state.queue.push_back(event);
        }
        self.service();
    }

    /// Moves what can move between the worker and the exchange: queued events in, the
    /// body piece the worker waits for out, window updates out, and a cancel when the
    /// client left. Runs on the reader thread or, through [`AppWaker`], on the host's.
    fn service(self: &Arc<Self>) {
        super::one_at_a_time(&self.wakes, || self.service_once());
    }

    fn service_once(self: &Arc<Self>) {
        let waker: Arc<dyn AppWaker> = self.clone();
        let mut frames = Vec::new();
        let mut over = false;
        {
            let mut state = self.lock();
            let Some(responder) = state.responder.clone() else {
                return;
            };
            let mut cancel = false;
            while let Some(event) = state.queue.pop_front() {
                let size = match &event {
                    AppEvent::Body(data) => data.len() as u32,
                    AppEvent::WsSend(message) => message.len() as u32,
                    _ => 0,
                };
                match responder.try_send_or_arm(event, &waker) {
                    Ok(()) => state.unacked += size,
                    Err(Ok(event)) => {
                        state.queue.push_front(event);
                        break;
                    }
                    Err(Err(_)) => {
                        cancel = true;
                        break;
                    }
                }
            }
            if state.unacked >= INITIAL_WINDOW / 4 && !state.finished {
                frames.push(Frame::new(
                    Kind::Window,
                    self.id,
                    Bytes::copy_from_slice(&state.unacked.to_le_bytes()),
                ));
                state.in_window = state.in_window.saturating_sub(state.unacked as usize);
                state.unacked = 0;
            }
            if !cancel && state.awaiting_body {
                let piece = match state.held_body.as_mut() {
                    Some(held) => held.pop_front(),
                    None => responder.try_recv_body_or_arm(&waker),
                };
                if let Some(piece) = piece {
                    state.awaiting_body = false;
                    frames.push(match piece {
                        BodyPiece::Data(data) => Frame::new(Kind::Body, self.id, data),
                        BodyPiece::End => Frame::bare(Kind::BodyEnd, self.id),
                        BodyPiece::Failed(e) => {
                            Frame::new(Kind::BodyFailed, self.id, wire::encode_error(&e))
                        }
                    });
                }
            }
            // The client's WebSocket messages, as far as the worker's window allows.
            while !cancel && state.websocket && !state.inbound_done && state.inbound_credit > 0 {
                match responder.try_recv_inbound_or_arm(&waker) {
                    Some(Inbound::Message(message)) => {
                        state.inbound_credit -= 1;
                        frames.extend(wire::ws_message_frames(Kind::WsIn, self.id, message));
                    }
                    Some(Inbound::Closed { code, reason }) => {
                        state.inbound_done = true;
                        frames.push(Frame::new(
                            Kind::WsClosed,
                            self.id,
                            wire::encode_close(code, &reason),
                        ));
                    }
                    None => break,
                }
            }
            if !cancel && !state.finished && responder.host_gone_or_arm(&waker) {
                cancel = true;
            }
            if cancel {
                if let Some(conn) = self.conn.upgrade() {
                    // Given up on unanswered after request_timeout (the host answered 504):
                    // the worker's thread is stuck in the app, so the worker is replaced.
                    if let Some(limit) = conn.request_timeout {
                        // Less a margin: behind a pool server, the host that timed out
                        // started its clock a hop earlier.
                        let margin = (limit / 20).min(Duration::from_millis(500));
                        if !state.answered && self.started.elapsed() + margin >= limit {
                            conn.request_recycle_stuck(format!(
                                "a request ran past request_timeout ({limit:?})"
                            ));
                        }
                    }
                }
                if let Some(conn) = self.conn.upgrade() {
                    // Counted before its place in flight is given back (below).
                    conn.cancelled_running.fetch_add(1, Ordering::SeqCst);
                }
                frames.push(Frame::bare(Kind::Cancel, self.id));
                state.queue.clear();
                state.responder = None;
                over = true;
            } else if state.finished && state.queue.is_empty() {
                // The last event is in the exchange: dropping our half ends the request.
                state.responder = None;
                over = true;
            }
        }
        if let Some(conn) = self.conn.upgrade() {
            for frame in frames {
                conn.send(frame);
            }
            if over {
                conn.remove(self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::WsMessage;
    use crate::model::{BodyLength, HttpVersion};
    use std::net::Shutdown;

    fn get(path: &'static [u8]) -> RequestHead {
        RequestHead {
            method: "GET".into(),
            raw_path: Bytes::from_static(path),
            query: Bytes::new(),
            version: HttpVersion::Http11,
            headers: Vec::new(),
            tls: None,
            secure: false,
            trailers: false,
            early_hints: false,
            client: None,
            server: None,
            body: BodyLength::Known(0),
        }
    }

    /// The first `Request` frame that arrives on `peer`.
    fn first_request(mut peer: &UnixStream) -> wire::DecodedRequest {
        use std::io::Read;
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = bytes::BytesMut::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(frame) = wire::decode(&mut buf).unwrap() {
                if frame.kind == Kind::Request {
                    return wire::decode_request(frame.payload).unwrap();
                }
            }
            let n = peer.read(&mut chunk).expect("a request frame within 5 s");
            assert!(n > 0, "the connection ended before a request came");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Two workers, as sockets whose far ends the test holds; requests that never reached
    /// the first go to the second.
    fn two_workers() -> (Arc<WorkerConn>, UnixStream, Arc<WorkerConn>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (other, other_peer) = UnixStream::pair().unwrap();
        let first = WorkerConn::start(ours, 1, "test", None).unwrap();
        let second = WorkerConn::start(other, 2, "test", None).unwrap();
        let to = second.clone();
        first.set_redirect(Box::new(move || Some(to.clone())));
        (first, theirs, second, other_peer)
    }

    fn send(conn: &Arc<WorkerConn>, path: &'static [u8]) -> Exchange {
        let route = Route {
            app: 0,
            script_name: String::new(),
            path_info: path.to_vec(),
        };
        conn.submit(RequestKind::Http, &get(path), &route, None)
            .unwrap()
    }

    #[test]
    fn a_request_the_worker_never_got_goes_to_another() {
        let (gone, theirs, next, other_peer) = two_workers();
        // The first worker reads nothing more: writing to it fails, while its reader has
        // seen nothing yet, so the request is taken as for a live worker.
        theirs.shutdown(Shutdown::Read).unwrap();
        let mut exchange = send(&gone, b"/moved");
        let got = first_request(&other_peer);
        assert_eq!(got.head.raw_path, Bytes::from_static(b"/moved"));
        assert!(gone.is_lost());
        assert_eq!(next.in_flight.load(Ordering::Acquire), 1);
        assert_eq!(gone.in_flight.load(Ordering::Acquire), 0);
        // Still waiting for its answer, from the second worker: not failed.
        assert!(exchange.try_next().is_none());
    }

    #[test]
    fn a_move_refused_by_its_first_target_goes_to_the_next() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (draining_end, _draining_peer) = UnixStream::pair().unwrap();
        let (live_end, live_peer) = UnixStream::pair().unwrap();
        let gone = WorkerConn::start(ours, 1, "test", None).unwrap();
        let draining = WorkerConn::start(draining_end, 2, "test", None).unwrap();
        let live = WorkerConn::start(live_end, 3, "test", None).unwrap();
        // Picked first, it starts draining before the request reaches it.
        draining.start_draining();
        let picks = Mutex::new(vec![live.clone(), draining.clone()]);
        gone.set_redirect(Box::new(move || picks.lock().unwrap().pop()));
        theirs.shutdown(Shutdown::Read).unwrap();
        let mut exchange = send(&gone, b"/second-pick");
        let got = first_request(&live_peer);
        assert_eq!(got.head.raw_path, Bytes::from_static(b"/second-pick"));
        assert_eq!(draining.in_flight.load(Ordering::Acquire), 0);
        assert_eq!(live.in_flight.load(Ordering::Acquire), 1);
        assert!(
            exchange.try_next().is_none(),
            "still waiting for its answer"
        );
    }

    /// A worker's answer on stream 1, as it would write it: a `200 OK` head, then a Data
    /// frame for each piece.
    fn head_then_data(pieces: impl IntoIterator<Item = Bytes>) -> bytes::BytesMut {
        let head = crate::model::ResponseHead::new("200 OK", Vec::new()).unwrap();
        let mut payload = bytes::BytesMut::new();
        wire::encode_head(&head, &mut payload);
        let mut out = bytes::BytesMut::new();
        Frame::new(Kind::Head, 1, payload.freeze()).encode(&mut out);
        for piece in pieces {
            Frame::new(Kind::Data, 1, piece).encode(&mut out);
        }
        out
    }

    #[test]
    fn a_worker_that_sends_past_its_window_is_dropped() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let conn = WorkerConn::start(ours, 1, "test", None).unwrap();
        let _exchange = send(&conn, b"/flood");
        assert_eq!(first_request(&theirs).head.raw_path, b"/flood".as_slice());
        // 1 MiB of body, with no window update taken: twice what the exchange's queue, the
        // window and one piece more let a worker have in the host, for a client that takes
        // nothing.
        let out = head_then_data((0..16).map(|_| Bytes::from(vec![b'x'; wire::DATA_PIECE])));
        assert_dropped_for(
            &conn,
            &mut theirs,
            &out,
            "a worker past its window is broken",
        );
    }

    /// Writes `out` as the worker `conn` talks to, and waits up to 5 s for the host to drop
    /// that worker as broken.
    fn assert_dropped_for(conn: &WorkerConn, worker: &mut UnixStream, out: &[u8], why: &str) {
        use std::io::Write;
        // The host may close the socket before it has read it all.
        let _ = worker.write_all(out);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !conn.is_lost() && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(conn.is_lost(), "{why}");
    }

    #[test]
    fn a_worker_that_begins_a_websocket_message_with_its_window_full_is_dropped() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let conn = WorkerConn::start(ours, 1, "test", None).unwrap();
        let route = Route {
            app: 0,
            script_name: String::new(),
            path_info: b"/ws".to_vec(),
        };
        let _exchange = conn
            .submit(RequestKind::WebSocket, &get(b"/ws"), &route, None)
            .unwrap();
        first_request(&theirs);
        let ws_send = |size: usize| {
            let mut out = bytes::BytesMut::new();
            let message = WsMessage::Binary(vec![b'x'; size].into());
            for frame in wire::ws_message_frames(Kind::WsSend, 1, message) {
                frame.encode(&mut out);
            }
            out
        };
        // For a client that takes nothing: the accept and three messages fill the exchange's
        // mailbox, and the host gives the window back for what enters it. A message larger
        // than the window then waits in the host, begun while the window had room; the next
        // one is begun with the window full.
        let mut out = bytes::BytesMut::new();
        Frame::new(Kind::WsAccept, 1, wire::encode_accept(None, &[])).encode(&mut out);
        for _ in 0..3 {
            out.extend_from_slice(&ws_send(10));
        }
        out.extend_from_slice(&ws_send(2 * INITIAL_WINDOW as usize));
        out.extend_from_slice(&ws_send(1));
        assert_dropped_for(
            &conn,
            &mut theirs,
            &out,
            "a message begun with the window full is a broken worker",
        );
    }

    #[test]
    fn a_response_the_worker_ended_survives_the_worker() {
        use std::io::Write;
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let conn = WorkerConn::start(ours, 1, "test", None).unwrap();
        let mut exchange = send(&conn, b"/whole");
        assert_eq!(first_request(&theirs).head.raw_path, b"/whole".as_slice());
        // More pieces than the exchange holds, the end, then the worker is gone: the host
        // has the whole response while its client has taken none of it yet.
        let mut out = head_then_data((0..10u8).map(|i| Bytes::from(vec![i; 100])));
        Frame::bare(Kind::End, 1).encode(&mut out);
        theirs.write_all(&out).unwrap();
        drop(theirs);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !conn.is_lost() && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(conn.is_lost());
        // And the connection itself is gone (its reader ends after losing it).
        let gone = Arc::downgrade(&conn);
        drop(conn);
        while gone.upgrade().is_some() && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(gone.upgrade().is_none(), "the connection was dropped");
        let mut body = Vec::new();
        let ended = loop {
            match exchange.try_next() {
                Some(Some(AppEvent::Head(_))) => {}
                Some(Some(AppEvent::Body(piece))) => body.extend_from_slice(&piece),
                Some(Some(AppEvent::End)) => break true,
                Some(other) => panic!("not the worker's response: {other:?}"),
                None if Instant::now() < deadline => std::thread::yield_now(),
                None => break false,
            }
        };
        assert!(ended, "the response ended after {} bytes", body.len());
        assert_eq!(body.len(), 1000);
    }

    #[test]
    fn a_body_too_large_for_a_frame_goes_in_pieces_as_the_worker_asks() {
        use std::io::{Read, Write};
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let conn = WorkerConn::start(ours, 1, "test", None).unwrap();
        let body: Vec<u8> = (0..20 << 20).map(|i| (i % 251) as u8).collect();
        let pieces = vec![
            Bytes::copy_from_slice(&body[..7]),
            Bytes::copy_from_slice(&body[7..]),
        ];
        let route = Route {
            app: 0,
            script_name: String::new(),
            path_info: b"/upload".to_vec(),
        };
        let mut head = get(b"/upload");
        head.body = BodyLength::Known(body.len() as u64);
        let _exchange = conn
            .submit(RequestKind::Http, &head, &route, Some(&pieces))
            .unwrap();
        let request = first_request(&theirs);
        assert!(
            request.body.is_none(),
            "a 20 MiB body does not go inside the request"
        );
        let mut got = Vec::new();
        let mut buf = bytes::BytesMut::new();
        let mut chunk = vec![0u8; 1 << 16];
        'asking: loop {
            let mut ask = bytes::BytesMut::new();
            Frame::bare(Kind::NeedBody, 1).encode(&mut ask);
            theirs.write_all(&ask).unwrap();
            loop {
                if let Some(frame) = wire::decode(&mut buf).unwrap() {
                    match frame.kind {
                        Kind::Body => {
                            assert!(frame.payload.len() <= wire::DATA_PIECE);
                            got.extend_from_slice(&frame.payload);
                            continue 'asking;
                        }
                        Kind::BodyEnd => break 'asking,
                        _ => continue,
                    }
                }
                let n = theirs.read(&mut chunk).unwrap();
                assert!(n > 0, "the host closed the connection");
                buf.extend_from_slice(&chunk[..n]);
            }
        }
        assert!(
            got == body,
            "the body came whole and in order ({} bytes)",
            got.len()
        );
    }

    #[test]
    fn a_request_the_worker_got_is_not_sent_again() {
        let (gone, theirs, next, other_peer) = two_workers();
        let mut exchange = send(&gone, b"/once");
        // The worker read it, then went away.
        assert_eq!(
            first_request(&theirs).head.raw_path,
            Bytes::from_static(b"/once")
        );
        drop(theirs);
        // Its failure is the last thing `lost` does with it, after deciding not to move it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut answer = None;
        while answer.is_none() && Instant::now() < deadline {
            answer = exchange.try_next();
            std::thread::yield_now();
        }
        assert!(answer.is_some(), "the request failed");
        assert!(gone.is_lost());
        assert_eq!(next.in_flight.load(Ordering::Acquire), 0);
        use std::io::Read;
        other_peer.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        assert!(
            (&other_peer).read(&mut byte).is_err(),
            "nothing went to the second worker"
        );
    }
}
