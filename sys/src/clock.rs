//! The wall clock as Unix time, the form timestamps take in Shoal's records and on the wire. A
//! clock before 1970 reads as 0 rather than failing.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Nanoseconds since the Unix epoch, in the `i64` that file times use.
pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_clocks_tell_the_same_time() {
        let (ms, ns) = (now_ms(), now_ns());
        assert!(ms > 1_600_000_000_000, "{ms}");
        assert!((ns / 1_000_000 - ms as i64).abs() < 10_000, "{ns} vs {ms}");
    }
}
