//! One connection's codec, server role: client frames in, server frames out, and the
//! closing handshake (RFC 6455 sections 5, 7 and 8; RFC 7692 section 6).

use super::deflate::{DeflateParams, Deflater, Inflater};
use super::frame::{self, FrameHead, OpCode, MAX_CONTROL_PAYLOAD};
use super::utf8::Utf8Validator;
use super::{close_code, CloseState, Config, Incoming, ProtocolError};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The compression buffer is kept between messages up to this size.
const SCRATCH_KEEP: usize = 256 << 10;

/// A frame whose header is consumed and whose payload is (partly) in the buffer.
struct Partial {
    head: FrameHead,
    len: usize,
    /// How much of the payload at the front of the buffer is already unmasked.
    done: usize,
    /// Uncompressed text: validate UTF-8 as the payload arrives.
    check_utf8: bool,
}

/// A data message in progress (RFC 6455 section 5.4).
struct Message {
    text: bool,
    /// RSV1 on its first frame (RFC 7692 section 6).
    compressed: bool,
    /// Payload bytes received so far (compressed, when it is).
    received: usize,
    /// The message so far: earlier fragments, or the decompressed data.
    data: Vec<u8>,
}

/// A WebSocket connection's protocol state, server side, with no I/O: bytes from the client
/// in through [`Codec::decode`], frames for the client out through the `encode_*` calls.
///
/// Decoding checks everything RFC 6455 asks of a client's frames (masking, reserved bits
/// and opcodes, control frame rules, fragmentation order, close codes, UTF-8 of text and
/// close reasons, which fails as soon as the bad bytes arrive) and the message size limit.
/// Server frames go out unmasked (section 5.1), one frame per message, compressed when
/// permessage-deflate was negotiated.
pub struct Codec {
    max_message_size: usize,
    level: u32,
    deflate: Option<DeflateParams>,
    deflater: Option<Deflater>,
    inflater: Option<Inflater>,
    frame: Option<Partial>,
    message: Option<Message>,
    utf8: Utf8Validator,
    /// Compressed output, kept between messages.
    scratch: Vec<u8>,
    close_sent: bool,
    close_received: bool,
    failed: bool,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("state", &self.state())
            .field("deflate", &self.deflate)
            .field("max_message_size", &self.max_message_size)
            .finish_non_exhaustive()
    }
}

fn protocol(reason: &'static str) -> ProtocolError {
    ProtocolError::new(close_code::PROTOCOL_ERROR, reason)
}

fn too_big() -> ProtocolError {
    ProtocolError::new(close_code::MESSAGE_TOO_BIG, "message too big")
}

fn invalid_utf8() -> ProtocolError {
    ProtocolError::new(close_code::INVALID_PAYLOAD, "text message not valid UTF-8")
}

impl Codec {
    /// A codec for a connection whose handshake negotiated `deflate` (see
    /// [`super::Handshake::deflate`]), with the limits and compression level of `config`.
    pub fn new(config: &Config, deflate: Option<DeflateParams>) -> Codec {
        Codec {
            max_message_size: config.max_message_size,
            level: config.deflate.level,
            deflate,
            deflater: None,
            inflater: None,
            frame: None,
            message: None,
            utf8: Utf8Validator::default(),
            scratch: Vec::new(),
            close_sent: false,
            close_received: false,
            failed: false,
        }
    }

    /// The negotiated permessage-deflate parameters, if any.
    pub fn deflate(&self) -> Option<&DeflateParams> {
        self.deflate.as_ref()
    }

    /// Where the closing handshake stands.
    pub fn state(&self) -> CloseState {
        match (self.close_sent, self.close_received, self.failed) {
            (true, true, _) | (true, _, true) => CloseState::Closed,
            (_, _, true) => CloseState::Failed,
            (_, true, _) => CloseState::CloseReceived,
            (true, _, _) => CloseState::CloseSent,
            _ => CloseState::Open,
        }
    }

