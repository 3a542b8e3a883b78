//! The conversation between a host and the app thread serving one request.
//!
//! The host side ([`Exchange`]) is async and never blocks; the app side ([`Responder`]) runs on
//! a Python thread and may block, always with the GIL released. The request body is *pulled*:
//! the app asks for the next piece ([`AppEvent::NeedBody`]) and the host reads exactly one piece
//! from the client and sends it ([`BodyPiece`]). So an app that does not read makes Portico
//! read nothing (backpressure), `Expect: 100-continue` is answered only when the app first
//! reads (as mod_wsgi does), and the host needs only one mutable borrow of its session.
//!
//! Response events queue in a small bounded mailbox: when the client is slow the app thread
//! blocks in its send, so a response is never buffered without bound. Both halves share one
//! allocation per request.
//!
//! The app side comes in two kinds. WSGI threads block (`*_blocking`, on a condition
//! variable, GIL released). The ASGI event loop must never block: it uses the `try_*_or_arm`
//! calls, which either succeed at once or leave an [`AppWaker`] that the host fires when
//! the state changes, and the loop retries then.
//!
//! A WebSocket uses the same mailbox: the app's accept, messages and close travel as
//! [`AppEvent`]s, and the client's messages come back through a small bounded queue of
//! [`Inbound`] items; when the app does not keep up the host stops reading the socket.

use crate::error::DispatchError;
use crate::model::ResponseHead;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Poll, Waker};

/// Response events queued at once per request; beyond this the app thread waits.
const EVENT_CAPACITY: usize = 4;

/// Client WebSocket messages queued for the app; beyond this the host stops reading.
const INBOUND_CAPACITY: usize = 16;

/// Wakes an app side that cannot block a thread (the ASGI event loop) when something it
/// armed for has happened: a body piece or message arrived, room was made, the host left.
/// Fired at most once per arming, never with the mailbox lock held.
pub trait AppWaker: Send + Sync {
    /// Schedules the app side to look at the exchange again. Must not block.
    fn wake(&self);
}

/// A WebSocket message (RFC 6455 section 5.6), in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMessage {
    /// A text message (valid UTF-8).
    Text(String),
    /// A binary message.
    Binary(Bytes),
}

