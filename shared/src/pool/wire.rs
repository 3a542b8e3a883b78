//! The framed protocol between a host process and its pool's worker processes, over one Unix
//! socket per worker (docs/pool.md has the byte layout). Sans-IO: [`Frame::encode`] appends
//! to a buffer, [`decode`] takes one frame off the front of one; every length is checked
//! before it is trusted, so a corrupt or hostile peer gets a [`WireError`], never a panic or
//! an allocation it asked for.
//!
//! A frame: `len: u32 LE` (of the payload) | `kind: u8` | `stream: u32 LE` | payload.
//! Streams are requests, numbered by the host; stream 0 is the connection itself.

use super::{PoolStatus, WorkerState, WorkerStatus};
use crate::error::DispatchError;
use crate::exchange::WsMessage;
use crate::model::{BodyLength, HttpVersion, RequestHead, ResponseHead, TlsInfo};
use crate::router::Route;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;
use std::net::{SocketAddr, SocketAddrV6};

/// The protocol version a worker announces in its [`Kind::Hello`]; a host refuses others.
pub const VERSION: u16 = 9;

/// Bytes before a frame's payload.
pub const HEADER_LEN: usize = 9;

/// The largest payload a frame may carry; bodies go in pieces of at most [`DATA_PIECE`].
pub const MAX_PAYLOAD: usize = 16 << 20;

/// The largest piece of body one `Data` or `Body` frame carries.
pub const DATA_PIECE: usize = 64 * 1024;

/// Response body bytes a worker may send on a stream before the host grants more with
/// [`Kind::Window`] (the host's flow control, as HTTP/2's, RFC 9113 section 5.2).
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// What a frame means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Worker → host, stream 0: `version: u16`, `pid: u32`. The first frame of a connection.
    Hello = 1,
    /// Host → worker: a new request on a new stream (see [`request_frame`]).
    Request = 2,
    /// Host → worker: a piece of request body (the answer to [`Kind::NeedBody`]).
    Body = 3,
    /// Host → worker: the request body is complete.
    BodyEnd = 4,
    /// Host → worker: the request body cannot be read (an encoded [`DispatchError`]).
    BodyFailed = 5,
    /// Host → worker: the client is gone; the worker drops the request, and answers with
    /// [`Kind::Released`] once the app has let go of it.
    Cancel = 6,
    /// Host → worker: `increment: u32`, more response body the worker may send.
    Window = 7,
    /// Host → worker: a WebSocket message from the client (see [`ws_message_frames`]).
    WsIn = 8,
    /// Host → worker: the WebSocket is over: `code: u16`, `reason`.
    WsClosed = 9,
    /// Host → pool server, on a stream of its own: the pool's status, answered with
    /// [`Kind::Status`]. (A worker has no pool and answers with an empty one.)
    StatusQuery = 10,
    /// Host → worker, stream 0: `version: u16`, then the text (UTF-8) of the config file
    /// the worker reads its app from, as the host read it for the worker's generation. The
    /// host's first frame; the worker reads it before it loads the app.
    Settings = 11,
    /// Worker → host: the app wants the next piece of request body.
    NeedBody = 16,
    /// Worker → host: the response head (see [`encode_head`]).
    Head = 17,
    /// Worker → host: head and whole body at once (head, then `body: bytes`).
    Whole = 18,
    /// Worker → host: a piece of response body.
    Data = 19,
    /// Worker → host: the response is complete; the stream is over.
    End = 20,
    /// Worker → host: the app failed (an encoded [`DispatchError`]); the stream is over.
    Failed = 21,
    /// Worker → host: response trailers (a header list).
    Trailers = 22,
    /// Worker → host: a 103 Early Hints response (`count: u32`, then `Link` values).
    EarlyHint = 23,
    /// Worker → host: the app accepts the WebSocket: subprotocol (an option), headers.
    WsAccept = 24,
    /// Worker → host: a WebSocket message to the client (see [`ws_message_frames`]).
    WsSend = 25,
    /// Worker → host: the app closes the WebSocket: `code: u16`, `reason`.
    WsClose = 26,
    /// Worker → host: `count: u32` more client messages the app has taken, so the host may
    /// send that many more [`Kind::WsIn`] (at most [`WS_INBOUND_WINDOW`] outstanding).
    WsAck = 27,
    /// Pool server → host: the answer to [`Kind::StatusQuery`] (see [`encode_status`]); the
    /// stream is over.
    Status = 28,
    /// Worker → host, stream 0: replace this worker, for the reason given (UTF-8): one of
    /// its threads has run a request past `request_timeout`, whether or not the host still
    /// waits for that request.
    Recycle = 29,
    /// Worker → host: the app has let go of a request the host cancelled, so the thread
    /// that ran it is free (at once when the app had let go already). The answer to every
    /// [`Kind::Cancel`].
    Released = 30,
}

/// Client WebSocket messages the host may send on a stream before the worker acknowledges
/// them ([`Kind::WsAck`]): the app's own queue, so a slow app stops the host reading.
pub const WS_INBOUND_WINDOW: u32 = 16;

