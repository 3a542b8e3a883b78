//! The frame layout of RFC 6455 section 5.2: reading a client frame's header, unmasking
//! (section 5.3), and writing a server frame's header.

use super::{close_code, ProtocolError};
use bytes::{BufMut, BytesMut};

/// A frame's opcode (RFC 6455 section 5.2; 3-7 and 11-15 are reserved and refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// Control frames have the high bit of the opcode set (section 5.5).
    pub(crate) fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// The largest payload of a control frame (section 5.5).
pub(crate) const MAX_CONTROL_PAYLOAD: usize = 125;

/// A client frame's header, checked for everything that needs no connection state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameHead {
    pub(crate) fin: bool,
    pub(crate) rsv1: bool,
    pub(crate) opcode: OpCode,
    pub(crate) mask: [u8; 4],
    pub(crate) len: u64,
}

fn protocol(reason: &'static str) -> ProtocolError {
    ProtocolError::new(close_code::PROTOCOL_ERROR, reason)
}

/// Reads a client frame header from the front of `buf`: `Ok(None)` when more bytes are
/// needed, otherwise the header and its length in bytes. Refuses RSV2/RSV3 (no extension
/// defines them here), reserved opcodes, fragmented or long control frames (section 5.5),
/// unmasked frames (section 5.1), and lengths not in their minimal form or with the most
/// significant bit set (section 5.2). Each check runs as soon as its bytes are in.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<(FrameHead, usize)>, ProtocolError> {
    let Some(&b0) = buf.first() else {
        return Ok(None);
    };
    if b0 & 0x30 != 0 {
        return Err(protocol("reserved bit RSV2 or RSV3 set"));
    }
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or_else(|| protocol("reserved opcode"))?;
    let fin = b0 & 0x80 != 0;
    if opcode.is_control() && !fin {
        return Err(protocol("fragmented control frame"));
    }
    let Some(&b1) = buf.get(1) else {
        return Ok(None);
    };
    let short_len = b1 & 0x7F;
    if opcode.is_control() && usize::from(short_len) > MAX_CONTROL_PAYLOAD {
        return Err(protocol("control frame payload longer than 125 bytes"));
    }
    if b1 & 0x80 == 0 {
        return Err(protocol("client frame not masked"));
    }
    let (len, at) = match short_len {
        126 => {
            let Some(bytes) = buf.get(2..4) else {
                return Ok(None);
            };
            let len = u16::from_be_bytes([bytes[0], bytes[1]]);
            if len < 126 {
                return Err(protocol("payload length not in its minimal form"));
            }
            (u64::from(len), 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut be = [0; 8];
            be.copy_from_slice(bytes);
            let len = u64::from_be_bytes(be);
            if len >> 63 != 0 {
                return Err(protocol("payload length with its most significant bit set"));
            }
            if len <= 0xFFFF {
                return Err(protocol("payload length not in its minimal form"));
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    let Some(mask) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    let head = FrameHead {
        fin,
        rsv1: b0 & 0x40 != 0,
        opcode,
        mask: [mask[0], mask[1], mask[2], mask[3]],
        len,
    };
    Ok(Some((head, at + 4)))
}

/// Unmasks (or masks: it is an XOR) `data`, which starts `offset` bytes into the payload
/// (section 5.3), eight bytes at a time.
pub(crate) fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut m = mask;
    m.rotate_left(offset % 4);
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word).to_ne_bytes());
    }
    // Eight is a multiple of four, so the tail starts in phase with `m`.
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= m[i % 4];
    }
}

/// Writes the header of an unmasked server frame (section 5.1) with a `len`-byte payload,
/// the length in its minimal form.
pub(crate) fn write_head(out: &mut BytesMut, rsv1: bool, opcode: OpCode, len: usize) {
    let b0 = 0x80 | (u8::from(rsv1) << 6) | opcode as u8;
    if len < 126 {
        out.reserve(2 + len);
        out.put_slice(&[b0, len as u8]);
    } else if let Ok(len16) = u16::try_from(len) {
        out.reserve(4 + len);
        out.put_slice(&[b0, 126]);
        out.put_u16(len16);
    } else {
        out.reserve(10 + len);
        out.put_slice(&[b0, 127]);
        out.put_u64(len as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_matches_bytewise_xor_at_every_offset() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let data: Vec<u8> = (0..=255u8).cycle().take(300).collect();
        for offset in 0..9 {
            for len in [0, 1, 3, 7, 8, 9, 31, 64, 299] {
                let mut mine = data[..len].to_vec();
                apply_mask(&mut mine, mask, offset);
                let want: Vec<u8> = data[..len]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ mask[(i + offset) % 4])
                    .collect();
                assert_eq!(mine, want, "offset {offset} len {len}");
            }
        }
    }

    #[test]
    fn head_lengths_are_minimal() {
        for (len, head_len) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut out = BytesMut::new();
            write_head(&mut out, false, OpCode::Binary, len);
            assert_eq!(out.len(), head_len, "len {len}");
            assert_eq!(out[0], 0x82);
        }
        let mut out = BytesMut::new();
        write_head(&mut out, true, OpCode::Text, 300);
        assert_eq!(&out[..], &[0xC1, 126, 0x01, 0x2C]);
    }
}
