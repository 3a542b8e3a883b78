//! Codec tests: client frames built by hand, fed whole and in every kind of piece.

use super::*;
use bytes::BytesMut;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A client frame: `b0` is FIN/RSV/opcode as on the wire, the payload gets masked.
fn frame_with(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![b0];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    frame_with(b0, payload, MASK)
}

fn codec() -> Codec {
    Codec::new(&Config::default(), None)
}

fn deflate_codec(params: DeflateParams) -> Codec {
    Codec::new(&Config::default(), Some(params))
}

const DEFLATE: DeflateParams = DeflateParams {
    server_no_context_takeover: false,
    client_no_context_takeover: false,
    server_max_window_bits: None,
};

/// Decodes everything in `bytes` at once.
fn decode_all(codec: &mut Codec, bytes: &[u8]) -> Result<Vec<Incoming>, ProtocolError> {
    let mut buf = BytesMut::from(bytes);
    let mut events = Vec::new();
    while let Some(event) = codec.decode(&mut buf)? {
        events.push(event);
    }
    Ok(events)
}

/// Decodes `bytes` fed in the given pieces, as reads would bring them.
fn decode_pieces(codec: &mut Codec, pieces: &[&[u8]]) -> Result<Vec<Incoming>, ProtocolError> {
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        while let Some(event) = codec.decode(&mut buf)? {
            events.push(event);
        }
    }
    Ok(events)
}

fn error_of(bytes: &[u8]) -> u16 {
    error_with(codec(), bytes)
}

fn error_with(mut codec: Codec, bytes: &[u8]) -> u16 {
    let code = decode_all(&mut codec, bytes).expect_err("should fail").code;
    assert_eq!(codec.state(), CloseState::Failed);
    code
}

fn text(s: &str) -> Incoming {
    Incoming::Text(s.to_string())
}

fn binary(b: &[u8]) -> Incoming {
    Incoming::Binary(Bytes::copy_from_slice(b))
}

/// Server frames as (first byte, payload), checking they are unmasked and minimal.
fn server_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        assert_eq!(bytes[1] & 0x80, 0, "server frames are not masked");
        let (len, at) = match bytes[1] {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => {
                let mut be = [0; 8];
                be.copy_from_slice(&bytes[2..10]);
                (u64::from_be_bytes(be) as usize, 10)
            }
            n => (n as usize, 2),
        };
        assert!(at == 2 || (at == 4 && len >= 126) || len > 0xFFFF);
        frames.push((bytes[0], bytes[at..at + len].to_vec()));
        bytes = &bytes[at + len..];
    }
    frames
}