impl WsMessage {
    /// The message's payload in bytes (a text message's UTF-8): what it counts against a
    /// flow-control window.
    pub fn len(&self) -> usize {
        match self {
            WsMessage::Text(text) => text.len(),
            WsMessage::Binary(data) => data.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the host passes to a WebSocket app besides the connection itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A complete message from the client.
    Message(WsMessage),
    /// The connection is over: the client's close code (1005 when it sent none, 1006 when
    /// the connection dropped without a close frame) and reason.
    Closed {
        /// The close code (RFC 6455 section 7.4).
        code: u16,
        /// The close reason, possibly empty.
        reason: String,
    },
}

/// What the app thread tells the host, in order.
#[derive(Debug)]
pub enum AppEvent {
    /// The app wants the next piece of the request body. The host answers with exactly one
    /// [`BodyPiece`] through [`Exchange::send_body`].
    NeedBody,
    /// The response head. Body events follow, then [`AppEvent::End`].
    Head(ResponseHead),
    /// Head, whole body and end of response at once: the fast path for buffered responses.
    Whole(ResponseHead, Bytes),
    /// A piece of the response body.
    Body(Bytes),
    /// A piece of the response body that is a file region (`wsgi.file_wrapper`): the host
    /// sends it without it passing through Python.
    File(FileBody),
    /// The response is complete.
    End,
    /// A 103 Early Hints response with these `Link` values (RFC 8297), before the head; only
    /// sent when the request said the host can ([`crate::model::RequestHead::early_hints`]).
    EarlyHint(Vec<Bytes>),
    /// Response trailers (sent after the body, before [`AppEvent::End`]); only sent when the
    /// request said the host can deliver them ([`crate::model::RequestHead::trailers`]).
    Trailers(Vec<(Bytes, Bytes)>),
    /// The app failed. Before a head was sent the host answers with [`DispatchError::status`];
    /// after, it aborts the connection so the client sees a truncated response.
    Failed(DispatchError),
    /// WebSocket: the app accepts the connection (RFC 6455 section 4.2.2): the host answers
    /// 101 with the chosen subprotocol and the app's extra headers. Before this, a
    /// [`AppEvent::Head`] is a denial response and a [`AppEvent::WsClose`] means 403.
    WsAccept {
        /// The subprotocol the app picked from the client's offer.
        subprotocol: Option<String>,
        /// Extra headers for the 101 response (already checked).
        headers: Vec<(Bytes, Bytes)>,
    },
    /// WebSocket: a message to the client.
    WsSend(WsMessage),
    /// WebSocket: the app closes the connection with this code and reason.
    WsClose {
        /// The close code (RFC 6455 section 7.4).
        code: u16,
        /// The close reason.
        reason: String,
    },
}

impl AppEvent {
    /// Whether the event ends the response: after it the host expects nothing more.
    fn ends_response(&self) -> bool {
        matches!(
            self,
            AppEvent::Whole(..) | AppEvent::End | AppEvent::Failed(_)
        )
    }
}

/// A place taken in an app's admission count (its threads and queue): given back when the
/// response ends, or when the app side lets go of the request without ending it, whichever
/// comes first. So the place is free by the time the host sees the end of the answer, and
/// a keep-alive client's next request is not refused while the thread that answered is
/// still finishing up (closing the app's iterable, PEP 3333).
#[derive(Debug)]
pub(crate) struct AdmissionTicket(Arc<AtomicUsize>);

impl AdmissionTicket {
    /// Takes a place in `count` if it is under `limit`.
    pub(crate) fn take(count: &Arc<AtomicUsize>, limit: usize) -> Option<AdmissionTicket> {
        if count.fetch_add(1, Ordering::AcqRel) >= limit {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(AdmissionTicket(count.clone()))
    }
}

impl Drop for AdmissionTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A region of an open file to send as response body.
#[derive(Debug)]
pub struct FileBody {
    /// The file, owned by the host from now on (a duplicate of the app's descriptor).
    pub file: std::fs::File,
    /// Where to start.
    pub offset: u64,
    /// How many bytes to send; `None` means to the end of the file.
    pub len: Option<u64>,
}

/// The host's answer to [`AppEvent::NeedBody`].
#[derive(Debug)]
pub enum BodyPiece {
    /// More body bytes (never empty).
    Data(Bytes),
    /// The body is complete.
    End,
    /// The body cannot be read further; reads in the app raise.
    Failed(DispatchError),
}

/// The host's half of a request in flight. Dropping it tells the app side the host is gone.
pub struct Exchange {
    shared: Arc<Shared>,
}

/// The app thread's half of a request in flight. Cheap to clone; when the last clone is
/// dropped the host sees the end of the events.
#[derive(Clone)]
pub struct Responder {
    half: Arc<AppHalf>,
}

/// The host has gone away (the client disconnected or the request timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostGone;

/// One request's mailbox, in a single allocation: a few queued events, the body piece being
/// handed over, and who is waiting. The lock is held for a push or a pop only, never across
/// a wait, an await or Python code.
struct Shared {
    state: Mutex<State>,
    /// The app thread waits here for room in `events` or for a body piece.
    app_wakeup: Condvar,
}

struct State {
    events: VecDeque<AppEvent>,
    body: Option<BodyPiece>,
    inbound: VecDeque<Inbound>,
    /// Armed by an event-loop app side; fired (once) by the next change it may care about.
    app_waker: Option<Arc<dyn AppWaker>>,
    host_waker: Option<Waker>,
    host_gone: bool,
    app_gone: bool,
    /// How many app threads sleep on `app_wakeup` (two can: one in `wsgi.input`, one in
    /// `write()` from a thread of the app's own). A notify is a system call, so it is made only
    /// when someone is there to hear it.
    app_waiters: u32,
    /// The request's place in its app's admission count, if it holds one.
    admission: Option<AdmissionTicket>,
    /// The host refused the request body as too large ([`DispatchError::BodyTooLarge`]).
    body_refused: Option<DispatchError>,
}

/// Marks the app side gone when the last [`Responder`] clone drops.
struct AppHalf {
    shared: Arc<Shared>,
}

impl Drop for AppHalf {
    fn drop(&mut self) {
        let (waker, _admission) = {
            let mut state = self.shared.lock();
            state.app_gone = true;
            (state.host_waker.take(), state.admission.take())
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.host_gone = true;
        self.shared.wake_app(state);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is one field.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Releases the lock and wakes the app side if it is waiting.
    fn wake_app(&self, mut state: MutexGuard<'_, State>) {
        let waiting = state.app_waiters > 0;
        let waker = state.app_waker.take();
        drop(state);
        if waiting {
            self.app_wakeup.notify_all();
        }
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Waits on `app_wakeup` (the caller rechecks its condition afterwards).
    fn app_wait<'a>(&self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        state.app_waiters += 1;
        let mut state = self
            .app_wakeup
            .wait(state)
            .unwrap_or_else(|e| e.into_inner());
        state.app_waiters -= 1;
        state
    }
}

/// A connected pair of halves.
pub fn channel() -> (Exchange, Responder) {
    channel_holding(None)
}

/// [`channel`] for a request that holds a place in its app's admission count until its
/// response ends (see [`AdmissionTicket`]).
pub(crate) fn channel_holding(admission: Option<AdmissionTicket>) -> (Exchange, Responder) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            events: VecDeque::with_capacity(EVENT_CAPACITY),
            body: None,
            inbound: VecDeque::new(),
            app_waker: None,
            host_waker: None,
            host_gone: false,
            app_gone: false,
            app_waiters: 0,
            admission,
            body_refused: None,
        }),
        app_wakeup: Condvar::new(),
    });
    (
        Exchange {
            shared: shared.clone(),
        },
        Responder {
            half: Arc::new(AppHalf { shared }),
        },
    )
}

