//! permessage-deflate (RFC 7692): negotiating it from `Sec-WebSocket-Extensions`
//! (sections 5 and 7.1), and compressing and decompressing whole messages (section 7.2).
//!
//! Window sizes: the server compresses with at most `server_max_window_bits`. zlib cannot
//! compress raw deflate with an 8-bit window, so when 8 is agreed Portico compresses with 9
//! bits. That is safe: zlib (and zlib-ng and zlib-rs, which follow it) never emits a match
//! farther back than the window size minus 262 bytes (`MAX_DIST`), which is 250 for a
//! 9-bit window, so the output never refers past the 256 bytes a client with an 8-bit
//! window keeps. zlib itself treats a zlib-wrapped window of 8 bits the same way. The client
//! side is never limited: Portico decompresses with a 15-bit window, which reads a stream
//! made with any smaller one, so `client_max_window_bits` is accepted and never answered.

use super::{close_code, ProtocolError};
use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The name of the extension (RFC 7692 section 6).
const EXTENSION: &str = "permessage-deflate";

/// What a sync flush ends with, stripped by the sender and appended by the receiver
/// (RFC 7692 sections 7.2.1 and 7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// The server's permessage-deflate policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Whether to accept permessage-deflate at all; when off nothing is negotiated.
    pub enabled: bool,
    /// The zlib compression level, 0 (store) to 9; 1 by default: a server's CPU is the scarce
    /// resource and on text the ratio is close to level 6.
    pub level: u32,
    /// Always ask for `server_no_context_takeover` (RFC 7692 section 7.1.1.1): the compressor
    /// starts afresh for each message (worse ratio, no memory of earlier messages).
    pub server_no_context_takeover: bool,
    /// Always ask the client for `client_no_context_takeover` (section 7.1.1.2).
    pub client_no_context_takeover: bool,
    /// The largest LZ77 window the server compresses with, 8 to 15 (section 7.1.2.1); 15 by
    /// default. Below 15 it is announced in the response.
    pub server_max_window_bits: u8,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            enabled: true,
            level: 1,
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
        }
    }
}

/// The agreed permessage-deflate parameters, exactly as the response announces them
/// (RFC 7692 section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server resets its compressor after each message (section 7.1.1.1).
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after each message, so the server resets its
    /// decompressor too (section 7.1.1.2).
    pub client_no_context_takeover: bool,
    /// `server_max_window_bits` in the response, when it is there (section 7.1.2.1);
    /// `None` means 15.
    pub server_max_window_bits: Option<u8>,
}

impl DeflateParams {
    /// The `Sec-WebSocket-Extensions` value that accepts the offer (RFC 7692 section 5).
    pub fn response_header(&self) -> String {
        let mut value = String::from(EXTENSION);
        if self.server_no_context_takeover {
            value.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            value.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = self.server_max_window_bits {
            value.push_str("; server_max_window_bits=");
            value.push_str(&bits.to_string());
        }
        value
    }

    /// The window zlib compresses with: the agreed one, but at least 9 (see the module docs).
    fn compress_window_bits(&self) -> u8 {
        self.server_max_window_bits.unwrap_or(15).clamp(9, 15)
    }
}

/// Picks the first acceptable permessage-deflate offer among all `Sec-WebSocket-Extensions`
/// headers of a handshake (RFC 7692 section 5.1), in order. An offer with an unknown
/// parameter, a repeated parameter or an invalid value is declined and the next one tried; a
/// header that does not parse (RFC 6455 section 9.1) offers nothing. `None` when compression
/// is off or nothing is acceptable.
pub fn negotiate(headers: &[(Bytes, Bytes)], config: &DeflateConfig) -> Option<DeflateParams> {
    if !config.enabled {
        return None;
    }
    headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"sec-websocket-extensions"))
        .filter_map(|(_, value)| parse_extensions(value))
        .flatten()
        .filter(|offer| offer.name.eq_ignore_ascii_case(EXTENSION))
        .find_map(|offer| accept_offer(&offer, config))
}

/// One element of an extension list: a name and its parameters, values unquoted.
#[derive(Debug, PartialEq, Eq)]
struct Offer {
    name: String,
    params: Vec<(String, Option<String>)>,
}

