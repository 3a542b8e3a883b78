//! Feeds arbitrary bytes to the pool protocol's decoder, as a broken or hostile peer would:
//! frames, then each payload kind's reader. Nothing may panic, hang or allocate what the
//! bytes ask for.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portico_core::pool::wire::{self, Kind, Reader};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = wire::decode(&mut buf) {
        let payload = frame.payload.clone();
        let _ = match frame.kind {
            Kind::Request => wire::decode_request(payload).map(drop),
            Kind::Head | Kind::Whole => wire::decode_head(&mut Reader::new(payload)).map(drop),
            Kind::Trailers => wire::decode_headers(payload).map(drop),
            Kind::EarlyHint => wire::decode_links(payload).map(drop),
            Kind::Failed | Kind::BodyFailed => wire::decode_error(payload).map(drop),
            Kind::Status => wire::decode_status(payload).map(drop),
            _ => Ok(()),
        };
    }
});
