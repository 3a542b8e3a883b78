//! Times: wall-clock ones as people read them, in UTC, without a time-zone database; and
//! monotonic stamps that fit an atomic, for how long something has run.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since this process first asked, plus one: a time that fits an atomic, in
/// which 0 can mean "none".
pub(crate) fn stamp() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// How long ago `stamp` (from [`stamp`], not 0) was.
pub(crate) fn since(stamp: u64) -> std::time::Duration {
    std::time::Duration::from_millis(self::stamp().saturating_sub(stamp))
}

/// How long since `since`, with `limit`, when that is past `limit` (`None`: no limit); for
/// the `queue_timeout` checks of the thread queue and of the pool's queue.
pub(crate) fn waited_past(since: Instant, limit: Option<Duration>) -> Option<(Duration, Duration)> {
    let limit = limit?;
    let waited = since.elapsed();
    (waited > limit).then_some((waited, limit))
}

/// `2026-11-23T07:20:01Z` (RFC 3339, whole seconds).
pub fn rfc3339_utc(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), by Howard Hinnant's
/// `civil_from_days` algorithm.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates_across_leap_years_and_eras() {
        let at = |secs| rfc3339_utc(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_795_418_401), "2026-11-23T07:20:01Z");
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
