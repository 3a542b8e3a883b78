//! Sizes and durations as sysadmins write them: `"10M"`, `"30s"`, or plain numbers.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// A byte count: an integer, or a string with a `K`, `M` or `G` suffix (powers of 1024),
/// as nginx's `client_max_body_size` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// A duration: an integer or float number of seconds, or a string with an `ms`, `s`, `m` or
/// `h` suffix.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Seconds(pub Duration);

impl Seconds {
    /// Whole seconds.
    pub const fn from_secs(secs: u64) -> Seconds {
        Seconds(Duration::from_secs(secs))
    }
    /// `None` for zero, which means "no limit" wherever a timeout allows it.
    pub fn as_limit(&self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

/// As a sysadmin would write it: `"6h"`, `"30m"`, `"45s"`, `"1.5s"`, `"500ms"`.
impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (secs, millis) = (self.0.as_secs(), self.0.subsec_millis());
        match (secs, millis) {
            (0, ms) => write!(f, "{ms}ms"),
            (s, 0) if s % 3600 == 0 => write!(f, "{}h", s / 3600),
            (s, 0) if s % 60 == 0 => write!(f, "{}m", s / 60),
            (s, 0) => write!(f, "{s}s"),
            (s, ms) => write!(f, "{}s", s as f64 + f64::from(ms) / 1000.0),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Int(i64),
    Float(f64),
    Str(String),
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match NumberOrString::deserialize(d)? {
            NumberOrString::Int(n) if n >= 0 => Ok(ByteSize(n as u64)),
            NumberOrString::Str(s) => parse_size(&s).map(ByteSize).ok_or_else(|| {
                D::Error::custom(format!(
                    "`{s}` is not a size (e.g. 1048576, \"512K\", \"10M\", \"1G\")"
                ))
            }),
            _ => Err(D::Error::custom(
                "a size is a non-negative integer or a string such as \"10M\"",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let bad = |what: &str| {
            D::Error::custom(format!(
                "`{what}` is not a duration (seconds as a number, or a string such as \"500ms\", \"30s\", \"5m\")"
            ))
        };
        match NumberOrString::deserialize(d)? {
            NumberOrString::Int(n) if n >= 0 && n as f64 <= MAX_SECS => {
                Ok(Seconds::from_secs(n as u64))
            }
            NumberOrString::Float(f) if f.is_finite() && (0.0..=MAX_SECS).contains(&f) => {
                Ok(Seconds(Duration::from_secs_f64(f)))
            }
            NumberOrString::Str(s) => parse_duration(&s).map(Seconds).ok_or_else(|| bad(&s)),
            NumberOrString::Int(n) => Err(bad(&n.to_string())),
            NumberOrString::Float(f) => Err(bad(&f.to_string())),
        }
    }
}

/// Parses `"10M"`-style sizes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, factor) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(factor)
}

/// The longest duration accepted (about 31 years): longer ones are surely a mistake, and
/// would overflow clock arithmetic.
const MAX_SECS: f64 = 1e9;

/// Parses `"30s"`-style durations.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().ok()?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && (0.0..=MAX_SECS).contains(&secs)).then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod display_tests {
    use super::*;

    #[test]
    fn a_duration_reads_as_written() {
        for text in ["6h", "30m", "45s", "90s", "1.5s", "500ms", "0ms"] {
            assert_eq!(Seconds(parse_duration(text).unwrap()).to_string(), text);
        }
    }
}
