//! Bandwidth limits (`upload_limit`, `download_limit`, `lan_limit` in config.toml): a rate in
//! bytes per second, written as a number with an optional unit (`500KiB`, `2 MiB/s`, `10MB`), and
//! a token-bucket limiter (governor) that transfers wait on before moving their bytes.

use std::num::NonZeroU32;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A byte rate, in bytes per second (at most 4 GiB/s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub NonZeroU32);

impl Rate {
    /// Parses `N[unit][/s]`: units `B`, `k`/`KB` (1000), `KiB` (1024), `M`/`MB`, `MiB`, `G`/`GB`,
    /// `GiB`; case-insensitive, spaces allowed before the unit.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let t = s.trim();
        let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || format!("{s:?} is not a rate (like \"2MiB\" or \"500KB\", per second)");
        let n: f64 = num.parse().map_err(|_| bad())?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "kib" => 1024.0,
            "m" | "mb" => 1e6,
            "mib" => 1024.0 * 1024.0,
            "g" | "gb" => 1e9,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            _ => return Err(bad()),
        };
        let bytes = (n * mult).round();
        if !bytes.is_finite() || bytes < 1.0 || bytes > f64::from(u32::MAX) {
            return Err(format!("{s:?}: a rate must be between 1 byte and 4 GiB per second"));
        }
        Ok(Rate(NonZeroU32::new(bytes as u32).ok_or_else(bad)?))
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}B/s", self.0)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Rate::parse(&n.to_string()),
            Raw::Text(s) => Rate::parse(&s),
        }
        .map_err(serde::de::Error::custom)
    }
}

type Bucket = governor::DefaultDirectRateLimiter;

/// Waits transfers down to a rate; unlimited when built from `None`. Cheap to clone; clones share
/// the budget.
#[derive(Clone, Default)]
pub struct Limiter(Option<Arc<(Bucket, NonZeroU32, NonZeroU32)>>);

impl Limiter {
    pub fn new(rate: Option<Rate>) -> Limiter {
        Limiter(rate.map(|Rate(r)| {
            // A tenth of a second's worth at once (at least 16 KiB, so one wait covers a few
            // packets even at low rates).
            let burst = NonZeroU32::new((r.get() / 10).max(16 * 1024)).expect("non-zero");
            let quota = governor::Quota::per_second(r).allow_burst(burst);
            Arc::new((governor::RateLimiter::direct(quota), burst, r))
        }))
    }

    pub fn is_limited(&self) -> bool {
        self.0.is_some()
    }

    /// How many bytes to send between waits, so that whoever receives them hears from this
    /// device often even at a low rate: an eighth of a second's worth, from 512 bytes up to `max`
    /// (`None` when unlimited).
    pub fn piece(&self, max: usize) -> Option<usize> {
        let l = self.0.as_ref()?;
        Some(usize::try_from(l.2.get() / 8).unwrap_or(max).clamp(512.min(max), max))
    }

    /// Waits until `n` more bytes fit the rate.
    pub async fn take(&self, n: usize) {
        let Some(l) = &self.0 else { return };
        let (bucket, burst, _) = &**l;
        let mut left = n as u64;
        while left > 0 {
            let step = left.min(u64::from(burst.get())) as u32;
            if let Some(step) = NonZeroU32::new(step) {
                // `step` never exceeds the burst, so capacity is never insufficient.
                let _ = bucket.until_n_ready(step).await;
            }
            left -= u64::from(step);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_shrink_with_the_rate() {
        let piece = |rate: Option<&str>| Limiter::new(rate.map(|r| Rate::parse(r).unwrap())).piece(16 * 1024);
        assert_eq!(piece(None), None);
        assert_eq!(piece(Some("10MiB")), Some(16 * 1024));
        assert_eq!(piece(Some("40KiB")), Some(5 * 1024));
        assert_eq!(piece(Some("1KiB")), Some(512));
    }

    #[test]
    fn rates() {
        let r = |s: &str| Rate::parse(s).map(|r| r.0.get());
        assert_eq!(r("2MiB"), Ok(2 * 1024 * 1024));
        assert_eq!(r("2 MiB/s"), Ok(2 * 1024 * 1024));
        assert_eq!(r("500KB"), Ok(500_000));
        assert_eq!(r("1.5k"), Ok(1500));
        assert_eq!(r("4096"), Ok(4096));
        for bad in ["", "fast", "0", "-1MB", "5 parsecs", "5GiB", "1e9999"] {
            assert!(r(bad).is_err(), "{bad:?} parsed");
        }
        #[derive(Deserialize)]
        struct C {
            a: Rate,
            b: Rate,
        }
        let c: C = toml::from_str("a = \"10MiB\"\nb = 1000").unwrap();
        assert_eq!((c.a.0.get(), c.b.0.get()), (10 * 1024 * 1024, 1000));
    }

    #[tokio::test]
    async fn a_limiter_holds_transfers_to_its_rate() {
        let l = Limiter::new(Some(Rate::parse("1MiB").unwrap()));
        let started = std::time::Instant::now();
        // The first burst passes at once; the rest is paced: ~0.4 s for half a MiB.
        l.take(512 * 1024 + 100 * 1024).await;
        let took = started.elapsed();
        assert!(took >= std::time::Duration::from_millis(400), "{took:?}");
        assert!(took < std::time::Duration::from_secs(3), "{took:?}");
        let free = Limiter::new(None);
        let started = std::time::Instant::now();
        free.take(1 << 30).await;
        assert!(started.elapsed() < std::time::Duration::from_millis(50));
    }
}