/// What a client's compressor sends: a sync-flushed message without its tail.
fn client_compress(zlib: &mut Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    zlib.compress_vec(data, &mut out, FlushCompress::Sync)
        .unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// What a client's decompressor makes of a server message.
fn client_inflate(zlib: &mut Decompress, payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    zlib.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    out
}

#[test]
fn rfc6455_single_frame_masked_text() {
    // RFC 6455 section 5.7.
    let hello = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    assert_eq!(decode_all(&mut codec(), &hello).unwrap(), [text("Hello")]);
}

#[test]
fn fragmented_text_and_binary() {
    let mut bytes = frame(0x01, b"Hel");
    bytes.extend(frame(0x80, b"lo"));
    bytes.extend(frame(0x02, b""));
    bytes.extend(frame(0x00, b"\x01\x02"));
    bytes.extend(frame(0x00, b""));
    bytes.extend(frame(0x80, b"\x03"));
    assert_eq!(
        decode_all(&mut codec(), &bytes).unwrap(),
        [text("Hello"), binary(b"\x01\x02\x03")]
    );
}

/// A stream with every kind of frame, and what it decodes to.
fn mixed_stream() -> (Vec<u8>, Vec<Incoming>) {
    let long: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
    let mut bytes = frame(0x81, "κόσμε".as_bytes());
    bytes.extend(frame(0x01, b"frag"));
    bytes.extend(frame(0x89, b"ping!"));
    // A fragment that ends inside "€" (e2 82 ac).
    bytes.extend(frame(0x00, b"-\xe2\x82"));
    bytes.extend(frame(0x8A, b""));
    bytes.extend(frame(0x80, b"\xacnd"));
    bytes.extend(frame(0x82, &long));
    bytes.extend(frame(0x81, b""));
    bytes.extend(frame_with(0x82, b"\x00\xff", [0, 0, 0, 0]));
    bytes.extend(frame(0x88, b"\x03\xe8bye"));
    let events = vec![
        text("κόσμε"),
        Incoming::Ping(Bytes::from_static(b"ping!")),
        Incoming::Pong(Bytes::new()),
        text("frag-€nd"),
        binary(&long),
        text(""),
        binary(b"\x00\xff"),
        Incoming::Close {
            code: Some(1000),
            reason: "bye".to_string(),
        },
    ];
    (bytes, events)
}

#[test]
fn split_at_every_byte_boundary() {
    let (bytes, events) = mixed_stream();
    assert_eq!(decode_all(&mut codec(), &bytes).unwrap(), events);
    for at in 0..=bytes.len() {
        let (a, b) = bytes.split_at(at);
        assert_eq!(
            decode_pieces(&mut codec(), &[a, b]).unwrap(),
            events,
            "split {at}"
        );
    }
    for at in (0..bytes.len()).step_by(7) {
        let (a, rest) = bytes.split_at(at);
        let (b, c) = rest.split_at(rest.len() / 2);
        assert_eq!(
            decode_pieces(&mut codec(), &[a, b, c]).unwrap(),
            events,
            "{at}"
        );
    }
    let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(decode_pieces(&mut codec(), &bytewise).unwrap(), events);
}

#[test]
fn extended_lengths() {
    for len in [125, 126, 127, 65535, 65536, 70000] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let bytes = frame(0x82, &payload);
        let head_len = match len {
            0..=125 => 2,
            126..=65535 => 4,
            _ => 10,
        } + 4;
        assert_eq!(bytes.len(), head_len + len);
        assert_eq!(
            decode_all(&mut codec(), &bytes).unwrap(),
            [binary(&payload)]
        );
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(
            decode_pieces(&mut codec(), &bytewise).unwrap(),
            [binary(&payload)]
        );
        let text_payload = "é".repeat(len / 2);
        let bytes = frame(0x81, text_payload.as_bytes());
        let pieces: Vec<&[u8]> = bytes.chunks(1000).collect();
        assert_eq!(
            decode_pieces(&mut codec(), &pieces).unwrap(),
            [text(&text_payload)]
        );
    }
}

#[test]
fn header_errors_are_1002() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked", vec![0x81, 0x02, b'h', b'i']),
        ("rsv1 without deflate", frame(0xC1, b"hi")),
        ("rsv2", frame(0xA1, b"hi")),
        ("rsv3", frame(0x91, b"hi")),
        ("opcode 3", frame(0x83, b"")),
        ("opcode 7", frame(0x87, b"")),
        ("opcode 11", frame(0x8B, b"")),
        ("opcode 15", frame(0x8F, b"")),
        ("long ping", frame(0x89, &[0; 126])),
        ("long close", frame(0x88, &[3; 126])),
        ("fragmented ping", frame(0x09, b"")),
        ("fragmented close", frame(0x08, b"")),
        ("continuation first", frame(0x80, b"x")),
        ("non-final continuation first", frame(0x00, b"x")),
        ("close of one byte", frame(0x88, b"\x03")),
        (
            "126 not minimal",
            [vec![0x82, 0xFE, 0x00, 0x7D], MASK.to_vec()].concat(),
        ),
        (
            "127 not minimal",
            [
                vec![0x82, 0xFF, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF],
                MASK.to_vec(),
            ]
            .concat(),
        ),
        (
            "127 with the top bit",
            vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0],
        ),
    ];
    for (what, bytes) in cases {
        assert_eq!(error_of(&bytes), 1002, "{what}");
    }
    // A new message while one is fragmented, with or without a frame in between.
    let mut bytes = frame(0x01, b"a");
    bytes.extend(frame(0x81, b"b"));
    assert_eq!(error_of(&bytes), 1002);
    let mut bytes = frame(0x02, b"a");
    bytes.extend(frame(0x89, b""));
    bytes.extend(frame(0x82, b"b"));
    assert_eq!(error_of(&bytes), 1002);
    // A continuation after a finished message.
    let mut bytes = frame(0x81, b"a");
    bytes.extend(frame(0x80, b"b"));
    let mut c = codec();
    assert_eq!(decode_pieces(&mut c, &[&bytes[..7]]).unwrap(), [text("a")]);
    assert_eq!(
        decode_pieces(&mut c, &[&bytes[7..]]).unwrap_err().code,
        1002
    );
}