impl Kind {
    fn from_u8(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Hello,
            2 => Kind::Request,
            3 => Kind::Body,
            4 => Kind::BodyEnd,
            5 => Kind::BodyFailed,
            6 => Kind::Cancel,
            7 => Kind::Window,
            8 => Kind::WsIn,
            9 => Kind::WsClosed,
            10 => Kind::StatusQuery,
            11 => Kind::Settings,
            16 => Kind::NeedBody,
            17 => Kind::Head,
            18 => Kind::Whole,
            19 => Kind::Data,
            20 => Kind::End,
            21 => Kind::Failed,
            22 => Kind::Trailers,
            23 => Kind::EarlyHint,
            24 => Kind::WsAccept,
            25 => Kind::WsSend,
            26 => Kind::WsClose,
            27 => Kind::WsAck,
            28 => Kind::Status,
            29 => Kind::Recycle,
            30 => Kind::Released,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it means.
    pub kind: Kind,
    /// The request it belongs to (0: the connection).
    pub stream: u32,
    /// Its payload, as [`Kind`] describes.
    pub payload: Bytes,
    /// The rest of the payload, after `payload`, in the pieces it lies in: a body that goes
    /// inside its head's frame ([`Kind::Request`], [`Kind::Whole`]) is written to the socket
    /// from where it is rather than copied behind the head. Empty in a decoded frame.
    pub tail: Vec<Bytes>,
}

impl Frame {
    /// A frame whose payload is `payload`.
    pub fn new(kind: Kind, stream: u32, payload: Bytes) -> Frame {
        Frame {
            kind,
            stream,
            payload,
            tail: Vec::new(),
        }
    }

    /// A frame with an empty payload.
    pub fn bare(kind: Kind, stream: u32) -> Frame {
        Frame::new(kind, stream, Bytes::new())
    }

    /// A frame whose payload is `head` and then `body`, copied behind `head` only when it is
    /// small.
    pub fn with_body(kind: Kind, stream: u32, mut head: BytesMut, body: &[Bytes]) -> Frame {
        let len: usize = body.iter().map(Bytes::len).sum();
        if len >= SHARED_PAYLOAD {
            return Frame {
                tail: body.to_vec(),
                ..Frame::new(kind, stream, head.freeze())
            };
        }
        head.reserve(len);
        for piece in body {
            head.put_slice(piece);
        }
        Frame::new(kind, stream, head.freeze())
    }

    /// The length of its payload, tail included.
    pub fn payload_len(&self) -> usize {
        self.payload.len() + self.tail.iter().map(Bytes::len).sum::<usize>()
    }

    /// Appends the frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(HEADER_LEN + self.payload_len());
        self.encode_header(out);
        out.put_slice(&self.payload);
        for piece in &self.tail {
            out.put_slice(piece);
        }
    }

    fn encode_header(&self, out: &mut BytesMut) {
        out.put_u32_le(self.payload_len() as u32);
        out.put_u8(self.kind as u8);
        out.put_u32_le(self.stream);
    }
}

/// Payloads (and pieces of a tail) at least this long are written from where they are, not
/// copied into a batch or behind a head, and share the buffer they are read into.
const SHARED_PAYLOAD: usize = 4096;

/// Frames to be written together, as the byte slices of one vectored write: headers and
/// small payloads copied into a buffer, larger payloads (bodies) shared with their frame, so
/// a body is not copied on its way to the socket.
#[derive(Default)]
pub(crate) struct Batch {
    parts: Vec<Bytes>,
    small: BytesMut,
    len: usize,
}

impl Batch {
    /// Adds `frame`; returns where it ends in the batch's bytes.
    pub(crate) fn push(&mut self, frame: &Frame) -> usize {
        self.small.reserve(HEADER_LEN);
        frame.encode_header(&mut self.small);
        for piece in std::iter::once(&frame.payload).chain(&frame.tail) {
            if piece.len() >= SHARED_PAYLOAD {
                if !self.small.is_empty() {
                    self.parts.push(self.small.split().freeze());
                }
                self.parts.push(piece.clone());
            } else {
                self.small.put_slice(piece);
            }
        }
        self.len += HEADER_LEN + frame.payload_len();
        self.len
    }

    /// The batch's length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The batch's bytes, in order, in as many slices as it holds.
    pub(crate) fn parts(&mut self) -> &[Bytes] {
        if !self.small.is_empty() {
            self.parts.push(self.small.split().freeze());
        }
        &self.parts
    }

    /// Empties the batch for the next frames.
    pub(crate) fn clear(&mut self) {
        self.parts.clear();
        self.small.clear();
        self.len = 0;
    }
}

/// Bytes still to come of the frame at the front of `buf`, once its header is in; 0 before.
pub(crate) fn missing(buf: &[u8]) -> usize {
    if buf.len() < HEADER_LEN {
        return 0;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    (HEADER_LEN + len.min(MAX_PAYLOAD)).saturating_sub(buf.len())
}

/// The peer broke the protocol; the connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub String);

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pool protocol error: {}", self.0)
    }
}

impl std::error::Error for WireError {}

fn bad(what: impl Into<String>) -> WireError {
    WireError(what.into())
}

/// Takes one whole frame off the front of `buf`: `Ok(None)` when more bytes are needed.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(bad(format!(
            "a frame of {len} bytes (at most {MAX_PAYLOAD})"
        )));
    }
    let kind =
        Kind::from_u8(buf[4]).ok_or_else(|| bad(format!("unknown frame kind {}", buf[4])))?;
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    let stream = u32::from_le_bytes([buf[5], buf[6], buf[7], buf[8]]);
    buf.advance(HEADER_LEN);
    // A body piece shares the buffer it was read into; a small payload is copied out, so
    // that it cannot keep a whole read's buffer alive while a slow client holds it.
    let payload = if len >= SHARED_PAYLOAD {
        buf.split_to(len).freeze()
    } else {
        let payload = Bytes::copy_from_slice(&buf[..len]);
        buf.advance(len);
        payload
    };
    Ok(Some(Frame::new(kind, stream, payload)))
}

