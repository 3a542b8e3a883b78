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
use super::PoolStatus;
use crate::error::DispatchError;
use crate::exchange::{
    self, AppEvent, AppWaker, BodyPiece, Exchange, Inbound, Responder, WsMessage,
};
use crate::model::RequestHead;
use crate::router::Route;
use bytes::Bytes;
use crossbeam_channel::Sender;
use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// One live worker process, as the host talks to it.
pub(crate) struct WorkerConn {
    /// The worker's process id.
    pub(crate) pid: u32,
    out: Sender<Frame>,
    streams: Mutex<HashMap<u32, Arc<HostStream>>>,
    next_stream: AtomicU32,
    alive: AtomicBool,
    /// Requests on this worker now.
    pub(crate) in_flight: AtomicUsize,
    /// Requests this worker has finished.
    pub(crate) served: AtomicU64,
    /// The socket, to close it from the host's side.
    socket: UnixStream,
    /// Requests this worker was given.
    pub(crate) taken: AtomicU64,
    /// Being replaced: it takes no new requests and finishes those it has.
    draining: AtomicBool,
    /// Why it should be replaced, once something asked for that.
    recycle: Mutex<Option<String>>,
    /// The app's `request_timeout`: a request cancelled unanswered past it means a stuck
    /// worker.
    request_timeout: Option<Duration>,
    /// Status queries waiting for their answer, by stream.
    status_waiters: Mutex<HashMap<u32, mpsc::Sender<Option<PoolStatus>>>>,
}