/// Parses an extension list (RFC 6455 section 9.1): `name *(";" param ["=" value])`
/// elements separated by commas, values tokens or quoted strings. `None` if malformed.
fn parse_extensions(value: &[u8]) -> Option<Vec<Offer>> {
    let mut p = Cursor { s: value, at: 0 };
    let mut offers = Vec::new();
    loop {
        p.skip_ows();
        match p.peek() {
            None => return Some(offers),
            // Empty list elements are allowed (RFC 9110 section 5.6.1).
            Some(b',') => {
                p.at += 1;
                continue;
            }
            _ => {}
        }
        let name = p.token()?;
        let mut params = Vec::new();
        loop {
            p.skip_ows();
            match p.peek() {
                None => break,
                Some(b',') => {
                    p.at += 1;
                    break;
                }
                Some(b';') => {
                    p.at += 1;
                    p.skip_ows();
                    let param = p.token()?;
                    p.skip_ows();
                    let mut value = None;
                    if p.peek() == Some(b'=') {
                        p.at += 1;
                        p.skip_ows();
                        value = Some(if p.peek() == Some(b'"') {
                            p.quoted()?
                        } else {
                            p.token()?
                        });
                    }
                    params.push((param, value));
                }
                Some(_) => return None,
            }
        }
        offers.push(Offer { name, params });
    }
}

struct Cursor<'a> {
    s: &'a [u8],
    at: usize,
}

/// `tchar` (RFC 9110 section 5.6.2).
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    fn token(&mut self) -> Option<String> {
        let start = self.at;
        while self.peek().is_some_and(is_tchar) {
            self.at += 1;
        }
        let token = &self.s[start..self.at];
        (!token.is_empty()).then(|| String::from_utf8_lossy(token).into_owned())
    }

    /// A quoted string with its escapes undone (RFC 9110 section 5.6.4).
    fn quoted(&mut self) -> Option<String> {
        self.at += 1;
        let mut out = Vec::new();
        loop {
            let b = self.peek()?;
            self.at += 1;
            match b {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    out.push(self.peek()?);
                    self.at += 1;
                }
                b'\t' | b' '..=b'~' | 0x80.. => out.push(b),
                _ => return None,
            }
        }
    }
}

/// A window size value: a decimal 8 to 15 without leading zeros (RFC 7692 section 7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// Accepts one permessage-deflate offer, or declines it (RFC 7692 section 7.1).
fn accept_offer(offer: &Offer, config: &DeflateConfig) -> Option<DeflateParams> {
    let mut server_no_context_takeover = false;
    let mut client_no_context_takeover = false;
    let mut server_max_window_bits = None;
    let mut client_max_window_bits = None;
    for (name, value) in &offer.params {
        let name = name.to_ascii_lowercase();
        match name.as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" => {
                let seen = if name.starts_with("server") {
                    &mut server_no_context_takeover
                } else {
                    &mut client_no_context_takeover
                };
                if *seen || value.is_some() {
                    return None;
                }
                *seen = true;
            }
            "server_max_window_bits" => {
                if server_max_window_bits.is_some() {
                    return None;
                }
                server_max_window_bits = Some(window_bits(value.as_deref()?)?);
            }
            "client_max_window_bits" => {
                if client_max_window_bits.is_some() {
                    return None;
                }
                // The value, when given, only says how small the client's window will be;
                // the 15-bit decompressor reads any.
                client_max_window_bits = Some(match value {
                    Some(value) => Some(window_bits(value)?),
                    None => None,
                });
            }
            _ => return None,
        }
    }
    let ours = config.server_max_window_bits.clamp(8, 15);
    let server_max_window_bits = match server_max_window_bits {
        // The response must carry a value no larger than the offer's (section 7.1.2.1).
        Some(offered) => Some(ours.min(offered)),
        None => (ours < 15).then_some(ours),
    };
    Some(DeflateParams {
        server_no_context_takeover: server_no_context_takeover || config.server_no_context_takeover,
        // When the client offers it, it will not take over its context anyway (section
        // 7.1.1.2); saying so lets the decompressor start afresh too.
        client_no_context_takeover: client_no_context_takeover || config.client_no_context_takeover,
        server_max_window_bits,
    })
}