impl Exchange {
    /// The next event; `None` when the app thread dropped its half without [`AppEvent::End`]
    /// (which the host treats like [`AppEvent::Failed`]).
    pub async fn next(&self) -> Option<AppEvent> {
        std::future::poll_fn(|cx| match self.poll_event(Some(cx.waker())) {
            Some(event) => Poll::Ready(event),
            None => Poll::Pending,
        })
        .await
    }

    /// Like [`Exchange::next`] for hosts that poll instead of awaiting (nginx): `None` when no
    /// event is ready, `Some(None)` when the app side is gone.
    pub fn try_next(&mut self) -> Option<Option<AppEvent>> {
        self.poll_event(None)
    }

    fn poll_event(&self, waker: Option<&Waker>) -> Option<Option<AppEvent>> {
        let mut state = self.shared.lock();
        if let Some(mut event) = state.events.pop_front() {
            // RFC 9110 section 15.5.14: a body over the limit is the client's error, 413. An
            // app that catches the failed read and answers 5xx itself (Flask turns the
            // OSError into a 500) does not make it the server's.
            if let (Some(refused), AppEvent::Head(head) | AppEvent::Whole(head, _)) =
                (&state.body_refused, &event)
            {
                if head.status >= 500 {
                    event = AppEvent::Failed(refused.clone());
                }
            }
            // The app may be waiting for room.
            self.shared.wake_app(state);
            return Some(Some(event));
        }
        if state.app_gone {
            return Some(None);
        }
        if let Some(waker) = waker {
            match &state.host_waker {
                Some(current) if current.will_wake(waker) => {}
                _ => state.host_waker = Some(waker.clone()),
            }
        }
        None
    }

    /// Registers `waker` for the app's next event without taking one. True when an event
    /// (or the app's end) is there already, so the caller should look now: then the waker
    /// may not fire for it.
    pub fn arm(&self, waker: &Waker) -> bool {
        let mut state = self.shared.lock();
        if !state.events.is_empty() || state.app_gone {
            return true;
        }
        match &state.host_waker {
            Some(current) if current.will_wake(waker) => {}
            _ => state.host_waker = Some(waker.clone()),
        }
        false
    }

    /// Gives up on the request as dropping the exchange does (the app side sees the host
    /// gone, and what it sent is dropped), but goes on watching it: true when the app side
    /// has let go of the request already, else `waker` fires once it does (a WSGI thread
    /// still in the app, say). Called again from that wake-up, it answers the same way.
    pub fn abandon_and_watch(&self, waker: &Waker) -> bool {
        let mut state = self.shared.lock();
        state.host_gone = true;
        state.events.clear();
        let released = state.app_gone;
        if !released {
            state.host_waker = Some(waker.clone());
        }
        self.shared.wake_app(state);
        released
    }