impl WorkerConn {
    /// Starts the reader and writer threads on a socket whose worker has said hello.
    pub(crate) fn start(
        socket: UnixStream,
        pid: u32,
        app: &str,
        request_timeout: Option<Duration>,
    ) -> std::io::Result<Arc<WorkerConn>> {
        let (out, frames) = crossbeam_channel::unbounded();
        let conn = Arc::new(WorkerConn {
            pid,
            socket: socket.try_clone()?,
            out,
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU32::new(1),
            alive: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            recycle: Mutex::new(None),
            request_timeout,
            status_waiters: Mutex::new(HashMap::new()),
        });
        let writer = socket.try_clone()?;
        std::thread::Builder::new()
            .name(format!("{app}-pool-w{pid}"))
            .spawn(move || super::write_frames(writer, frames))?;
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

    /// Whether the worker can take requests.
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.draining.load(Ordering::SeqCst)
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

    /// Closes the connection: the worker sees its host gone, finishes and exits.
    pub(crate) fn close(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
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
        // Counted before the drain check (both sequentially consistent): a drainer that
        // sees no request in flight can be sure none slips in after.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if !self.is_alive() {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(DispatchError::WorkerLost(format!(
                "worker {} is gone",
                self.pid
            )));
        }
        let (exchange, responder) = exchange::channel();
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let stream = Arc::new(HostStream {
            id,
            conn: Arc::downgrade(self),
            started: Instant::now(),
            state: Mutex::new(StreamState {
                responder: Some(responder),
                answered: false,
                websocket: kind == RequestKind::WebSocket,
                inbound_credit: WS_INBOUND_WINDOW,
                inbound_done: false,
                assembler: wire::WsAssembler::default(),
                queue: VecDeque::new(),
                awaiting_body: false,
                unacked: 0,
                finished: false,
            }),
            wakes: AtomicUsize::new(0),
        });
        self.lock_streams().insert(id, stream.clone());
        self.taken.fetch_add(1, Ordering::Relaxed);
        let payload = wire::encode_request(kind, head, route, body);
        let sent = self.out.send(Frame {
            kind: Kind::Request,
            stream: id,
            payload,
        });
        if sent.is_err() {
            // The writer is gone with the socket: no request goes to this worker again (the
            // pool picks another at once, before the reader reports the worker lost).
            self.alive.store(false, Ordering::Release);
            self.remove(id);
            return Err(DispatchError::WorkerLost(format!(
                "worker {} is gone",
                self.pid
            )));
        }
        // Watches for the client leaving from now on.
        stream.service();
        Ok(exchange)
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
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.served.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn send(&self, frame: Frame) {
        // A gone writer means a gone worker, which the reader reports.
        let _ = self.out.send(frame);
    }

    /// The worker is gone (it exited, or broke the protocol): every request it had fails
    /// with 502 (or, after its head, is cut), and it takes no more.
    pub(crate) fn lost(&self, why: &str) {
        self.alive.store(false, Ordering::Release);
        let streams: Vec<Arc<HostStream>> = self.lock_streams().drain().map(|(_, s)| s).collect();
        for stream in streams {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            stream.deliver(AppEvent::Failed(DispatchError::WorkerLost(format!(
                "worker {}: {why}",
                self.pid
            ))));
        }
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
        Kind::Data => AppEvent::Body(frame.payload),
        Kind::End => AppEvent::End,
        Kind::Failed => AppEvent::Failed(wire::decode_error(frame.payload)?),
        Kind::Trailers => AppEvent::Trailers(wire::decode_headers(frame.payload)?),
        Kind::EarlyHint => AppEvent::EarlyHint(wire::decode_links(frame.payload)?),
        Kind::WsAccept => {
            let (subprotocol, headers) = wire::decode_accept(frame.payload)?;
            stream.lock().answered = true;
            AppEvent::WsAccept {
                subprotocol,
                headers,
            }
        }
        Kind::WsSend => {
            let message = stream.lock().assembler.push(frame.payload)?;
            match message {
                Some(message) => AppEvent::WsSend(message),
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

/// One request on a worker, from the host's side.
struct HostStream {
    id: u32,
    started: Instant,
    conn: Weak<WorkerConn>,
    state: Mutex<StreamState>,
    /// Calls to [`HostStream::service`] not yet answered ([`super::one_at_a_time`]): a pool
    /// server's worker end pumps the exchange on the thread that fills it, which can wake
    /// this stream again from inside its service.
    wakes: AtomicUsize,
}

struct StreamState {
    /// The app side of the request's exchange; `None` once the request is over.
    responder: Option<Responder>,
    /// The worker has sent the response head.
    answered: bool,
    /// A WebSocket: the client's messages are forwarded to the worker.
    websocket: bool,
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
    /// Response body taken by the host since the last window update.
    unacked: u32,
    /// The worker has ended the response (or failed): once the queue is empty the stream is
    /// over.
    finished: bool,
}

impl AppWaker for HostStream {
    fn wake(&self) {
        // The waker is always an `Arc<HostStream>` in the stream table or in flight.
        let Some(conn) = self.conn.upgrade() else {
            return;
        };
        // Looked up in a statement of its own: the table's lock must be released before
        // `service`, which may take it again to remove the stream.
        let me = conn.lock_streams().get(&self.id).cloned();
        if let Some(me) = me {
            me.service();
        }
    }
}

impl HostStream {
    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An event from the worker: queued behind any that wait, then as many as fit go on.
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
                    AppEvent::WsSend(WsMessage::Binary(data)) => data.len() as u32,
                    AppEvent::WsSend(WsMessage::Text(text)) => text.len() as u32,
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
                frames.push(Frame {
                    kind: Kind::Window,
                    stream: self.id,
                    payload: Bytes::copy_from_slice(&state.unacked.to_le_bytes()),
                });
                state.unacked = 0;
            }
            if !cancel && state.awaiting_body {
                if let Some(piece) = responder.try_recv_body_or_arm(&waker) {
                    state.awaiting_body = false;
                    frames.push(match piece {
                        BodyPiece::Data(data) => Frame {
                            kind: Kind::Body,
                            stream: self.id,
                            payload: data,
                        },
                        BodyPiece::End => Frame::bare(Kind::BodyEnd, self.id),
                        BodyPiece::Failed(e) => Frame {
                            kind: Kind::BodyFailed,
                            stream: self.id,
                            payload: wire::encode_error(&e),
                        },
                    });
                }
            }
            // The client's WebSocket messages, as far as the worker's window allows.
            while !cancel && state.websocket && !state.inbound_done && state.inbound_credit > 0 {
                match responder.try_recv_inbound_or_arm(&waker) {
                    Some(Inbound::Message(message)) => {
                        state.inbound_credit -= 1;
                        for payload in wire::encode_ws_message(&message) {
                            frames.push(Frame {
                                kind: Kind::WsIn,
                                stream: self.id,
                                payload,
                            });
                        }
                    }
                    Some(Inbound::Closed { code, reason }) => {
                        state.inbound_done = true;
                        frames.push(Frame {
                            kind: Kind::WsClosed,
                            stream: self.id,
                            payload: wire::encode_close(code, &reason),
                        });
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
                            conn.request_recycle(format!(
                                "a request ran past request_timeout ({limit:?})"
                            ));
                        }
                    }
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