/// Reads the fields of a payload, each checked against what is left.
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    /// Reads `payload` from its start.
    pub fn new(payload: Bytes) -> Reader {
        Reader { buf: payload }
    }

    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.buf.remaining() < n {
            return Err(bad("a payload ends early"));
        }
        Ok(())
    }

    /// A byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.buf.get_u16_le())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.buf.get_u32_le())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.buf.get_u64_le())
    }

    /// `len: u32`, then that many bytes (shared with the payload, not copied).
    pub fn bytes(&mut self) -> Result<Bytes, WireError> {
        let len = self.u32()? as usize;
        self.need(len)?;
        Ok(self.buf.split_to(len))
    }

    /// The next `N` bytes, without a length before them.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.need(N)?;
        let mut out = [0; N];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }

    /// Like [`Reader::bytes`], valid UTF-8.
    pub fn string(&mut self) -> Result<String, WireError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| bad("a string is not UTF-8"))
    }

    /// A count of items, each at least `min_size` bytes: refused when the payload cannot hold
    /// that many (so no allocation is sized by the peer's word alone).
    pub fn count(&mut self, min_size: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size.max(1)) > self.buf.remaining() {
            return Err(bad("a count larger than its payload"));
        }
        Ok(n)
    }

    /// The rest of the payload.
    pub fn rest(&mut self) -> Bytes {
        self.buf.split_off(0)
    }

    /// Checks nothing is left over.
    pub fn end(&self) -> Result<(), WireError> {
        if self.buf.has_remaining() {
            return Err(bad("trailing bytes in a payload"));
        }
        Ok(())
    }
}

fn put_bytes(out: &mut BytesMut, data: &[u8]) {
    out.put_u32_le(data.len() as u32);
    out.put_slice(data);
}

fn put_headers(out: &mut BytesMut, headers: &[(Bytes, Bytes)]) {
    out.put_u32_le(headers.len() as u32);
    for (name, value) in headers {
        put_bytes(out, name);
        put_bytes(out, value);
    }
}

fn read_headers(r: &mut Reader) -> Result<Vec<(Bytes, Bytes)>, WireError> {
    let n = r.count(8)?;
    (0..n).map(|_| Ok((r.bytes()?, r.bytes()?))).collect()
}

fn put_opt_str(out: &mut BytesMut, value: Option<&str>) {
    match value {
        Some(v) => {
            out.put_u8(1);
            put_bytes(out, v.as_bytes());
        }
        None => out.put_u8(0),
    }
}

fn read_opt_str(r: &mut Reader) -> Result<Option<String>, WireError> {
    match r.u8()? {
        0 => Ok(None),
        1 => r.string().map(Some),
        other => Err(bad(format!("an option tag {other}"))),
    }
}

/// A socket address as a family tag (0 none, 4 IPv4, 6 IPv6), the address's bytes and the
/// port: binary, because formatting and parsing text cost more than the rest of the head.
fn put_addr(out: &mut BytesMut, addr: Option<SocketAddr>) {
    match addr {
        None => out.put_u8(0),
        Some(SocketAddr::V4(a)) => {
            out.put_u8(4);
            out.put_slice(&a.ip().octets());
            out.put_u16_le(a.port());
        }
        Some(SocketAddr::V6(a)) => {
            out.put_u8(6);
            out.put_slice(&a.ip().octets());
            out.put_u16_le(a.port());
            out.put_u32_le(a.scope_id());
        }
    }
}

fn read_addr(r: &mut Reader) -> Result<Option<SocketAddr>, WireError> {
    match r.u8()? {
        0 => Ok(None),
        4 => {
            let ip = r.array::<4>()?;
            Ok(Some(SocketAddr::from((ip, r.u16()?))))
        }
        6 => {
            let ip = r.array::<16>()?;
            let (port, scope) = (r.u16()?, r.u32()?);
            Ok(Some(SocketAddr::V6(SocketAddrV6::new(
                ip.into(),
                port,
                0,
                scope,
            ))))
        }
        other => Err(bad(format!("an address family tag {other}"))),
    }
}

/// Whether a request is plain HTTP or a WebSocket handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// An HTTP request.
    Http,
    /// A WebSocket handshake: once accepted, its messages go as [`Kind::WsIn`] and
    /// [`Kind::WsSend`] frames.
    WebSocket,
}

/// A [`Kind::Request`] frame, on stream 0 until it is sent: the kind, the head, the route
/// below the mount, and the whole body when the host read it first.
pub fn request_frame(
    kind: RequestKind,
    head: &RequestHead,
    route: &Route,
    body: Option<&[Bytes]>,
) -> Frame {
    let mut out = BytesMut::with_capacity(256);
    out.put_u8(match kind {
        RequestKind::Http => 0,
        RequestKind::WebSocket => 1,
    });
    put_bytes(&mut out, head.method.as_bytes());
    put_bytes(&mut out, &head.raw_path);
    put_bytes(&mut out, &head.query);
    out.put_u8(match head.version {
        HttpVersion::Http10 => 0,
        HttpVersion::Http11 => 1,
        HttpVersion::Http2 => 2,
    });
    put_headers(&mut out, &head.headers);
    match &head.tls {
        Some(tls) => {
            out.put_u8(1);
            put_opt_str(&mut out, tls.server_cert.as_deref());
            put_bytes(&mut out, tls.protocol.as_bytes());
            put_bytes(&mut out, tls.cipher.as_bytes());
            out.put_u32_le(tls.version.map_or(u32::MAX, u32::from));
            out.put_u32_le(tls.cipher_suite.map_or(u32::MAX, u32::from));
        }
        None => out.put_u8(0),
    }
    out.put_u8(
        u8::from(head.trailers) | (u8::from(head.early_hints) << 1) | (u8::from(head.secure) << 2),
    );
    put_addr(&mut out, head.client);
    put_addr(&mut out, head.server);
    match head.body {
        BodyLength::Empty => out.put_u8(0),
        BodyLength::Known(n) => {
            out.put_u8(1);
            out.put_u64_le(n);
        }
        BodyLength::Unknown => out.put_u8(2),
    }
    put_bytes(&mut out, route.script_name.as_bytes());
    put_bytes(&mut out, &route.path_info);
    match body {
        Some(pieces) => {
            out.put_u8(1);
            out.put_u32_le(pieces.iter().map(Bytes::len).sum::<usize>() as u32);
            Frame::with_body(Kind::Request, 0, out, pieces)
        }
        None => {
            out.put_u8(0);
            Frame::new(Kind::Request, 0, out.freeze())
        }
    }
}

