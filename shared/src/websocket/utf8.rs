//! Incremental UTF-8 validation, so a text message that goes bad fails as soon as the bad
//! bytes arrive (RFC 6455 section 8.1), not when the message is complete.

/// Validates a byte stream piece by piece; a piece may end inside a code point.
#[derive(Debug, Default, Clone)]
pub(crate) struct Utf8Validator {
    /// The start of a code point cut off at the end of the last piece.
    pending: [u8; 4],
    pending_len: u8,
}

/// How long the sequence that `lead` starts is (only called on valid lead bytes).
fn sequence_len(lead: u8) -> usize {
    match lead {
        0xF0.. => 4,
        0xE0.. => 3,
        _ => 2,
    }
}

impl Utf8Validator {
    /// Forgets everything: the next piece starts a new stream.
    pub(crate) fn reset(&mut self) {
        self.pending_len = 0;
    }

    /// Whether the stream so far ends on a code point boundary (the codec checks whole
    /// messages with `String::from_utf8` instead).
    #[cfg(test)]
    pub(crate) fn is_complete(&self) -> bool {
        self.pending_len == 0
    }

    /// Checks the next piece; `false` as soon as the stream cannot be valid UTF-8.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> bool {
        if self.pending_len > 0 {
            let have = usize::from(self.pending_len);
            let want = sequence_len(self.pending[0]);
            let take = (want - have).min(data.len());
            self.pending[have..have + take].copy_from_slice(&data[..take]);
            match std::str::from_utf8(&self.pending[..have + take]) {
                Ok(_) => self.pending_len = 0,
                // Still cut off (the piece was too short): valid so far.
                Err(e) if e.error_len().is_none() => {
                    self.pending_len = (have + take) as u8;
                    return true;
                }
                Err(_) => return false,
            }
            data = &data[take..];
        }
        match std::str::from_utf8(data) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() => {
                let rest = &data[e.valid_up_to()..];
                self.pending[..rest.len()].copy_from_slice(rest);
                self.pending_len = rest.len() as u8;
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` split at every pair of points and compares with std's verdict.
    fn agrees_with_std(bytes: &[u8]) {
        let valid = std::str::from_utf8(bytes).is_ok();
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                let mut v = Utf8Validator::default();
                let ok = v.feed(&bytes[..a]) && v.feed(&bytes[a..b]) && v.feed(&bytes[b..]);
                assert_eq!(ok && v.is_complete(), valid, "{bytes:x?} split {a} {b}");
            }
        }
    }

    #[test]
    fn splits_anywhere() {
        agrees_with_std("κόσμε €𝄞 a".as_bytes());
        agrees_with_std(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited");
        agrees_with_std(b"ab\xf4\x90\x80\x80");
        agrees_with_std(b"\xf0\x9f\x98");
        agrees_with_std(b"\xc0\xaf");
        agrees_with_std(b"\xe0\x80\xaf");
    }

    #[test]
    fn fails_at_the_first_bad_byte() {
        let mut v = Utf8Validator::default();
        assert!(v.feed(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5"));
        // U+110000 and above cannot be: the second byte already decides.
        assert!(!v.feed(b"\xf4\x90"));
        let mut v = Utf8Validator::default();
        assert!(v.feed(b"\xf4"));
        assert!(!v.feed(b"\x90"));
        let mut v = Utf8Validator::default();
        assert!(v.feed(b"\xe2\x82"));
        assert!(!v.is_complete());
        assert!(v.feed(b"\xac"));
        assert!(v.is_complete());
    }
}