#[test]
fn errors_come_before_the_payload() {
    // The header alone is enough for these.
    assert_eq!(error_of(&[0x81, 0x05]), 1002);
    assert_eq!(error_of(&[0x83]), 1002);
    let mut c = Codec::new(
        &Config {
            max_message_size: 1000,
            ..Config::default()
        },
        None,
    );
    let head = &frame(0x82, &[0; 1001])[..8];
    assert_eq!(decode_all(&mut c, head).unwrap_err().code, 1009);
}

#[test]
fn message_size_limit() {
    let config = Config {
        max_message_size: 10,
        ..Config::default()
    };
    let ok = frame(0x82, &[1; 10]);
    assert_eq!(
        decode_all(&mut Codec::new(&config, None), &ok).unwrap(),
        [binary(&[1; 10])]
    );
    assert_eq!(
        error_with(Codec::new(&config, None), &frame(0x82, &[1; 11])),
        1009
    );
    let mut bytes = frame(0x01, &[b'a'; 6]);
    bytes.extend(frame(0x80, &[b'a'; 5]));
    assert_eq!(error_with(Codec::new(&config, None), &bytes), 1009);
    // Control frames do not count.
    let mut bytes = frame(0x02, &[1; 6]);
    bytes.extend(frame(0x89, &[2; 100]));
    bytes.extend(frame(0x80, &[1; 4]));
    let events = decode_all(&mut Codec::new(&config, None), &bytes).unwrap();
    assert_eq!(events[1], binary(&[1; 10]));
}

#[test]
fn close_codes() {
    for code in [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000,
        4999,
    ] {
        let events = decode_all(&mut codec(), &frame(0x88, &u16::to_be_bytes(code))).unwrap();
        assert_eq!(
            events,
            [Incoming::Close {
                code: Some(code),
                reason: String::new()
            }],
            "{code}"
        );
    }
    // Autobahn 7.9.x, and the other reserved ones.
    for code in [
        0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        assert_eq!(
            error_of(&frame(0x88, &u16::to_be_bytes(code))),
            1002,
            "{code}"
        );
    }
    assert_eq!(error_of(&frame(0x88, b"\x03\xe8\xce\xba\xe1\xbd")), 1007);
    assert_eq!(
        decode_all(&mut codec(), &frame(0x88, b"")).unwrap(),
        [Incoming::Close {
            code: None,
            reason: String::new()
        }]
    );
}