/// A decoded [`Kind::Request`] payload.
#[derive(Debug, Clone)]
pub struct DecodedRequest {
    /// HTTP or WebSocket.
    pub kind: RequestKind,
    /// The request head.
    pub head: RequestHead,
    /// The route (`app` is 0: a worker serves one app).
    pub route: Route,
    /// The whole body, when the host sent it along.
    pub body: Option<Bytes>,
}

/// Reads a [`Kind::Request`] payload.
pub fn decode_request(payload: Bytes) -> Result<DecodedRequest, WireError> {
    let mut r = Reader::new(payload);
    let kind = match r.u8()? {
        0 => RequestKind::Http,
        1 => RequestKind::WebSocket,
        other => return Err(bad(format!("a request kind {other}"))),
    };
    let method = r.string()?;
    let raw_path = r.bytes()?;
    let query = r.bytes()?;
    let version = match r.u8()? {
        0 => HttpVersion::Http10,
        1 => HttpVersion::Http11,
        2 => HttpVersion::Http2,
        other => return Err(bad(format!("an HTTP version {other}"))),
    };
    let headers = read_headers(&mut r)?;
    let tls = match r.u8()? {
        0 => None,
        1 => {
            let server_cert = read_opt_str(&mut r)?.map(std::sync::Arc::from);
            let protocol = r.string()?;
            let cipher = r.string()?;
            let version = u16::try_from(r.u32()?).ok();
            let cipher_suite = u16::try_from(r.u32()?).ok();
            Some(TlsInfo {
                server_cert,
                protocol,
                cipher,
                version,
                cipher_suite,
            })
        }
        other => return Err(bad(format!("a TLS tag {other}"))),
    };
    let flags = r.u8()?;
    let client = read_addr(&mut r)?;
    let server = read_addr(&mut r)?;
    let body_length = match r.u8()? {
        0 => BodyLength::Empty,
        1 => BodyLength::Known(r.u64()?),
        2 => BodyLength::Unknown,
        other => return Err(bad(format!("a body length tag {other}"))),
    };
    let script_name = r.string()?;
    let path_info = r.bytes()?.to_vec();
    let body = match r.u8()? {
        0 => None,
        1 => {
            let len = r.u32()? as usize;
            r.need(len)?;
            Some(r.buf.split_to(len))
        }
        other => return Err(bad(format!("a body tag {other}"))),
    };
    r.end()?;
    Ok(DecodedRequest {
        kind,
        head: RequestHead {
            method,
            raw_path,
            query,
            version,
            headers,
            tls,
            trailers: flags & 1 != 0,
            early_hints: flags & 2 != 0,
            secure: flags & 4 != 0,
            client,
            server,
            body: body_length,
        },
        route: Route {
            app: 0,
            script_name,
            path_info,
        },
        body,
    })
}

/// The payload of a [`Kind::Head`] (and the start of a [`Kind::Whole`]).
pub fn encode_head(head: &ResponseHead, out: &mut BytesMut) {
    out.put_u16_le(head.status);
    put_bytes(out, head.reason.as_bytes());
    put_headers(out, &head.headers);
}

/// Reads a response head. The worker's core checked it already; the host checks again
/// ([`ResponseHead::with_status`]), since a worker is another process.
pub fn decode_head(r: &mut Reader) -> Result<ResponseHead, WireError> {
    let status = r.u16()?;
    let reason = r.string()?;
    let headers = read_headers(r)?;
    let head = ResponseHead::with_status(status, &reason, headers)
        .map_err(|e| bad(format!("a response head the core refuses: {e}")))?;
    Ok(head)
}

/// The payload of a [`Kind::Trailers`].
pub fn encode_headers(headers: &[(Bytes, Bytes)]) -> Bytes {
    let mut out = BytesMut::new();
    put_headers(&mut out, headers);
    out.freeze()
}

/// Reads a [`Kind::Trailers`] payload.
pub fn decode_headers(payload: Bytes) -> Result<Vec<(Bytes, Bytes)>, WireError> {
    let mut r = Reader::new(payload);
    let headers = read_headers(&mut r)?;
    r.end()?;
    Ok(headers)
}

/// The payload of a [`Kind::EarlyHint`].
pub fn encode_links(links: &[Bytes]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u32_le(links.len() as u32);
    for link in links {
        put_bytes(&mut out, link);
    }
    out.freeze()
}

