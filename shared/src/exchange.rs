//! The conversation between a host and the app thread serving one request.
//!
//! The host side ([`Exchange`]) is async and never blocks; the app side ([`Responder`]) runs on
//! a Python thread and may block, always with the GIL released. The request body is *pulled*:
//! the app asks for the next piece ([`AppEvent::NeedBody`]) and the host reads exactly one piece
//! from the client and sends it ([`BodyPiece`]). So an app that does not read makes Portico
//! read nothing (backpressure), `Expect: 100-continue` is answered only when the app first
//! reads (as mod_wsgi does), and the host needs only one mutable borrow of its session.
//!
//! Response events flow through a small bounded channel: when the client is slow the app
//! thread blocks in its send, so a response is never buffered without bound.

use crate::error::DispatchError;
use crate::model::ResponseHead;
use bytes::Bytes;
use tokio::sync::mpsc;

/// Response events in flight at once per request; beyond this the app thread waits.
const EVENT_CAPACITY: usize = 4;

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
    /// The app failed. Before a head was sent the host answers with [`DispatchError::status`];
    /// after, it aborts the connection so the client sees a truncated response.
    Failed(DispatchError),
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

/// The host's half of a request in flight.
pub struct Exchange {
    events: mpsc::Receiver<AppEvent>,
    body: crossbeam_channel::Sender<BodyPiece>,
}

/// The app thread's half of a request in flight.
#[derive(Clone)]
pub struct Responder {
    events: mpsc::Sender<AppEvent>,
    body: crossbeam_channel::Receiver<BodyPiece>,
}

/// The host has gone away (the client disconnected or the request timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostGone;

/// A connected pair of halves.
pub fn channel() -> (Exchange, Responder) {
    let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
    // Pull-based: at most one piece is ever outstanding.
    let (body_tx, body_rx) = crossbeam_channel::bounded(1);
    (
        Exchange {
            events: events_rx,
            body: body_tx,
        },
        Responder {
            events: events_tx,
            body: body_rx,
        },
    )
}

impl Exchange {
    /// The next event; `None` when the app thread dropped its half without [`AppEvent::End`]
    /// (which the host treats like [`AppEvent::Failed`]).
    pub async fn next(&mut self) -> Option<AppEvent> {
        self.events.recv().await
    }

    /// Like [`Exchange::next`] for hosts that poll instead of awaiting (nginx): `None` when no
    /// event is ready, `Some(None)` when the app side is gone.
    pub fn try_next(&mut self) -> Option<Option<AppEvent>> {
        match self.events.try_recv() {
            Ok(event) => Some(Some(event)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
        }
    }

    /// Answers a [`AppEvent::NeedBody`]. Never blocks: only one piece is ever outstanding.
    pub fn send_body(&self, piece: BodyPiece) {
        // The app side may be gone already; then nobody wants the piece.
        let _ = self.body.try_send(piece);
    }
}

impl Responder {
    /// Sends an event without waiting; gives the event back when the channel is full.
    pub fn try_send(&self, event: AppEvent) -> Result<(), Result<AppEvent, HostGone>> {
        self.events.try_send(event).map_err(|e| match e {
            mpsc::error::TrySendError::Full(event) => Ok(event),
            mpsc::error::TrySendError::Closed(_) => Err(HostGone),
        })
    }

    /// Sends an event, waiting while the channel is full. Blocks the calling thread: call it
    /// only with the GIL released, and never from inside an async runtime.
    pub fn send_blocking(&self, event: AppEvent) -> Result<(), HostGone> {
        self.events.blocking_send(event).map_err(|_| HostGone)
    }

    /// Waits for the host's answer to a [`AppEvent::NeedBody`]. Same rules as
    /// [`Responder::send_blocking`].
    pub fn recv_body_blocking(&self) -> BodyPiece {
        self.body
            .recv()
            .unwrap_or(BodyPiece::Failed(DispatchError::BadRequest(
                "the client went away".into(),
            )))
    }

    /// Whether the host has stopped listening (client gone, request timed out).
    pub fn host_gone(&self) -> bool {
        self.events.is_closed()
    }
}