#[test]
fn invalid_utf8_is_1007_and_fails_fast() {
    assert_eq!(error_of(&frame(0x81, b"\xce\xba\xff")), 1007);
    assert_eq!(error_of(&frame(0x81, b"ab\xe2\x82")), 1007);
    // Fragments that end cut off are fine; the end of the message is not.
    let mut bytes = frame(0x01, b"\xe2\x82");
    bytes.extend(frame(0x80, b"\xac\xe2"));
    assert_eq!(error_of(&bytes), 1007);
    // Autobahn 6.4.1: the bad fragment fails before the message ends.
    let mut c = codec();
    let mut bytes = frame(0x01, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5");
    bytes.extend(frame(0x00, b"\xf4\x90\x80\x80"));
    assert_eq!(decode_all(&mut c, &bytes).unwrap_err().code, 1007);
    // Autobahn 6.4.3: one frame in chops; the chop with the bad bytes fails at once.
    let payload =
        b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80\x65\x64\x69\x74\x65\x64";
    let bytes = frame(0x81, payload);
    let mut c = codec();
    let mut buf = BytesMut::from(&bytes[..6 + 11]);
    assert_eq!(c.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(&bytes[17..17 + 2]);
    assert_eq!(c.decode(&mut buf).unwrap_err().code, 1007);
    // Compressed text is checked too.
    let mut zlib = Compress::new(Compression::fast(), false);
    let mut c = deflate_codec(DEFLATE);
    let bad = client_compress(&mut zlib, b"ok \xff not");
    assert_eq!(
        decode_all(&mut c, &frame(0xC1, &bad)).unwrap_err().code,
        1007
    );
    let mut zlib = Compress::new(Compression::fast(), false);
    let mut c = deflate_codec(DEFLATE);
    let mut bytes = frame(0x41, &client_compress(&mut zlib, b"ok \xff"));
    // No final frame: it fails on the first.
    bytes.extend(frame(0x00, &client_compress(&mut zlib, b"more")));
    assert_eq!(decode_all(&mut c, &bytes).unwrap_err().code, 1007);
}

#[test]
fn after_an_error_nothing_more_is_decoded() {
    let mut c = codec();
    let mut bytes = frame(0x83, b"");
    bytes.extend(frame(0x81, b"x"));
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(c.decode(&mut buf).is_err());
    assert_eq!(c.decode(&mut buf).unwrap(), None);
    assert_eq!(c.state(), CloseState::Failed);
    let mut out = BytesMut::new();
    assert!(!c.encode_text("no", &mut out));
    assert!(c.encode_close(1002, "reserved opcode", &mut out));
    assert_eq!(&out[..4], &[0x88, 17, 0x03, 0xEA]);
    assert_eq!(c.state(), CloseState::Closed);
}

#[test]
fn closing_handshake_started_by_the_client() {
    let mut c = codec();
    let mut bytes = frame(0x81, b"last");
    bytes.extend(frame(0x88, b"\x0f\xa0bye"));
    bytes.extend(frame(0x81, b"after close"));
    assert_eq!(
        decode_all(&mut c, &bytes).unwrap(),
        [
            text("last"),
            Incoming::Close {
                code: Some(4000),
                reason: "bye".to_string()
            }
        ]
    );
    assert_eq!(c.state(), CloseState::CloseReceived);
    let mut out = BytesMut::new();
    // Messages may still go before the reply.
    assert!(c.encode_text("x", &mut out));
    out.clear();
    assert!(c.encode_close_reply(Some(4000), &mut out));
    assert_eq!(&out[..], &[0x88, 0x02, 0x0f, 0xa0]);
    assert_eq!(c.state(), CloseState::Closed);
    assert!(!c.encode_close_reply(Some(4000), &mut out));
    assert!(!c.encode_ping(b"", &mut out));
    // An empty close gets an empty close.
    let mut c = codec();
    decode_all(&mut c, &frame(0x88, b"")).unwrap();
    let mut out = BytesMut::new();
    assert!(c.encode_close_reply(None, &mut out));
    assert_eq!(&out[..], &[0x88, 0x00]);
}

#[test]
fn closing_handshake_started_by_the_server() {
    let mut c = codec();
    let mut out = BytesMut::new();
    assert!(c.encode_close(1001, "going", &mut out));
    assert_eq!(c.state(), CloseState::CloseSent);
    assert!(!c.encode_text("late", &mut out));
    assert!(!c.encode_pong(b"", &mut out));
    assert!(!c.encode_close(1000, "", &mut out));
    assert_eq!(server_frames(&out), [(0x88, b"\x03\xe9going".to_vec())]);
    let mut bytes = frame(0x81, b"in flight");
    bytes.extend(frame(0x89, b"ping"));
    bytes.extend(frame(0x02, b"fr"));
    bytes.extend(frame(0x80, b"ag"));
    bytes.extend(frame(0x88, b"\x03\xe9"));
    assert_eq!(
        decode_all(&mut c, &bytes).unwrap(),
        [Incoming::Close {
            code: Some(1001),
            reason: String::new()
        }]
    );
    assert_eq!(c.state(), CloseState::Closed);
}

#[test]
fn encoders() {
    let mut c = codec();
    let mut out = BytesMut::new();
    assert!(c.encode_text("Hello", &mut out));
    assert_eq!(&out[..], b"\x81\x05Hello");
    out.clear();
    let big = vec![7u8; 70000];
    assert!(c.encode_binary(&big, &mut out));
    assert!(c.encode_binary(&big[..300], &mut out));
    assert!(c.encode_ping(&[1; 200], &mut out));
    assert!(c.encode_pong(b"p", &mut out));
    assert_eq!(
        server_frames(&out),
        [
            (0x82, big.clone()),
            (0x82, big[..300].to_vec()),
            (0x89, vec![1; 125]),
            (0x8A, b"p".to_vec())
        ]
    );
    // Close: reserved codes become 1000, long reasons are cut at a character boundary.
    let mut out = BytesMut::new();
    assert!(codec().encode_close(1005, "x", &mut out));
    assert_eq!(&out[..], b"\x88\x03\x03\xe8x");
    let mut out = BytesMut::new();
    assert!(codec().encode_close(4001, &"é".repeat(100), &mut out));
    let frames = server_frames(&out);
    assert_eq!(frames[0].1.len(), 2 + 122);
    assert!(std::str::from_utf8(&frames[0].1[2..]).is_ok());
}

#[test]
fn rfc7692_examples() {
    // Section 7.2.3.1: "Hello" in one frame and in two.
    let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    let mut c = deflate_codec(DEFLATE);
    assert_eq!(
        decode_all(&mut c, &frame(0xC1, &hello)).unwrap(),
        [text("Hello")]
    );
    let mut bytes = frame(0x41, &hello[..3]);
    bytes.extend(frame(0x80, &hello[3..]));
    let mut c = deflate_codec(DEFLATE);
    assert_eq!(decode_all(&mut c, &bytes).unwrap(), [text("Hello")]);
    // Section 7.2.3.2: the second "Hello" refers back to the first.
    let mut bytes = frame(0xC1, &hello);
    bytes.extend(frame(0xC1, &[0xf2, 0x00, 0x11, 0x00, 0x00]));
    let mut c = deflate_codec(DEFLATE);
    assert_eq!(
        decode_all(&mut c, &bytes).unwrap(),
        [text("Hello"), text("Hello")]
    );
    // ...which is an error once the client promised not to take over its context.
    let mut c = deflate_codec(DeflateParams {
        client_no_context_takeover: true,
        ..DEFLATE
    });
    assert_eq!(decode_all(&mut c, &bytes).unwrap_err().code, 1007);
    // Section 7.2.3.3: a stored block.
    let stored = [
        0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
    ];
    let mut c = deflate_codec(DEFLATE);
    assert_eq!(
        decode_all(&mut c, &frame(0xC1, &stored)).unwrap(),
        [text("Hello")]
    );
    // Section 7.2.3.6: the empty message, and an empty payload taken as one.
    let mut c = deflate_codec(DEFLATE);
    let mut bytes = frame(0xC2, &[0x00]);
    bytes.extend(frame(0xC2, &[]));
    bytes.extend(frame(0xC1, &hello));
    assert_eq!(
        decode_all(&mut c, &bytes).unwrap(),
        [binary(b""), binary(b""), text("Hello")]
    );
    // Section 7.2.3.4: a final block; the next message starts a new stream.
    let mut zlib = Compress::new(Compression::default(), false);
    let mut ended = Vec::with_capacity(64);
    zlib.compress_vec(b"Hello", &mut ended, FlushCompress::Finish)
        .unwrap();
    let mut bytes = frame(0xC1, &ended);
    bytes.extend(frame(0xC1, &hello));
    let mut c = deflate_codec(DEFLATE);
    assert_eq!(
        decode_all(&mut c, &bytes).unwrap(),
        [text("Hello"), text("Hello")]
    );
}

#[test]
fn rsv1_rules_with_deflate() {
    let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    let mut bytes = frame(0x41, &hello[..3]);
    bytes.extend(frame(0xC0, &hello[3..]));
    assert_eq!(error_with(deflate_codec(DEFLATE), &bytes), 1002);
    assert_eq!(error_with(deflate_codec(DEFLATE), &frame(0xC9, b"")), 1002);
    assert_eq!(error_with(deflate_codec(DEFLATE), &frame(0xC8, b"")), 1002);
    // Uncompressed messages are still fine.
    let events = decode_all(&mut deflate_codec(DEFLATE), &frame(0x81, b"plain")).unwrap();
    assert_eq!(events, [text("plain")]);
    // Garbage is 1007.
    let garbage = [0xff, 0xff, 0xff, 0x00];
    assert_eq!(
        error_with(deflate_codec(DEFLATE), &frame(0xC2, &garbage)),
        1007
    );
}

#[test]
fn compressed_messages_in_pieces_with_context() {
    let mut zlib = Compress::new(Compression::default(), false);
    let json = br#"{"id": 1, "name": "portico", "tags": ["wsgi", "asgi", "nginx"]}"#.repeat(50);
    let mut bytes = Vec::new();
    let mut events = Vec::new();
    for round in 0..3 {
        let compressed = client_compress(&mut zlib, &json);
        if round == 1 {
            // Fragmented, with a ping in between.
            let (a, b) = compressed.split_at(compressed.len() / 2);
            bytes.extend(frame(0x42, a));
            bytes.extend(frame(0x89, b"p"));
            bytes.extend(frame(0x80, b));
            events.push(Incoming::Ping(Bytes::from_static(b"p")));
        } else {
            bytes.extend(frame(0xC2, &compressed));
        }
        events.push(binary(&json));
    }
    assert_eq!(
        decode_all(&mut deflate_codec(DEFLATE), &bytes).unwrap(),
        events
    );
    for at in (0..bytes.len()).step_by(13) {
        let (a, b) = bytes.split_at(at);
        let mut c = deflate_codec(DEFLATE);
        assert_eq!(decode_pieces(&mut c, &[a, b]).unwrap(), events, "{at}");
    }
}

#[test]
fn server_compression_round_trip() {
    let json = r#"{"event": "update", "value": 12345, "ok": true}"#.repeat(20);
    for params in [
        DEFLATE,
        DeflateParams {
            server_no_context_takeover: true,
            ..DEFLATE
        },
        DeflateParams {
            server_max_window_bits: Some(8),
            ..DEFLATE
        },
        DeflateParams {
            server_max_window_bits: Some(12),
            server_no_context_takeover: true,
            client_no_context_takeover: true,
        },
    ] {
        let mut c = deflate_codec(params);
        let mut out = BytesMut::new();
        for _ in 0..3 {
            assert!(c.encode_text(&json, &mut out));
        }
        assert!(c.encode_binary(b"", &mut out));
        assert!(c.encode_binary(&[9; 100_000], &mut out));
        let frames = server_frames(&out);
        assert_eq!(frames.len(), 5);
        assert_eq!(frames[3], (0x82, vec![]));
        let mut zlib = Decompress::new(false);
        for (i, (b0, payload)) in frames.iter().enumerate() {
            if i == 3 {
                continue;
            }
            assert_eq!(b0 & 0x40, 0x40, "RSV1 set");
            if params.server_no_context_takeover {
                zlib = Decompress::new(false);
            }
            let data = client_inflate(&mut zlib, payload);
            if i < 3 {
                assert_eq!(data, json.as_bytes());
            } else {
                assert_eq!(data, vec![9; 100_000]);
            }
        }
        // Context takeover makes the second copy tiny; without it all three are equal.
        if params.server_no_context_takeover {
            assert_eq!(frames[0].1, frames[1].1);
        } else if params.server_max_window_bits.is_none() {
            assert!(frames[1].1.len() < frames[0].1.len() / 4, "{params:?}");
        }
    }
}

#[test]
fn decompression_bomb_is_1009() {
    let config = Config {
        max_message_size: 1 << 20,
        ..Config::default()
    };
    let mut zlib = Compress::new(Compression::best(), false);
    let zeros = vec![0u8; 8 << 20];
    let bomb = client_compress(&mut zlib, &zeros);
    assert!(bomb.len() < 20_000);
    let mut c = Codec::new(&config, Some(DEFLATE));
    assert_eq!(
        decode_all(&mut c, &frame(0xC2, &bomb)).unwrap_err().code,
        1009
    );
    // The same in fragments, failing on the first that goes over.
    let mut c = Codec::new(&config, Some(DEFLATE));
    let mut bytes = Vec::new();
    for piece in bomb.chunks(1000) {
        bytes.extend(frame(if bytes.is_empty() { 0x42 } else { 0x00 }, piece));
    }
    assert_eq!(decode_all(&mut c, &bytes).unwrap_err().code, 1009);
    // Exactly at the limit is fine.
    let mut zlib = Compress::new(Compression::best(), false);
    let exact = client_compress(&mut zlib, &zeros[..1 << 20]);
    let mut c = Codec::new(&config, Some(DEFLATE));
    let events = decode_all(&mut c, &frame(0xC2, &exact)).unwrap();
    assert_eq!(events, [binary(&zeros[..1 << 20])]);
}