/// Reads a [`Kind::EarlyHint`] payload.
pub fn decode_links(payload: Bytes) -> Result<Vec<Bytes>, WireError> {
    let mut r = Reader::new(payload);
    let n = r.count(4)?;
    let links = (0..n).map(|_| r.bytes()).collect::<Result<_, _>>()?;
    r.end()?;
    Ok(links)
}

/// The largest piece of a WebSocket message one frame carries; larger messages go in several
/// frames (a message may be larger than any frame).
pub const WS_PIECE: usize = 1 << 20;

/// The [`Kind::WsIn`] or [`Kind::WsSend`] frames (`kind`) of one message: each payload starts
/// with the message's type (`0` text, `1` binary), plus `0x80` while more pieces follow, then
/// up to [`WS_PIECE`] bytes of the message, which a large message's frames share rather than
/// copy.
pub fn ws_message_frames(kind: Kind, stream: u32, message: WsMessage) -> Vec<Frame> {
    let (type_byte, data) = match message {
        WsMessage::Text(text) => (0, Bytes::from(text)),
        WsMessage::Binary(data) => (1, data),
    };
    let mut frames = Vec::with_capacity(data.len() / WS_PIECE + 1);
    let mut at = 0;
    loop {
        let end = (at + WS_PIECE).min(data.len());
        let more = end < data.len();
        let head = BytesMut::from(&[type_byte | if more { 0x80 } else { 0 }][..]);
        frames.push(Frame::with_body(kind, stream, head, &[data.slice(at..end)]));
        if !more {
            return frames;
        }
        at = end;
    }
}

/// Puts a WebSocket message back together from the payloads of [`ws_message_frames`].
#[derive(Debug, Default)]
pub struct WsAssembler {
    kind: Option<u8>,
    data: BytesMut,
}

impl WsAssembler {
    /// Whether a message has pieces in and more to come.
    pub fn in_message(&self) -> bool {
        self.kind.is_some()
    }

    /// One piece; returns the message once its last piece is in.
    pub fn push(&mut self, payload: Bytes) -> Result<Option<WsMessage>, WireError> {
        let mut r = Reader::new(payload);
        let head = r.u8()?;
        let (kind, more) = (head & 0x7f, head & 0x80 != 0);
        if kind > 1 {
            return Err(bad(format!("a message type {kind}")));
        }
        if self.kind.is_some_and(|k| k != kind) {
            return Err(bad("a message piece of another type"));
        }
        let rest = r.rest();
        if more {
            self.kind = Some(kind);
            self.data.extend_from_slice(&rest);
            return Ok(None);
        }
        let data = if self.kind.take().is_some() {
            self.data.extend_from_slice(&rest);
            self.data.split().freeze()
        } else {
            rest
        };
        Ok(Some(if kind == 0 {
            WsMessage::Text(
                String::from_utf8(data.to_vec()).map_err(|_| bad("a text message is not UTF-8"))?,
            )
        } else {
            WsMessage::Binary(data)
        }))
    }
}

/// The payload of a [`Kind::WsClose`] or [`Kind::WsClosed`].
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u16_le(code);
    put_bytes(&mut out, reason.as_bytes());
    out.freeze()
}

/// Reads a [`Kind::WsClose`] or [`Kind::WsClosed`] payload.
pub fn decode_close(payload: Bytes) -> Result<(u16, String), WireError> {
    let mut r = Reader::new(payload);
    let code = r.u16()?;
    let reason = r.string()?;
    r.end()?;
    Ok((code, reason))
}

/// The payload of a [`Kind::WsAccept`].
pub fn encode_accept(subprotocol: Option<&str>, headers: &[(Bytes, Bytes)]) -> Bytes {
    let mut out = BytesMut::new();
    put_opt_str(&mut out, subprotocol);
    put_headers(&mut out, headers);
    out.freeze()
}

/// A decoded [`Kind::WsAccept`]: the subprotocol and the extra headers.
pub type Accept = (Option<String>, Vec<(Bytes, Bytes)>);

/// Reads a [`Kind::WsAccept`] payload. The headers are checked as an app's response headers.
pub fn decode_accept(payload: Bytes) -> Result<Accept, WireError> {
    let mut r = Reader::new(payload);
    let subprotocol = read_opt_str(&mut r)?;
    let headers = read_headers(&mut r)?;
    r.end()?;
    let headers = ResponseHead::with_status(200, "", headers)
        .map_err(|e| bad(format!("WebSocket accept headers the core refuses: {e}")))?
        .headers;
    Ok((subprotocol, headers))
}

/// The payload of a [`Kind::Failed`] or [`Kind::BodyFailed`].
pub fn encode_error(e: &DispatchError) -> Bytes {
    let mut out = BytesMut::new();
    let (tag, text, number): (u8, &str, u64) = match e {
        DispatchError::NoRoute => (0, "", 0),
        DispatchError::BadRequest(why) => (1, why, 0),
        DispatchError::BodyTooLarge { limit } => (2, "", *limit),
        DispatchError::BodyTimeout => (3, "", 0),
        DispatchError::UpgradeRequired => (4, "", 0),
        DispatchError::WebSocketDenied => (5, "", 0),
        DispatchError::Overloaded => (6, "", 0),
        DispatchError::AppTimeout(why) => (7, why, 0),
        DispatchError::AppRaised(why) => (8, why, 0),
        DispatchError::BadResponse(why) => (9, why, 0),
        DispatchError::WorkerLost(why) => (10, why, 0),
        DispatchError::PoolUnreachable(why) => (11, why, 0),
        DispatchError::MethodNotAllowed => (12, "", 0),
        DispatchError::BodyStore(why) => (13, why, 0),
        DispatchError::QueueTimeout(why) => (14, why, 0),
    };
    out.put_u8(tag);
    put_bytes(&mut out, clip(text, ERROR_TEXT_LIMIT).as_bytes());
    out.put_u64_le(number);
    out.freeze()
}