/// The server's compressor: one zlib stream, continued from message to message unless
/// `server_no_context_takeover` was agreed. Made on the first compressed message.
pub(crate) struct Deflater {
    zlib: Compress,
    reset_each: bool,
}

impl Deflater {
    pub(crate) fn new(params: &DeflateParams, level: u32) -> Deflater {
        let level = Compression::new(level.min(9));
        Deflater {
            zlib: Compress::new_with_window_bits(level, false, params.compress_window_bits()),
            reset_each: params.server_no_context_takeover,
        }
    }

    /// Compresses a whole message into `out` (cleared first), flushed to a byte boundary
    /// with the trailing `00 00 ff ff` removed (RFC 7692 section 7.2.1). `false` if zlib
    /// failed: the message then goes out uncompressed, which is allowed (section 6).
    pub(crate) fn compress(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> bool {
        out.clear();
        out.reserve(input.len() / 2 + 64);
        loop {
            let before = self.zlib.total_in();
            if self
                .zlib
                .compress_vec(input, out, FlushCompress::Sync)
                .is_err()
            {
                self.zlib.reset();
                return false;
            }
            input = &input[(self.zlib.total_in() - before) as usize..];
            // Done when all input is in and zlib had room to spare for the flush.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(256));
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        if self.reset_each {
            self.zlib.reset();
        }
        true
    }
}

/// The server's decompressor: one zlib stream, continued from message to message unless
/// `client_no_context_takeover` was agreed. Made on the first compressed message.
pub(crate) struct Inflater {
    zlib: Decompress,
    reset_each: bool,
    /// The client ended its deflate stream (a block with BFINAL set): the rest of the
    /// message is ignored and the next one starts a new stream (section 7.2.3.4 and 7.2.2).
    ended: bool,
}

fn too_big() -> ProtocolError {
    ProtocolError::new(close_code::MESSAGE_TOO_BIG, "message too big")
}

impl Inflater {
    pub(crate) fn new(params: &DeflateParams) -> Inflater {
        Inflater {
            zlib: Decompress::new(false),
            reset_each: params.client_no_context_takeover,
            ended: false,
        }
    }

    /// Decompresses the next piece of a message onto `out`, failing with 1009 as soon as
    /// `out` would pass `limit` bytes (so a small bomb never becomes a big allocation) and
    /// with 1007 on data that is not deflate.
    pub(crate) fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        while !self.ended {
            if out.len() == out.capacity() {
                // Room for at most one byte past the limit, which is how we notice it.
                let room = (limit + 1).saturating_sub(out.len());
                let grow = out.len().max(input.len() * 2).max(4096).min(room);
                if grow == 0 {
                    return Err(too_big());
                }
                out.reserve_exact(grow);
            }
            let (in_before, out_before) = (self.zlib.total_in(), self.zlib.total_out());
            let status = self
                .zlib
                .decompress_vec(input, out, FlushDecompress::Sync)
                .map_err(|_| {
                    ProtocolError::new(close_code::INVALID_PAYLOAD, "invalid compressed data")
                })?;
            let used = (self.zlib.total_in() - in_before) as usize;
            let made = self.zlib.total_out() - out_before;
            input = &input[used..];
            if out.len() > limit {
                return Err(too_big());
            }
            if status == Status::StreamEnd {
                self.ended = true;
            } else if out.len() < out.capacity() {
                // zlib had room left, so it gave all it could from the input it took.
                if input.is_empty() {
                    break;
                }
                if used == 0 && made == 0 {
                    return Err(ProtocolError::new(
                        close_code::INVALID_PAYLOAD,
                        "invalid compressed data",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Ends a message: appends the flush tail (RFC 7692 section 7.2.2) and starts afresh
    /// when context takeover is off or the client ended its stream.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>, limit: usize) -> Result<(), ProtocolError> {
        self.feed(&TAIL, out, limit)?;
        if self.reset_each || self.ended {
            self.zlib.reset(false);
            self.ended = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> Vec<(Bytes, Bytes)> {
        values
            .iter()
            .map(|v| {
                (
                    Bytes::from_static(b"Sec-WebSocket-Extensions"),
                    Bytes::copy_from_slice(v.as_bytes()),
                )
            })
            .collect()
    }

    fn answer(values: &[&str]) -> Option<String> {
        negotiate(&headers(values), &DeflateConfig::default()).map(|p| p.response_header())
    }

    #[test]
    fn parses_lists_params_and_quotes() {
        let offers =
            parse_extensions(b"foo, permessage-deflate ; a=1;b = \"x\\\"y\" , ,bar;c").unwrap();
        assert_eq!(offers.len(), 3);
        assert_eq!(offers[0].name, "foo");
        assert_eq!(
            offers[1].params,
            vec![
                ("a".to_string(), Some("1".to_string())),
                ("b".to_string(), Some("x\"y".to_string()))
            ]
        );
        assert_eq!(offers[2].params, vec![("c".to_string(), None)]);
        for bad in ["a;", "a;=1", "a b", "a;b=\"x", "a;b=", ";a", "a;b=c d"] {
            assert_eq!(parse_extensions(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn negotiates_the_first_acceptable_offer() {
        assert_eq!(answer(&[]), None);
        assert_eq!(answer(&["x-webkit-deflate-frame"]), None);
        assert_eq!(
            answer(&["permessage-deflate"]).unwrap(),
            "permessage-deflate"
        );
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits"]).unwrap(),
            "permessage-deflate"
        );
        // The browser offer.
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits=15"]).unwrap(),
            "permessage-deflate"
        );
        assert_eq!(
            answer(&["permessage-deflate; server_no_context_takeover; client_no_context_takeover"])
                .unwrap(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=\"10\""]).unwrap(),
            "permessage-deflate; server_max_window_bits=10"
        );
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=8"]).unwrap(),
            "permessage-deflate; server_max_window_bits=8"
        );
        // Invalid offers are declined and the next one is tried, across headers too.
        for bad in [
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=08",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=x",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; unknown",
        ] {
            assert_eq!(answer(&[bad]), None, "{bad}");
            let two = format!("{bad}, permessage-deflate; server_max_window_bits=12");
            assert_eq!(
                answer(&[&two]).unwrap(),
                "permessage-deflate; server_max_window_bits=12",
                "{two}"
            );
            assert_eq!(
                answer(&[bad, "permessage-deflate; client_no_context_takeover"]).unwrap(),
                "permessage-deflate; client_no_context_takeover",
            );
        }
        // A header that does not parse offers nothing; the next header still counts.
        assert_eq!(answer(&["permessage-deflate; a b"]), None);
        assert_eq!(
            answer(&["permessage-deflate; a b", "permessage-deflate"]).unwrap(),
            "permessage-deflate"
        );
        // Autobahn 13.7: three offers, the first acceptable wins.
        assert_eq!(
            answer(&[
                "permessage-deflate; client_no_context_takeover; client_max_window_bits; \
                      server_no_context_takeover; server_max_window_bits=8, \
                      permessage-deflate; server_no_context_takeover, permessage-deflate"
            ])
            .unwrap(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=8"
        );
    }

    #[test]
    fn config_shapes_the_answer() {
        let off = DeflateConfig {
            enabled: false,
            ..DeflateConfig::default()
        };
        assert_eq!(negotiate(&headers(&["permessage-deflate"]), &off), None);
        let small = DeflateConfig {
            server_max_window_bits: 10,
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            ..DeflateConfig::default()
        };
        let params = negotiate(&headers(&["permessage-deflate"]), &small).unwrap();
        assert_eq!(
            params.response_header(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10"
        );
        let params = negotiate(
            &headers(&["permessage-deflate; server_max_window_bits=12"]),
            &small,
        )
        .unwrap();
        assert_eq!(params.server_max_window_bits, Some(10));
        let params = negotiate(
            &headers(&["permessage-deflate; server_max_window_bits=9"]),
            &small,
        )
        .unwrap();
        assert_eq!(params.server_max_window_bits, Some(9));
    }
}
