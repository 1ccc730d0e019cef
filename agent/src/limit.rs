//! Bandwidth limits (`upload_limit`, `download_limit`, `lan_limit` in config.toml): a rate in
//! bytes per second, written as a number with an optional unit (`500KiB`, `2 MiB/s`, `10MB`), and
//! a token-bucket limiter (governor) that transfers wait on before moving their bytes. And
//! `PeerServing`: origin uploads give way to chunks this device is sending to its LAN peers.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A byte rate, in bytes per second (at most 4 GiB/s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub NonZeroU32);

impl Rate {
    /// Parses `N[unit][/s]`: units `B`, `k`/`KB` (1000), `KiB` (1024), `M`/`MB`, `MiB`, `G`/`GB`,
    /// `GiB`; case-insensitive, spaces allowed before the unit.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let t = s.trim();
        let t = t.strip_suffix("/s").unwrap_or(t);
        let bytes = shoal_protocol::size::parse_bytes(t)
            .map_err(|_| format!("{s:?} is not a rate (like \"2MiB\" or \"500KB\", per second)"))?;
        match u32::try_from(bytes).ok().and_then(NonZeroU32::new) {
            Some(n) => Ok(Rate(n)),
            None => Err(format!("{s:?}: a rate must be between 1 byte and 4 GiB per second")),
        }
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

    /// The rate, in bytes per second (`None` when unlimited).
    pub fn rate(&self) -> Option<u64> {
        self.0.as_ref().map(|l| u64::from(l.2.get()))
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

/// How long after the last chunk sent to a LAN peer this device counts as serving.
const SERVING_QUIET: Duration = Duration::from_millis(250);
/// Smallest origin upload request that gives way to serving: below it, a request costs the peers
/// nothing noticeable, and waiting 250 ms for it delayed the next small file's commit by as much.
pub const GIVE_WAY_MIN_BYTES: usize = 1024 * 1024;
/// Longest an origin upload request waits for a pause in serving.
const GIVE_WAY_MAX: Duration = Duration::from_secs(1);

/// When this device last sent chunk bytes to a LAN peer. Origin uploads give way to that
/// (`give_way`): a peer waiting for a file wants it now, while the upload only makes a version
/// durable sooner, and on a machine with few cores both compete for the same CPU (on this VM's two
/// cores, in runs interleaved with and without this, a 1 GiB file reached the peer in 4.9-5.1 s
/// instead of 6.7-7.2 s). Each upload request waits at most `GIVE_WAY_MAX`, so the upload still
/// moves (a few requests of 4 MiB a second) while peers pull for a long time. Cheap to clone;
/// clones share it.
#[derive(Clone)]
pub struct PeerServing(Arc<Serving>);

struct Serving {
    base: tokio::time::Instant,
    /// Milliseconds from `base` to the last chunk sent, plus one; 0: never.
    last: AtomicU64,
}

impl Default for PeerServing {
    fn default() -> Self {
        PeerServing(Arc::new(Serving { base: tokio::time::Instant::now(), last: AtomicU64::new(0) }))
    }
}

impl PeerServing {
    /// Milliseconds since `base`, plus one (so 0 stays "never").
    fn stamp(&self) -> u64 {
        u64::try_from(self.0.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Records that a chunk was just sent to a peer.
    pub fn note(&self) {
        self.0.last.store(self.stamp(), Ordering::Relaxed);
    }

    /// How long until serving counts as paused (`None`: it is).
    fn busy_for(&self) -> Option<Duration> {
        let last = self.0.last.load(Ordering::Relaxed);
        if last == 0 {
            return None;
        }
        SERVING_QUIET.checked_sub(Duration::from_millis(self.stamp().saturating_sub(last))).filter(|d| !d.is_zero())
    }

    /// Waits while this device is serving peers, at most `GIVE_WAY_MAX`.
    pub async fn give_way(&self) {
        let deadline = tokio::time::Instant::now() + GIVE_WAY_MAX;
        while let Some(busy) = self.busy_for() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(busy.min(left)).await;
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

    #[tokio::test(start_paused = true)]
    async fn uploads_give_way_to_serving_peers_for_a_bounded_time() {
        use tokio::time::Instant;
        let s = PeerServing::default();
        // Never served: no wait.
        let t = Instant::now();
        s.give_way().await;
        assert_eq!(t.elapsed(), Duration::ZERO);
        // Just served: waits until serving has paused for `SERVING_QUIET`.
        s.note();
        let t = Instant::now();
        s.give_way().await;
        assert!(t.elapsed() >= SERVING_QUIET - Duration::from_millis(1), "{:?}", t.elapsed());
        assert!(t.elapsed() <= SERVING_QUIET + Duration::from_millis(1), "{:?}", t.elapsed());
        // Serving that never pauses holds an upload for `GIVE_WAY_MAX`, no longer.
        let server = s.clone();
        let serving = tokio::spawn(async move {
            loop {
                server.note();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let t = Instant::now();
        s.give_way().await;
        assert!(t.elapsed() >= GIVE_WAY_MAX - Duration::from_millis(1), "{:?}", t.elapsed());
        assert!(t.elapsed() <= GIVE_WAY_MAX + Duration::from_millis(1), "{:?}", t.elapsed());
        serving.abort();
    }
}