    /// Takes whole frames off the front of `buf` (bytes read from the client, new ones
    /// appended at the end; the front must be left as the codec left it) and returns the
    /// next message or control frame, or `Ok(None)` when more bytes are needed. Call it
    /// until `Ok(None)`: one read may hold many frames.
    ///
    /// A payload is unmasked in place as it arrives; an unfragmented message is handed out
    /// without copying when binary. Control frames may come between the fragments of a
    /// message (section 5.4). Once a close frame was sent, data and pings are discarded
    /// until the peer's close frame; once one was received, or after an error, everything
    /// is discarded.
    ///
    /// # Errors
    /// The connection must fail (section 7.1.7) with the error's code: 1002 for a protocol
    /// violation, 1007 for invalid UTF-8 or compressed data, 1009 for a message over
    /// [`Config::max_message_size`].
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, ProtocolError> {
        loop {
            if self.failed || self.close_received {
                buf.clear();
                return Ok(None);
            }
            let mut partial = match self.frame.take() {
                Some(partial) => partial,
                None => match frame::parse_head(buf) {
                    Ok(None) => return Ok(None),
                    Ok(Some((head, head_len))) => {
                        let partial = self.start_frame(head).map_err(|e| self.fail(e))?;
                        buf.advance(head_len);
                        partial
                    }
                    Err(e) => return Err(self.fail(e)),
                },
            };
            let available = buf.len().min(partial.len);
            if available > partial.done {
                let fresh = &mut buf[partial.done..available];
                frame::apply_mask(fresh, partial.head.mask, partial.done);
                // A final frame that is all here is checked with the whole message below.
                let whole = partial.head.fin && partial.done == 0 && available == partial.len;
                if partial.check_utf8 && !whole && !self.utf8.feed(fresh) {
                    return Err(self.fail(invalid_utf8()));
                }
                partial.done = available;
            }
            if partial.done < partial.len {
                self.frame = Some(partial);
                return Ok(None);
            }
            let payload = buf.split_to(partial.len);
            match self.finish_frame(partial.head, payload) {
                Err(e) => return Err(self.fail(e)),
                // Waiting for the peer's close: only that counts.
                Ok(Some(event)) if !self.close_sent || matches!(event, Incoming::Close { .. }) => {
                    return Ok(Some(event))
                }
                Ok(_) => {}
            }
        }
    }

    fn fail(&mut self, e: ProtocolError) -> ProtocolError {
        self.failed = true;
        self.frame = None;
        self.message = None;
        e
    }

    /// Checks a header against the connection's state (RFC 6455 section 5.4, RFC 7692
    /// section 6.1) and the size limit, and starts a message on a first data frame.
    fn start_frame(&mut self, head: FrameHead) -> Result<Partial, ProtocolError> {
        let max = self.max_message_size as u64;
        if head.rsv1
            && (self.deflate.is_none() || !matches!(head.opcode, OpCode::Text | OpCode::Binary))
        {
            return Err(protocol("reserved bit RSV1 set"));
        }
        match head.opcode {
            OpCode::Text | OpCode::Binary => {
                if self.message.is_some() {
                    return Err(protocol("new data frame inside a fragmented message"));
                }
                if head.len > max {
                    return Err(too_big());
                }
                self.message = Some(Message {
                    text: head.opcode == OpCode::Text,
                    compressed: head.rsv1,
                    received: 0,
                    data: Vec::new(),
                });
                self.utf8.reset();
            }
            OpCode::Continuation => {
                let Some(message) = &self.message else {
                    return Err(protocol("continuation frame without a message to continue"));
                };
                if message.received as u64 + head.len > max {
                    return Err(too_big());
                }
            }
            OpCode::Close | OpCode::Ping | OpCode::Pong => {}
        }
        let check_utf8 = !head.opcode.is_control()
            && self
                .message
                .as_ref()
                .is_some_and(|message| message.text && !message.compressed);
        Ok(Partial {
            head,
            len: head.len as usize,
            done: 0,
            check_utf8,
        })
    }

    fn finish_frame(
        &mut self,
        head: FrameHead,
        payload: BytesMut,
    ) -> Result<Option<Incoming>, ProtocolError> {
        match head.opcode {
            OpCode::Ping => Ok(Some(Incoming::Ping(payload.freeze()))),
            OpCode::Pong => Ok(Some(Incoming::Pong(payload.freeze()))),
            OpCode::Close => {
                let (code, reason) = parse_close(&payload)?;
                self.close_received = true;
                Ok(Some(Incoming::Close { code, reason }))
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                self.data_frame(head.fin, payload)
            }
        }
    }

    fn data_frame(
        &mut self,
        fin: bool,
        payload: BytesMut,
    ) -> Result<Option<Incoming>, ProtocolError> {
        let limit = self.max_message_size;
        let message = self
            .message
            .as_mut()
            .expect("a data frame belongs to a message");
        message.received += payload.len();
        if message.compressed {
            let params = self.deflate.as_ref().expect("RSV1 only with deflate");
            let inflater = self.inflater.get_or_insert_with(|| Inflater::new(params));
            let before = message.data.len();
            inflater.feed(&payload, &mut message.data, limit)?;
            if message.text && !fin && !self.utf8.feed(&message.data[before..]) {
                return Err(invalid_utf8());
            }
            // An empty payload encodes nothing, not even an empty message (RFC 7692
            // section 7.2.3.6 says `00`), but take it as one rather than feed zlib the tail.
            if fin && message.received > 0 {
                inflater.finish(&mut message.data, limit)?;
            }
        } else if fin && message.data.is_empty() {
            // The usual case: one frame, handed out as it lies in the read buffer.
            let text = message.text;
            self.message = None;
            return if text {
                String::from_utf8(payload.to_vec())
                    .map(|text| Some(Incoming::Text(text)))
                    .map_err(|_| invalid_utf8())
            } else {
                Ok(Some(Incoming::Binary(payload.freeze())))
            };
        } else {
            message.data.extend_from_slice(&payload);
        }
        if !fin {
            return Ok(None);
        }
        let message = self.message.take().expect("checked above");
        if message.text {
            String::from_utf8(message.data)
                .map(|text| Some(Incoming::Text(text)))
                .map_err(|_| invalid_utf8())
        } else {
            Ok(Some(Incoming::Binary(Bytes::from(message.data))))
        }
    }

