//! The relay's metrics, served in the OpenMetrics text format on a separate plain-HTTP listener
//! (`--metrics-listen`, loopback by default): they describe every user's traffic.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::cache::CacheStats;

pub struct Metrics {
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub bytes_served: Counter,
    pub origin_bytes: Counter,
    pub origin_requests: Counter,
    pub rejected_tickets: Counter,
    pub refused_connections: Counter,
    cache_bytes: Gauge,
    cache_chunks: Gauge,
    evictions: Counter,
    corrupt: Counter,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            bytes_served: Counter::default(),
            origin_bytes: Counter::default(),
            origin_requests: Counter::default(),
            rejected_tickets: Counter::default(),
            refused_connections: Counter::default(),
            cache_bytes: Gauge::default(),
            cache_chunks: Gauge::default(),
            evictions: Counter::default(),
            corrupt: Counter::default(),
            registry: Registry::default(),
        };
        let mut registry = Registry::default();
        registry.register("shoal_relay_cache_hits", "Chunks served from the cache.", m.cache_hits.clone());
        registry.register(
            "shoal_relay_cache_misses",
            "Chunks fetched from the origin to serve.",
            m.cache_misses.clone(),
        );
        registry.register("shoal_relay_bytes_served", "Chunk bytes sent to devices.", m.bytes_served.clone());
        registry.register("shoal_relay_origin_bytes", "Chunk bytes fetched from the origin.", m.origin_bytes.clone());
        registry.register("shoal_relay_origin_requests", "Fetches sent to the origin.", m.origin_requests.clone());
        registry.register(
            "shoal_relay_rejected_tickets",
            "Requests refused for a missing, forged, expired or insufficient ticket.",
            m.rejected_tickets.clone(),
        );
        registry.register(
            "shoal_relay_refused_connections",
            "Connections closed at once because a connection limit was reached.",
            m.refused_connections.clone(),
        );
        registry.register("shoal_relay_cache_bytes", "Disk the cache's segments take.", m.cache_bytes.clone());
        registry.register("shoal_relay_cache_chunks", "Chunks in the cache.", m.cache_chunks.clone());
        registry.register("shoal_relay_evictions", "Cache segments evicted.", m.evictions.clone());
        registry.register(
            "shoal_relay_corrupt_chunks",
            "Cached chunks that failed their check and were dropped.",
            m.corrupt.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn render(&self, cache: CacheStats) -> String {
        self.cache_bytes.set(i64::try_from(cache.bytes).unwrap_or(i64::MAX));
        self.cache_chunks.set(i64::try_from(cache.chunks).unwrap_or(i64::MAX));
        // The cache counts these itself; the counters catch up to it.
        for (counter, n) in [(&self.evictions, cache.evictions), (&self.corrupt, cache.corrupt)] {
            let seen = counter.get();
            if n > seen {
                counter.inc_by(n - seen);
            }
        }
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }
}
