//! The WebSocket protocol, server side, with no I/O (RFC 6455, and RFC 7692
//! permessage-deflate), for both hosts to drive.
//!
//! - [`parse_handshake`] reads the upgrade request and tells a host whether to serve plain
//!   HTTP, refuse (400 or 426), or answer 101 with [`Handshake::response_headers`];
//! - a [`Codec`] per connection turns bytes read from the socket into [`Incoming`] messages
//!   ([`Codec::decode`]) and messages into bytes to write (`Codec::encode_*`), and tracks the
//!   closing handshake ([`CloseState`]).
//!
//! A host's loop: append what the socket gives to one `BytesMut`, call [`Codec::decode`]
//! until it returns `Ok(None)`, answer [`Incoming::Ping`] with [`Codec::encode_pong`],
//! answer [`Incoming::Close`] with [`Codec::encode_close_reply`] and then close the TCP
//! connection; on `Err(e)` write [`Codec::encode_close`]`(e.code, e.reason)` and close the
//! TCP connection without waiting (RFC 6455 section 7.1.7).
//!
//! Choices where the RFCs leave room:
//! - close codes: 1000-1003, 1007-1014 and 3000-4999 are valid (section 7.4); 1012-1014
//!   are IANA-registered (service restart, try again later, bad gateway) and accepted;
//! - messages are limited to [`Config::max_message_size`], 16 MiB by default, after
//!   decompression; beyond it the connection fails with 1009;
//! - `server_max_window_bits=8` is accepted and served with zlib's 9-bit window, whose
//!   matches never reach past 250 bytes (see [`deflate`]).

pub mod deflate;
pub mod handshake;

mod codec;
mod frame;
pub mod relay;
mod utf8;

pub use codec::Codec;
pub use deflate::{DeflateConfig, DeflateParams};
pub use handshake::{accept_key, parse_handshake, Handshake, HandshakeError, Upgrade};
pub use relay::Relay;

/// How long a host waits for the client's close frame after the app's (RFC 6455 section
/// 7.1.1 lets the server close the TCP connection when the client does not answer).
pub const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

use bytes::Bytes;
use std::fmt;

/// Close status codes (RFC 6455 section 7.4.1, and the IANA registry of section 11.7).
pub mod close_code {
    /// 1000: normal closure.
    pub const NORMAL: u16 = 1000;
    /// 1001: the endpoint is going away (server shutdown, page left).
    pub const GOING_AWAY: u16 = 1001;
    /// 1002: protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// 1003: a message of a type the endpoint cannot accept.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// 1005: no code was in the close frame (never sent, only reported).
    pub const NO_STATUS: u16 = 1005;
    /// 1006: the connection closed without a close frame (never sent, only reported).
    pub const ABNORMAL: u16 = 1006;
    /// 1007: message data not consistent with its type (invalid UTF-8 in text).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// 1008: policy violation.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// 1009: a message too big to process.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// 1011: the server hit an unexpected condition.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// 1012: the service is restarting (IANA registry; clients reconnect at once).
    pub const SERVICE_RESTART: u16 = 1012;

    /// Whether `code` may be sent in, and accepted from, a close frame: 1000-1003,
    /// 1007-1014 (1012-1014 are registered with IANA) and 3000-4999 (section 7.4.2). 1004,
    /// 1005, 1006 and 1015 are reserved and never appear on the wire.
    pub fn is_valid(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Limits for a connection's codec, and the server's permessage-deflate policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The largest message accepted, after decompression (and the largest compressed
    /// payload); beyond it the connection fails with 1009 (RFC 6455 section 7.4.1).
    pub max_message_size: usize,
    /// What permessage-deflate to accept (RFC 7692).
    pub deflate: DeflateConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_message_size: 16 << 20,
            deflate: DeflateConfig::default(),
        }
    }
}

/// What [`Codec::decode`] hands a host: a whole message or a control frame (RFC 6455
/// sections 5.5 and 5.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A text message, valid UTF-8 (section 5.6).
    Text(String),
    /// A binary message.
    Binary(Bytes),
    /// A ping: answer with a pong carrying the same payload (section 5.5.2).
    Ping(Bytes),
    /// A pong (section 5.5.3); unsolicited ones are allowed and need no answer.
    Pong(Bytes),
    /// The peer's close frame (section 5.5.1): its code (already checked valid), if any,
    /// and its reason (valid UTF-8).
    Close {
        /// The close code; `None` when the frame had no payload (reported as 1005).
        code: Option<u16>,
        /// The reason, possibly empty.
        reason: String,
    },
}

/// Why the connection fails (RFC 6455 section 7.1.7): the close code and reason to send
/// in the close frame before closing the TCP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    /// 1002 (protocol error), 1007 (invalid UTF-8 or compressed data) or 1009 (too big).
    pub code: u16,
    /// A short reason, for the close frame and the log.
    pub reason: &'static str,
}

impl ProtocolError {
    pub(crate) fn new(code: u16, reason: &'static str) -> Self {
        ProtocolError { code, reason }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebSocket error {}: {}", self.code, self.reason)
    }
}

impl std::error::Error for ProtocolError {}

/// Where the closing handshake stands (RFC 6455 sections 5.5.1 and 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseState {
    /// Messages flow both ways.
    Open,
    /// The peer sent Close: reply once with [`Codec::encode_close_reply`] (messages may
    /// still be sent before it), then close the TCP connection. Nothing more is decoded.
    CloseReceived,
    /// We sent Close: wait for the peer's, meanwhile [`Codec::decode`] discards data and
    /// pings; nothing more may be sent.
    CloseSent,
    /// [`Codec::decode`] failed: send the error's close frame with [`Codec::encode_close`]
    /// and close the TCP connection without waiting.
    Failed,
    /// Both close frames went (or the connection failed and its close went out): close the
    /// TCP connection (the server closes first, section 7.1.1).
    Closed,
}

#[cfg(test)]
mod tests;