/// The most of an error's text a frame carries: the text is for the host's log line (the
/// worker logs the whole traceback itself), and a frame past [`MAX_PAYLOAD`] would end the
/// connection with every request on it (an app can raise with an upload in its message).
pub const ERROR_TEXT_LIMIT: usize = 16 * 1024;

/// `text` cut to at most `limit` bytes, at a character boundary, marked when cut.
fn clip(text: &str, limit: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= limit {
        return text.into();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &text[..end], text.len()).into()
}

/// Reads a [`Kind::Failed`] or [`Kind::BodyFailed`] payload.
pub fn decode_error(payload: Bytes) -> Result<DispatchError, WireError> {
    let mut r = Reader::new(payload);
    let tag = r.u8()?;
    let text = r.string()?;
    let number = r.u64()?;
    r.end()?;
    Ok(match tag {
        0 => DispatchError::NoRoute,
        1 => DispatchError::BadRequest(text),
        2 => DispatchError::BodyTooLarge { limit: number },
        3 => DispatchError::BodyTimeout,
        4 => DispatchError::UpgradeRequired,
        5 => DispatchError::WebSocketDenied,
        6 => DispatchError::Overloaded,
        7 => DispatchError::AppTimeout(text),
        8 => DispatchError::AppRaised(text),
        9 => DispatchError::BadResponse(text),
        10 => DispatchError::WorkerLost(text),
        11 => DispatchError::PoolUnreachable(text),
        12 => DispatchError::MethodNotAllowed,
        13 => DispatchError::BodyStore(text),
        14 => DispatchError::QueueTimeout(text),
        other => return Err(bad(format!("an error tag {other}"))),
    })
}

/// The payload of a [`Kind::Status`]: a pool's status, or nothing (no pool).
pub fn encode_status(status: Option<&PoolStatus>) -> Bytes {
    let mut out = BytesMut::new();
    let Some(status) = status else {
        return out.freeze();
    };
    put_bytes(&mut out, status.app.as_bytes());
    out.put_u64_le(status.generation);
    out.put_u64_le(status.restarts);
    out.put_u32_le(status.server_pid);
    out.put_u64_le(status.queued as u64);
    out.put_u32_le(status.workers.len() as u32);
    for w in &status.workers {
        out.put_u32_le(w.pid);
        out.put_u64_le(w.generation);
        out.put_u8(match w.state {
            WorkerState::Draining => 0,
            WorkerState::Serving => 1,
            WorkerState::Lost => 2,
        });
        out.put_u64_le(w.served);
        out.put_u64_le(w.in_flight as u64);
        out.put_u64_le(w.rss_bytes);
        out.put_u64_le(w.started);
    }
    out.put_u32_le(status.events.len() as u32);
    for event in &status.events {
        put_bytes(&mut out, event.as_bytes());
    }
    out.freeze()
}

