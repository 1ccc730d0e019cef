//! One direction of an emulated link, as a pure model: given a packet's arrival time and size, when
//! it leaves the far end, or that it is lost. Bandwidth is a serialisation queue (a packet starts
//! when the one before it has gone, and takes its size over the rate), with tail drop once the
//! queue holds more than `MAX_QUEUE` of waiting; then the one-way latency, plus jitter drawn
//! uniformly from `[0, jitter]` but never overtaking the packet before (links do not reorder);
//! loss is independent per packet; a partitioned link drops everything.

use std::time::{Duration, Instant};

/// The most waiting a link's queue holds before it drops arrivals (a router's buffer).
pub const MAX_QUEUE: Duration = Duration::from_millis(250);

/// How one direction of a link behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// One-way delay.
    pub latency: Duration,
    /// Extra delay, uniform in `[0, jitter]`.
    pub jitter: Duration,
    /// Probability that a packet is lost, 0 to 1.
    pub loss: f64,
    /// Bits a second; `None` for no limit.
    pub rate_bps: Option<u64>,
}

impl LinkParams {
    /// No delay, no loss, no limit.
    pub const IDEAL: LinkParams =
        LinkParams { latency: Duration::ZERO, jitter: Duration::ZERO, loss: 0.0, rate_bps: None };
}

/// Counters of one direction of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Bytes (IP packets, headers included) that went through.
    pub bytes: u64,
    pub packets: u64,
    /// Packets lost: to `loss`, a partition, or a full queue.
    pub dropped: u64,
    /// Connections opened this way: TCP connection attempts (SYN without ACK) and UDP flows
    /// (QUIC connections) first seen, dropped or not.
    pub connections: u64,
}

/// One direction of a link, with its queue, its counters and its random draws (seeded, so a
/// run can be repeated).
#[derive(Debug, Clone)]
pub struct LinkState {
    pub params: LinkParams,
    pub partitioned: bool,
    pub counters: LinkCounters,
    /// When the last admitted packet has been sent onto the wire.
    busy_until: Option<Instant>,
    /// When the last admitted packet arrives at the far end.
    last_delivery: Option<Instant>,
    rng: u64,
}

impl LinkState {
    pub fn new(params: LinkParams, seed: u64) -> LinkState {
        LinkState {
            params,
            partitioned: false,
            counters: LinkCounters::default(),
            busy_until: None,
            last_delivery: None,
            rng: seed | 1,
        }
    }

    fn unit(&mut self) -> f64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A packet of `len` bytes reaches the link at `at`: when it leaves the far end, or `None`
    /// if the link drops it.
    pub fn admit(&mut self, at: Instant, len: usize) -> Option<Instant> {
        if self.partitioned || (self.params.loss > 0.0 && self.unit() < self.params.loss) {
            self.counters.dropped += 1;
            return None;
        }
        let start = self.busy_until.map_or(at, |b| b.max(at));
        if start.duration_since(at) > MAX_QUEUE {
            self.counters.dropped += 1;
            return None;
        }
        let sent = match self.params.rate_bps {
            Some(rate) => start + Duration::from_nanos(len as u64 * 8 * 1_000_000_000 / rate.max(1)),
            None => start,
        };
        self.busy_until = Some(sent);
        let jitter =
            if self.params.jitter.is_zero() { Duration::ZERO } else { self.params.jitter.mul_f64(self.unit()) };
        let mut arrives = sent + self.params.latency + jitter;
        if let Some(last) = self.last_delivery {
            arrives = arrives.max(last);
        }
        self.last_delivery = Some(arrives);
        self.counters.bytes += len as u64;
        self.counters.packets += 1;
        Some(arrives)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn latency_and_rate_add_up_and_packets_queue_behind_each_other() {
        let t0 = Instant::now();
        // 8 Mbit/s: 1,000 bytes take 1 ms on the wire.
        let mut l = LinkState::new(LinkParams { latency: ms(20), rate_bps: Some(8_000_000), ..LinkParams::IDEAL }, 1);
        assert_eq!(l.admit(t0, 1000), Some(t0 + ms(21)));
        assert_eq!(l.admit(t0, 1000), Some(t0 + ms(22)), "the second waits for the first");
        assert_eq!(l.admit(t0 + ms(10), 1000), Some(t0 + ms(31)), "an idle link starts at once");
        assert_eq!(l.counters, LinkCounters { bytes: 3000, packets: 3, dropped: 0, connections: 0 });
    }

    #[test]
    fn a_full_queue_drops_and_so_does_a_partition() {
        let t0 = Instant::now();
        // 80 kbit/s: 1,000 bytes take 100 ms, so the fourth packet at once would wait 300 ms.
        let mut l = LinkState::new(LinkParams { rate_bps: Some(80_000), ..LinkParams::IDEAL }, 1);
        for _ in 0..3 {
            assert!(l.admit(t0, 1000).is_some());
        }
        assert_eq!(l.admit(t0, 1000), None);
        l.partitioned = true;
        assert_eq!(l.admit(t0 + Duration::from_secs(5), 10), None);
        l.partitioned = false;
        assert!(l.admit(t0 + Duration::from_secs(5), 10).is_some());
        assert_eq!(l.counters.dropped, 2);
    }

    #[test]
    fn loss_drops_about_its_share_and_jitter_never_reorders() {
        let t0 = Instant::now();
        let p = LinkParams { latency: ms(5), jitter: ms(10), loss: 0.02, rate_bps: None };
        let mut l = LinkState::new(p, 7);
        let mut last = t0;
        for i in 0..20_000u64 {
            let at = t0 + Duration::from_micros(i * 100);
            if let Some(out) = l.admit(at, 100) {
                assert!(out >= last && out >= at + ms(5) && out <= at + ms(15) + ms(10), "{i}");
                last = out;
            }
        }
        let lost = l.counters.dropped as f64 / 20_000.0;
        assert!((0.015..0.025).contains(&lost), "lost {lost}");
    }
}
