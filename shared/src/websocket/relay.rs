//! The host-neutral half of an accepted WebSocket: between the client's bytes and the app's
//! exchange. A host only moves bytes: it feeds what it reads to [`Relay::client_bytes`],
//! passes the app's events to [`Relay::app_event`], writes whatever lands in `out`, and
//! closes the connection once [`Relay::finished`] says so.

use super::{close_code, CloseState, Codec, Incoming};
use crate::exchange::{AppEvent, Exchange, Inbound, WsMessage};
use bytes::BytesMut;

/// One open WebSocket, after the 101.
#[derive(Debug)]
pub struct Relay {
    codec: Codec,
    /// Client bytes not yet decoded.
    input: BytesMut,
    /// A decoded item the app's queue had no room for; reading stops until it is taken.
    pending: Option<Inbound>,
    /// The app has been told the connection is over.
    told_app: bool,
    /// Nothing more will happen on the connection.
    done: bool,
}

impl Relay {
    /// Starts relaying with `codec` (configured with the negotiated extensions).
    pub fn new(codec: Codec) -> Relay {
        Relay {
            codec,
            input: BytesMut::with_capacity(4096),
            pending: None,
            told_app: false,
            done: false,
        }
    }

    /// Whether the host should read from the client now: not while a message waits for room
    /// in the app's queue (that is the backpressure), and not once the connection is over.
    pub fn wants_read(&self) -> bool {
        self.pending.is_none() && !self.done
    }

    /// Whether an item waits for room in the app's queue (wait for
    /// [`Exchange::has_room`], then call [`Relay::retry`]).
    pub fn is_blocked(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether the connection is over: write what is in `out`, then close it.
    pub fn finished(&self) -> bool {
        self.done && self.pending.is_none()
    }

    /// Bytes read from the client. Frames are decoded and delivered; pongs and close
    /// replies land in `out`.
    pub fn client_bytes(&mut self, data: &[u8], exchange: &Exchange, out: &mut BytesMut) {
        self.input.extend_from_slice(data);
        self.decode(exchange, out);
    }

    /// The client closed its side (or the read failed) without a close frame: 1006.
    pub fn client_gone(&mut self, exchange: &Exchange) {
        self.tell_app(
            exchange,
            Inbound::Closed {
                code: close_code::ABNORMAL,
                reason: String::new(),
            },
        );
        self.done = true;
    }

    /// The server is stopping: the client gets a close frame with 1012 (service restart, so
    /// that it reconnects at once; RFC 6455 section 7.4, IANA registry) and the app a
    /// `websocket.disconnect` with that code, as uvicorn closes its sockets when it stops.
    /// The client's close reply then ends the connection. Nothing happens if a close is
    /// already under way.
    pub fn server_stopping(&mut self, exchange: &Exchange, out: &mut BytesMut) {
        if self
            .codec
            .encode_close(close_code::SERVICE_RESTART, "service restart", out)
        {
            self.tell_app(
                exchange,
                Inbound::Closed {
                    code: close_code::SERVICE_RESTART,
                    reason: "service restart".into(),
                },
            );
        }
    }

    /// Delivers the item that waited for room, then goes on decoding what was buffered.
    pub fn retry(&mut self, exchange: &Exchange, out: &mut BytesMut) {
        if let Some(item) = self.pending.take() {
            if let Err(item) = exchange.try_push(item) {
                self.pending = Some(item);
                return;
            }
        }
        if !self.done {
            self.decode(exchange, out);
        }
    }

    fn decode(&mut self, exchange: &Exchange, out: &mut BytesMut) {
        while self.pending.is_none() && !self.done {
            match self.codec.decode(&mut self.input) {
                Ok(None) => return,
                Ok(Some(Incoming::Text(text))) => {
                    self.push(exchange, Inbound::Message(WsMessage::Text(text)))
                }
                Ok(Some(Incoming::Binary(data))) => {
                    self.push(exchange, Inbound::Message(WsMessage::Binary(data)))
                }
                // RFC 6455 section 5.5.2: a Ping is answered with a Pong of the same payload.
                Ok(Some(Incoming::Ping(payload))) => {
                    self.codec.encode_pong(&payload, out);
                }
                Ok(Some(Incoming::Pong(_))) => {}
                Ok(Some(Incoming::Close { code, reason })) => {
                    if self.codec.state() == CloseState::CloseReceived {
                        // The client started the closing handshake: echo it (section 5.5.1).
                        self.codec.encode_close_reply(code, out);
                        self.tell_app(
                            exchange,
                            Inbound::Closed {
                                code: code.unwrap_or(close_code::NO_STATUS),
                                reason,
                            },
                        );
                    }
                    // Either way (reply to ours, or ours just sent), the handshake is done.
                    self.done = true;
                }
                Err(e) => {
                    self.codec.encode_close(e.code, e.reason, out);
                    self.tell_app(
                        exchange,
                        Inbound::Closed {
                            code: e.code,
                            reason: e.reason.to_owned(),
                        },
                    );
                    self.done = true;
                }
            }
        }
    }

    fn push(&mut self, exchange: &Exchange, item: Inbound) {
        if let Err(item) = exchange.try_push(item) {
            self.pending = Some(item);
        }
    }

    fn tell_app(&mut self, exchange: &Exchange, item: Inbound) {
        if !self.told_app {
            self.told_app = true;
            self.push(exchange, item);
        }
    }

    /// An event from the app (`None`: the app side is gone). Frames land in `out`.
    pub fn app_event(&mut self, event: Option<AppEvent>, out: &mut BytesMut) {
        match event {
            Some(AppEvent::WsSend(WsMessage::Text(text))) => {
                self.codec.encode_text(&text, out);
            }
            Some(AppEvent::WsSend(WsMessage::Binary(data))) => {
                self.codec.encode_binary(&data, out);
            }
            Some(AppEvent::WsClose { code, reason }) => {
                self.codec.encode_close(code, &reason, out);
                // The app reads no more: what waits for it is dropped, so that reading goes
                // on and the client's close reply ends the connection.
                self.pending = None;
                // The app is done with messages; the client's reply ends the connection.
                self.told_app = true;
            }
            // The app finished normally without closing: close for it.
            Some(AppEvent::End) | None => {
                if self.codec.encode_close(close_code::NORMAL, "", out) {
                    self.told_app = true;
                }
                if closing_handshake_done(&self.codec) {
                    self.done = true;
                }
            }
            // RFC 6455 section 7.4.1: 1011, the server hit an unexpected condition.
            Some(AppEvent::Failed(_)) => {
                self.codec.encode_close(close_code::INTERNAL_ERROR, "", out);
                self.told_app = true;
            }
            Some(_) => {}
        }
    }
}

/// Whether both close frames have gone (or the connection failed): after the app is gone,
/// there is nothing left to wait for.
fn closing_handshake_done(codec: &Codec) -> bool {
    matches!(codec.state(), CloseState::Closed | CloseState::Failed)
}
