//! The wall clock as Unix time, the form timestamps take in Shoal's records and on the wire (a
//! clock before 1970 reads as 0 rather than failing), and Unix times as UTC calendar dates.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Nanoseconds since the Unix epoch, in the `i64` that file times use.
pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// The UTC calendar date and time of `unix_secs`, clamped to the last second of year 9999.
pub fn utc(unix_secs: u64) -> time::PrimitiveDateTime {
    const LAST: i64 = 253_402_300_799; // 9999-12-31 23:59:59
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix_secs).unwrap_or(LAST).min(LAST))
        .expect("clamped into the supported range");
    time::PrimitiveDateTime::new(t.date(), t.time())
}

/// `YYYY-MM-DD` of a UTC date.
pub fn ymd(t: &time::PrimitiveDateTime) -> String {
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        let day = |s: u64| ymd(&utc(s));
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(951_782_400), "2000-02-29");
        assert_eq!(day(1_795_292_573), "2026-11-21");
        let t = utc(1_795_292_573);
        assert_eq!((t.hour(), t.minute(), t.second()), (20, 22, 53));
        assert_eq!(day(u64::MAX), "9999-12-31");
    }

    #[test]
    fn both_clocks_tell_the_same_time() {
        let (ms, ns) = (now_ms(), now_ns());
        assert!(ms > 1_600_000_000_000, "{ms}");
        assert!((ns / 1_000_000 - ms as i64).abs() < 10_000, "{ns} vs {ms}");
    }
}