/// Reads a [`Kind::Status`] payload.
pub fn decode_status(payload: Bytes) -> Result<Option<PoolStatus>, WireError> {
    if payload.is_empty() {
        return Ok(None);
    }
    let mut r = Reader::new(payload);
    let app = r.string()?;
    let generation = r.u64()?;
    let restarts = r.u64()?;
    let server_pid = r.u32()?;
    let queued = usize::try_from(r.u64()?).map_err(|_| bad("queued overflows"))?;
    let n = r.count(45)?;
    let mut workers = Vec::with_capacity(n);
    for _ in 0..n {
        workers.push(WorkerStatus {
            pid: r.u32()?,
            generation: r.u64()?,
            state: match r.u8()? {
                0 => WorkerState::Draining,
                1 => WorkerState::Serving,
                2 => WorkerState::Lost,
                other => return Err(bad(format!("a worker state {other}"))),
            },
            served: r.u64()?,
            in_flight: usize::try_from(r.u64()?).map_err(|_| bad("in_flight overflows"))?,
            rss_bytes: r.u64()?,
            started: r.u64()?,
        });
    }
    let n = r.count(4)?;
    let events = (0..n).map(|_| r.string()).collect::<Result<_, _>>()?;
    r.end()?;
    Ok(Some(PoolStatus {
        app,
        generation,
        restarts,
        server_pid,
        queued,
        workers,
        events,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_text_too_long_for_a_frame_is_cut_at_a_character() {
        let long = "é".repeat(ERROR_TEXT_LIMIT);
        let e = DispatchError::AppRaised(format!("ValueError: {long}"));
        let back = decode_error(encode_error(&e)).unwrap();
        let DispatchError::AppRaised(text) = back else {
            panic!("another error came back: {back:?}");
        };
        assert!(text.starts_with("ValueError: éé"));
        assert!(text.len() < ERROR_TEXT_LIMIT + 64, "{} bytes", text.len());
        assert!(text.ends_with(&format!("... ({} bytes in all)", 12 + long.len())));
        let short = DispatchError::AppRaised("ValueError: short".into());
        assert_eq!(
            decode_error(encode_error(&short)).unwrap().to_string(),
            short.to_string()
        );
    }

    fn head() -> RequestHead {
        RequestHead {
            method: "POST".into(),
            raw_path: Bytes::from_static(b"/app/a%20b"),
            query: Bytes::from_static(b"x=1"),
            version: HttpVersion::Http2,
            headers: vec![(Bytes::from_static(b"host"), Bytes::from_static(b"example"))],
            tls: Some(TlsInfo {
                server_cert: Some("PEM".into()),
                protocol: "TLSv1.3".into(),
                cipher: "TLS_AES_128_GCM_SHA256".into(),
                version: Some(0x0304),
                cipher_suite: Some(0x1301),
            }),
            secure: true,
            trailers: true,
            early_hints: false,
            client: Some("127.0.0.1:5000".parse().unwrap()),
            server: Some("[::1]:80".parse().unwrap()),
            body: BodyLength::Known(5),
        }
    }

    /// `frame` as a writer's batch puts it on the socket and a reader takes it off.
    fn through_the_wire(frame: &Frame) -> Frame {
        let mut batch = Batch::default();
        let end = batch.push(&Frame::bare(Kind::End, 9));
        assert_eq!(batch.push(frame), end + HEADER_LEN + frame.payload_len());
        let mut wire = BytesMut::new();
        for part in batch.parts() {
            wire.put_slice(part);
        }
        assert_eq!(wire.len(), batch.len());
        assert_eq!(decode(&mut wire).unwrap(), Some(Frame::bare(Kind::End, 9)));
        let got = decode(&mut wire).unwrap().unwrap();
        assert!(wire.is_empty() && got.tail.is_empty());
        got
    }

    #[test]
    fn a_body_piece_shares_the_read_buffer_and_a_small_payload_is_copied_out() {
        let mut buf = BytesMut::new();
        Frame::new(Kind::Head, 1, Bytes::from_static(b"small")).encode(&mut buf);
        Frame::new(Kind::Data, 1, Bytes::from(vec![7; SHARED_PAYLOAD])).encode(&mut buf);
        let read = buf.as_ptr_range();
        let small = decode(&mut buf).unwrap().unwrap();
        let large = decode(&mut buf).unwrap().unwrap();
        assert_eq!(small.payload, Bytes::from_static(b"small"));
        assert_eq!(large.payload, vec![7; SHARED_PAYLOAD]);
        // Held by a slow client, the small one keeps no read buffer alive.
        assert!(!read.contains(&small.payload.as_ptr()));
        assert!(read.contains(&large.payload.as_ptr()));
    }

    #[test]
    fn a_frame_with_a_tail_arrives_as_one_payload() {
        let big = Bytes::from(vec![b'b'; SHARED_PAYLOAD]);
        let pieces = [
            Bytes::from_static(b"small "),
            big.clone(),
            Bytes::from_static(b" end"),
        ];
        let frame = Frame::with_body(Kind::Whole, 3, BytesMut::from(&b"head "[..]), &pieces);
        // The large body is not copied behind the head: the frame and the batch share it.
        assert_eq!(frame.payload, Bytes::from_static(b"head "));
        assert_eq!(frame.tail[1].as_ptr(), big.as_ptr());
        let mut batch = Batch::default();
        batch.push(&frame);
        assert!(batch
            .parts()
            .iter()
            .any(|part| part.as_ptr() == big.as_ptr()));
        let got = through_the_wire(&frame);
        assert_eq!((got.kind, got.stream), (Kind::Whole, 3));
        let want = [&b"head small "[..], &big, b" end"].concat();
        assert_eq!(got.payload, want);
        // A small body is copied behind the head: one piece to write.
        let small = Frame::with_body(Kind::Whole, 3, BytesMut::from(&b"head "[..]), &pieces[..1]);
        assert!(small.tail.is_empty());
        assert_eq!(
            through_the_wire(&small).payload,
            Bytes::from_static(b"head small ")
        );
    }

    #[test]
    fn a_request_survives_the_round_trip() {
        let route = Route {
            app: 3,
            script_name: "/app".into(),
            path_info: b"/a b".to_vec(),
        };
        let body = [Bytes::from_static(b"he"), Bytes::from_static(b"llo")];
        let frame = request_frame(RequestKind::Http, &head(), &route, Some(&body));
        let got = decode_request(through_the_wire(&frame).payload).unwrap();
        assert_eq!(got.kind, RequestKind::Http);
        assert_eq!(got.head.method, "POST");
        assert_eq!(got.head.raw_path, head().raw_path);
        assert_eq!(got.head.headers, head().headers);
        assert_eq!(got.head.tls.as_ref().unwrap().cipher_suite, Some(0x1301));
        assert_eq!(got.head.client, head().client);
        assert_eq!(got.head.server, head().server);
        assert_eq!(got.head.body, BodyLength::Known(5));
        assert!(got.head.trailers && !got.head.early_hints && got.head.secure);
        assert_eq!(got.route.script_name, "/app");
        assert_eq!(got.route.path_info, b"/a b");
        assert_eq!(got.body.unwrap(), Bytes::from_static(b"hello"));
        let large = [Bytes::from(vec![b'x'; 70_000]), Bytes::from_static(b"!")];
        let frame = request_frame(RequestKind::Http, &head(), &route, Some(&large));
        assert_eq!(frame.tail.len(), 2);
        let got = decode_request(through_the_wire(&frame).payload).unwrap();
        assert_eq!(got.body.unwrap(), [&large[0][..], b"!"].concat());
        assert_eq!(got.route.path_info, b"/a b");
    }

    #[test]
    fn every_kind_of_address_survives_the_round_trip() {
        let route = Route {
            app: 0,
            script_name: String::new(),
            path_info: b"/".to_vec(),
        };
        for addr in [None, Some("10.0.0.255:65535"), Some("[fe80::1%7]:8080")] {
            let mut sent = head();
            sent.client = addr.map(|a| a.parse().unwrap());
            sent.server = None;
            let got = decode_request(request_frame(RequestKind::Http, &sent, &route, None).payload);
            let got = got.unwrap().head;
            assert_eq!((got.client, got.server), (sent.client, None), "{addr:?}");
        }
    }

    #[test]
    fn frames_are_taken_whole_and_one_at_a_time() {
        let mut wire = BytesMut::new();
        Frame::new(Kind::Data, 7, Bytes::from_static(b"abc")).encode(&mut wire);
        Frame::bare(Kind::End, 7).encode(&mut wire);
        let mut partial = BytesMut::from(&wire[..5]);
        assert_eq!(decode(&mut partial).unwrap(), None);
        let first = decode(&mut wire).unwrap().unwrap();
        assert_eq!(
            (first.kind, first.stream, &first.payload[..]),
            (Kind::Data, 7, &b"abc"[..])
        );
        assert_eq!(decode(&mut wire).unwrap().unwrap().kind, Kind::End);
        assert!(wire.is_empty());
    }

    #[test]
    fn lies_about_lengths_are_errors_not_allocations() {
        let mut huge = BytesMut::from(&[0xff, 0xff, 0xff, 0x7f, 19, 0, 0, 0, 1][..]);
        assert!(decode(&mut huge).is_err());
        let mut unknown = BytesMut::from(&[0, 0, 0, 0, 99, 0, 0, 0, 1][..]);
        assert!(decode(&mut unknown).is_err());
        // A header count of 2^32-1 in a payload of a few bytes.
        let mut payload = BytesMut::new();
        payload.put_u32_le(u32::MAX);
        assert!(decode_headers(payload.freeze()).is_err());
        assert!(decode_request(Bytes::from_static(b"\x00\x05\x00\x00\x00GE")).is_err());
    }

    #[test]
    fn a_large_message_goes_in_pieces_and_comes_back_whole() {
        let big = WsMessage::Text("é".repeat(WS_PIECE + 1));
        let frames = ws_message_frames(Kind::WsSend, 4, big.clone());
        assert_eq!(frames.len(), 3);
        let mut assembler = WsAssembler::default();
        let mut arrive = |frame: &Frame| assembler.push(through_the_wire(frame).payload).unwrap();
        assert_eq!(arrive(&frames[0]), None);
        assert_eq!(arrive(&frames[1]), None);
        assert_eq!(arrive(&frames[2]), Some(big));
        let small = WsMessage::Binary(Bytes::from_static(b"x"));
        let again = ws_message_frames(Kind::WsIn, 4, small.clone());
        assert_eq!(arrive(&again[0]), Some(small));
    }

    #[test]
    fn errors_keep_their_status() {
        for e in [
            DispatchError::AppRaised("boom".into()),
            DispatchError::BodyTooLarge { limit: 10 },
            DispatchError::WorkerLost("killed".into()),
            DispatchError::Overloaded,
            DispatchError::QueueTimeout("waited".into()),
        ] {
            let back = decode_error(encode_error(&e)).unwrap();
            assert_eq!(back, e);
            assert_eq!(back.status(), e.status());
        }
    }

    /// What `cargo fuzz run wire_decode` does (shared/fuzz), in small, for every test run:
    /// valid frames with bytes flipped, cut short or lengthened must give errors, not panics.
    #[test]
    fn mangled_frames_are_errors_not_panics() {
        let route = Route {
            app: 0,
            script_name: "/m".into(),
            path_info: b"/p".to_vec(),
        };
        let mut valid = BytesMut::new();
        let request = request_frame(RequestKind::Http, &head(), &route, None);
        Frame {
            stream: 1,
            ..request
        }
        .encode(&mut valid);
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut bytes = valid.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            bytes.truncate(HEADER_LEN + (next() as usize) % (bytes.len() - HEADER_LEN + 8));
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(frame)) = decode(&mut buf) {
                let _ = decode_request(frame.payload.clone());
                let _ = decode_head(&mut Reader::new(frame.payload.clone()));
                let _ = decode_error(frame.payload.clone());
                let _ = decode_status(frame.payload.clone());
                let _ = decode_links(frame.payload);
            }
        }
    }

    #[test]
    fn a_status_round_trips() {
        let status = PoolStatus {
            app: "site".into(),
            generation: 3,
            restarts: 1,
            server_pid: 40,
            queued: 5,
            workers: vec![WorkerStatus {
                pid: 42,
                generation: 3,
                state: WorkerState::Serving,
                served: 7,
                in_flight: 2,
                rss_bytes: 1 << 20,
                started: 1_700_000_000,
            }],
            events: vec!["worker 41 was killed by signal 9".into()],
        };
        let decoded = decode_status(encode_status(Some(&status)))
            .unwrap()
            .unwrap();
        assert_eq!(decoded.to_json(), status.to_json());
        assert!(decode_status(encode_status(None)).unwrap().is_none());
        let mut cut = encode_status(Some(&status)).to_vec();
        cut.pop();
        assert!(decode_status(Bytes::from(cut)).is_err());
    }

    #[test]
    fn a_head_the_core_would_refuse_is_refused() {
        let mut out = BytesMut::new();
        out.put_u16_le(200);
        put_bytes(&mut out, b"OK");
        put_headers(
            &mut out,
            &[(
                Bytes::from_static(b"x-a"),
                Bytes::from_static(b"1\r\nx-b: 2"),
            )],
        );
        assert!(decode_head(&mut Reader::new(out.freeze())).is_err());
    }
}