    fn can_send(&self) -> bool {
        !self.close_sent && !self.failed
    }

    /// Writes a text message as one frame (RFC 6455 section 5.6), compressed when
    /// permessage-deflate was negotiated. `false`, writing nothing, once a close frame was
    /// sent or the connection failed.
    pub fn encode_text(&mut self, text: &str, out: &mut BytesMut) -> bool {
        self.encode_data(OpCode::Text, text.as_bytes(), out)
    }

    /// Writes a binary message as one frame, like [`Codec::encode_text`].
    pub fn encode_binary(&mut self, data: &[u8], out: &mut BytesMut) -> bool {
        self.encode_data(OpCode::Binary, data, out)
    }

    fn encode_data(&mut self, opcode: OpCode, data: &[u8], out: &mut BytesMut) -> bool {
        if !self.can_send() {
            return false;
        }
        // An empty message goes out uncompressed: a zlib sync flush with no new input may
        // write nothing at all, and uncompressed is always allowed (RFC 7692 section 6).
        if let (Some(params), false) = (&self.deflate, data.is_empty()) {
            let level = self.level;
            let deflater = self
                .deflater
                .get_or_insert_with(|| Deflater::new(params, level));
            if deflater.compress(data, &mut self.scratch) {
                frame::write_head(out, true, opcode, self.scratch.len());
                out.extend_from_slice(&self.scratch);
                if self.scratch.capacity() > SCRATCH_KEEP {
                    self.scratch = Vec::new();
                }
                return true;
            }
        }
        frame::write_head(out, false, opcode, data.len());
        out.extend_from_slice(data);
        true
    }

    /// Writes a ping (RFC 6455 section 5.5.2); the payload is cut to 125 bytes. `false`
    /// once a close frame was sent or the connection failed.
    pub fn encode_ping(&mut self, payload: &[u8], out: &mut BytesMut) -> bool {
        self.encode_control(OpCode::Ping, payload, out)
    }

    /// Writes a pong (RFC 6455 section 5.5.3), the answer to [`Incoming::Ping`] with its
    /// payload; like [`Codec::encode_ping`].
    pub fn encode_pong(&mut self, payload: &[u8], out: &mut BytesMut) -> bool {
        self.encode_control(OpCode::Pong, payload, out)
    }

    fn encode_control(&mut self, opcode: OpCode, payload: &[u8], out: &mut BytesMut) -> bool {
        if !self.can_send() {
            return false;
        }
        let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
        frame::write_head(out, false, opcode, payload.len());
        out.extend_from_slice(payload);
        true
    }

    /// Writes a close frame (RFC 6455 section 5.5.1) with `code` and `reason`, cut to 123
    /// bytes at a character boundary. A code that must not be sent (see
    /// [`close_code::is_valid`]) becomes 1000. Only the first close frame is written:
    /// `false` otherwise. After an error from [`Codec::decode`], this is how its close
    /// frame goes out.
    pub fn encode_close(&mut self, code: u16, reason: &str, out: &mut BytesMut) -> bool {
        if self.close_sent {
            return false;
        }
        self.close_sent = true;
        let code = if close_code::is_valid(code) {
            code
        } else {
            close_code::NORMAL
        };
        let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        frame::write_head(out, false, OpCode::Close, 2 + end);
        out.put_u16(code);
        out.extend_from_slice(&reason.as_bytes()[..end]);
        true
    }

    /// Writes the answer to the peer's close frame: its code echoed (RFC 6455 section
    /// 5.5.1), or an empty close frame when it had none (1005 is never sent). `false` if a
    /// close frame was already sent.
    pub fn encode_close_reply(&mut self, code: Option<u16>, out: &mut BytesMut) -> bool {
        match code {
            Some(code) => self.encode_close(code, "", out),
            None if self.close_sent => false,
            None => {
                self.close_sent = true;
                frame::write_head(out, false, OpCode::Close, 0);
                true
            }
        }
    }
}

/// A close frame's payload: nothing, or a valid code and a UTF-8 reason (RFC 6455
/// sections 5.5.1 and 7.4).
fn parse_close(payload: &[u8]) -> Result<(Option<u16>, String), ProtocolError> {
    match payload {
        [] => Ok((None, String::new())),
        [_] => Err(protocol("close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code::is_valid(code) {
                return Err(protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| {
                ProtocolError::new(close_code::INVALID_PAYLOAD, "close reason not valid UTF-8")
            })?;
            Ok((Some(code), reason.to_string()))
        }
    }
}