    /// Answers a [`AppEvent::NeedBody`]. Never blocks: only one piece is ever outstanding.
    pub fn send_body(&self, piece: BodyPiece) {
        let mut state = self.shared.lock();
        if let BodyPiece::Failed(e @ DispatchError::BodyTooLarge { .. }) = &piece {
            state.body_refused = Some(e.clone());
        }
        state.body = Some(piece);
        self.shared.wake_app(state);
    }

    /// Queues a WebSocket item for the app; gives it back when the queue is full (then wait
    /// for [`Exchange::has_room`] before reading more from the client).
    pub fn try_push(&self, item: Inbound) -> Result<(), Inbound> {
        let mut state = self.shared.lock();
        if state.app_gone {
            // Nobody will read it: dropping it keeps the host from waiting for room forever.
            return Ok(());
        }
        if state.inbound.len() >= INBOUND_CAPACITY {
            return Err(item);
        }
        state.inbound.push_back(item);
        self.shared.wake_app(state);
        Ok(())
    }

    /// Resolves when the inbound queue has room again (or the app side is gone).
    pub async fn has_room(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.shared.lock();
            if state.inbound.len() < INBOUND_CAPACITY || state.app_gone {
                return Poll::Ready(());
            }
            state.host_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// Queues an event for the host (there is room) and wakes it. The event that ends the
/// response gives the request's admission place back first, so the place is free by the
/// time the host can see the end.
fn push_event(mut state: MutexGuard<'_, State>, event: AppEvent) {
    if event.ends_response() {
        state.admission = None;
    }
    state.events.push_back(event);
    let waker = state.host_waker.take();
    drop(state);
    if let Some(waker) = waker {
        waker.wake();
    }
}

impl Responder {
    fn shared(&self) -> &Shared {
        &self.half.shared
    }

    /// Sends an event without waiting; gives the event back when the mailbox is full.
    pub fn try_send(&self, event: AppEvent) -> Result<(), Result<AppEvent, HostGone>> {
        let state = self.shared().lock();
        if state.host_gone {
            return Err(Err(HostGone));
        }
        if state.events.len() >= EVENT_CAPACITY {
            return Err(Ok(event));
        }
        push_event(state, event);
        Ok(())
    }

    /// Sends an event, waiting while the mailbox is full. Blocks the calling thread: call it
    /// only with the GIL released.
    pub fn send_blocking(&self, mut event: AppEvent) -> Result<(), HostGone> {
        loop {
            match self.try_send(event) {
                Ok(()) => return Ok(()),
                Err(Err(gone)) => return Err(gone),
                Err(Ok(back)) => event = back,
            }
            let state = self.shared().lock();
            if state.events.len() >= EVENT_CAPACITY && !state.host_gone {
                drop(self.shared().app_wait(state));
            }
        }
    }

    /// Waits for the host's answer to a [`AppEvent::NeedBody`]. Same rules as
    /// [`Responder::send_blocking`].
    pub fn recv_body_blocking(&self) -> BodyPiece {
        let mut state = self.shared().lock();
        loop {
            if let Some(piece) = state.body.take() {
                return piece;
            }
            if state.host_gone {
                return BodyPiece::Failed(DispatchError::BadRequest("the client went away".into()));
            }
            state = self.shared().app_wait(state);
        }
    }

    /// Whether the host has stopped listening (client gone, request timed out).
    pub fn host_gone(&self) -> bool {
        self.shared().lock().host_gone
    }

    /// Like [`Responder::try_send`], but when the mailbox is full `waker` is armed to fire
    /// once there is room (or the host leaves).
    pub fn try_send_or_arm(
        &self,
        event: AppEvent,
        waker: &Arc<dyn AppWaker>,
    ) -> Result<(), Result<AppEvent, HostGone>> {
        let mut state = self.shared().lock();
        if state.host_gone {
            return Err(Err(HostGone));
        }
        if state.events.len() >= EVENT_CAPACITY {
            state.app_waker = Some(waker.clone());
            return Err(Ok(event));
        }
        push_event(state, event);
        Ok(())
    }

    /// The host's answer to a [`AppEvent::NeedBody`] if it is there; otherwise arms `waker`
    /// and returns `None`. A host that left answers [`BodyPiece::Failed`].
    pub fn try_recv_body_or_arm(&self, waker: &Arc<dyn AppWaker>) -> Option<BodyPiece> {
        let mut state = self.shared().lock();
        if let Some(piece) = state.body.take() {
            return Some(piece);
        }
        if state.host_gone {
            return Some(BodyPiece::Failed(DispatchError::BadRequest(
                "the client went away".into(),
            )));
        }
        state.app_waker = Some(waker.clone());
        None
    }

    /// The next WebSocket item from the host if there is one; otherwise arms `waker` and
    /// returns `None`. A host that left without a close gives `Closed` with code 1006.
    pub fn try_recv_inbound_or_arm(&self, waker: &Arc<dyn AppWaker>) -> Option<Inbound> {
        let mut state = self.shared().lock();
        if let Some(item) = state.inbound.pop_front() {
            let host = if state.inbound.len() + 1 == INBOUND_CAPACITY {
                // The host may be waiting for room.
                state.host_waker.take()
            } else {
                None
            };
            drop(state);
            if let Some(host) = host {
                host.wake();
            }
            return Some(item);
        }
        if state.host_gone {
            return Some(Inbound::Closed {
                code: 1006,
                reason: String::new(),
            });
        }
        state.app_waker = Some(waker.clone());
        None
    }

    /// Whether the host has left; if not, arms `waker` to fire when it does (or when anything
    /// else changes: the caller checks again).
    pub fn host_gone_or_arm(&self, waker: &Arc<dyn AppWaker>) -> bool {
        let mut state = self.shared().lock();
        if state.host_gone {
            return true;
        }
        state.app_waker = Some(waker.clone());
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_flow_in_order_and_end_when_the_app_side_drops() {
        let (mut host, app) = channel();
        app.try_send(AppEvent::Body(Bytes::from_static(b"a")))
            .unwrap();
        app.try_send(AppEvent::End).unwrap();
        assert!(matches!(host.try_next(), Some(Some(AppEvent::Body(b))) if b == "a"));
        assert!(matches!(host.try_next(), Some(Some(AppEvent::End))));
        assert!(host.try_next().is_none());
        drop(app);
        assert!(matches!(host.try_next(), Some(None)));
    }

    #[test]
    fn full_mailbox_blocks_the_app_until_the_host_reads() {
        let (mut host, app) = channel();
        for _ in 0..EVENT_CAPACITY {
            app.try_send(AppEvent::NeedBody).unwrap();
        }
        assert!(matches!(
            app.try_send(AppEvent::End),
            Err(Ok(AppEvent::End))
        ));
        let sender = std::thread::spawn(move || app.send_blocking(AppEvent::End));
        while host.try_next().is_none() {}
        sender.join().unwrap().unwrap();
    }

    #[test]
    fn host_drop_releases_a_waiting_app() {
        let (host, app) = channel();
        let reader = std::thread::spawn(move || app.recv_body_blocking());
        drop(host);
        assert!(matches!(reader.join().unwrap(), BodyPiece::Failed(_)));
    }

    #[test]
    fn two_waiting_app_threads_are_both_woken() {
        let (mut host, app) = channel();
        for _ in 0..EVENT_CAPACITY {
            app.try_send(AppEvent::NeedBody).unwrap();
        }
        let reader_side = app.clone();
        let reader = std::thread::spawn(move || reader_side.recv_body_blocking());
        let writer = std::thread::spawn(move || app.send_blocking(AppEvent::End));
        // Wake the reader first, then make room for the writer; neither wakeup may be lost.
        while host.shared.lock().app_waiters < 2 {
            std::thread::yield_now();
        }
        host.send_body(BodyPiece::End);
        assert!(matches!(reader.join().unwrap(), BodyPiece::End));
        while host
            .try_next()
            .is_some_and(|e| !matches!(e, Some(AppEvent::End)))
        {}
        writer.join().unwrap().unwrap();
    }

    #[test]
    fn body_piece_reaches_the_app() {
        let (host, app) = channel();
        host.send_body(BodyPiece::Data(Bytes::from_static(b"xyz")));
        assert!(matches!(app.recv_body_blocking(), BodyPiece::Data(b) if b == "xyz"));
        assert!(!app.host_gone());
        drop(host);
        assert!(app.host_gone());
    }
}
