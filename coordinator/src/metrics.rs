//! Prometheus metrics for `/metrics`, kept in a `prometheus-client` registry: requests, errors,
//! commits and their latency, journal entries, chunk bytes in and out, connected devices (open
//! subscriptions), refused connections, users and corrupt chunks. Rendered in the OpenMetrics
//! text format.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub struct Metrics {
    pub requests: Counter,
    pub errors: Counter,
    pub commits: Counter,
    /// Seconds from a commit's arrival to its durable answer.
    pub commit_seconds: Histogram,
    pub entries: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub subscribers: Gauge,
    /// Connections closed at once because a connection limit was reached.
    pub refused_connections: Counter,
    users: Gauge,
    corrupt_chunks: Counter,
    pending_versions: Gauge,
    pending_oldest_seconds: Gauge,
    pending_stuck: Gauge,
    storage_requests: Family<Vec<(String, String)>, Counter>,
    storage_cache_reads: Family<Vec<(String, String)>, Counter>,
    pub gc_running: Gauge,
    pub gc_runs: Counter,
    pub gc_failures: Counter,
    gc_last_run: Gauge,
    gc_last_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    gc_versions_expired: Gauge,
    gc_chunks_condemned: Gauge,
    gc_chunks_deleted: Counter,
    gc_bytes_reclaimed: Counter,
    registry: Registry,
}

/// Values only known at scrape time.
pub struct Scraped {
    pub users: usize,
    pub corrupt_chunks: u64,
    /// Pending versions of all users.
    pub pending_versions: u64,
    /// Pending versions withdrawn, or that made no progress for the stuck period.
    pub pending_stuck: u64,
    /// Age of the oldest pending version, in seconds (0 when there is none).
    pub pending_oldest_seconds: u64,
    /// Requests made to the chunk storage service since start, by kind (none for local packs).
    pub storage_requests: Vec<(&'static str, u64)>,
    pub storage_cache_reads: Vec<(&'static str, u64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            requests: Counter::default(),
            errors: Counter::default(),
            commits: Counter::default(),
            // 1 ms to ~16 s.
            commit_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            entries: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            subscribers: Gauge::default(),
            refused_connections: Counter::default(),
            users: Gauge::default(),
            corrupt_chunks: Counter::default(),
            pending_versions: Gauge::default(),
            pending_oldest_seconds: Gauge::default(),
            pending_stuck: Gauge::default(),
            storage_requests: Family::default(),
            storage_cache_reads: Family::default(),
            gc_running: Gauge::default(),
            gc_runs: Counter::default(),
            gc_failures: Counter::default(),
            gc_last_run: Gauge::default(),
            gc_last_seconds: Gauge::default(),
            gc_versions_expired: Gauge::default(),
            gc_chunks_condemned: Gauge::default(),
            gc_chunks_deleted: Counter::default(),
            gc_bytes_reclaimed: Counter::default(),
            registry: Registry::default(),
        };
        let mut registry = Registry::default();
        // Counters get their `_total` suffix from the registry.
        registry.register("shoal_requests", "HTTP API requests served.", m.requests.clone());
        registry.register("shoal_request_errors", "API requests answered with an error.", m.errors.clone());
        registry.register("shoal_commits", "Commits applied.", m.commits.clone());
        registry.register(
            "shoal_commit_duration_seconds",
            "Time from a commit's arrival to its durable answer.",
            m.commit_seconds.clone(),
        );
        registry.register("shoal_journal_entries", "Journal entries appended.", m.entries.clone());
        registry.register("shoal_chunk_bytes_in", "Chunk bytes received from devices.", m.bytes_in.clone());
        registry.register("shoal_chunk_bytes_out", "Chunk bytes sent to devices.", m.bytes_out.clone());
        registry.register(
            "shoal_connections_refused",
            "Connections closed at accept because a total or per-address limit was reached.",
            m.refused_connections.clone(),
        );
        registry.register("shoal_connected_devices", "Devices holding a push subscription.", m.subscribers.clone());
        registry.register("shoal_users", "Users known to the coordinator.", m.users.clone());
        registry.register(
            "shoal_chunks_corrupt",
            "Stored chunks that failed their BLAKE3 check when read (quarantined until uploaded again).",
            m.corrupt_chunks.clone(),
        );
        registry.register(
            "shoal_pending_versions",
            "Versions committed whose chunks the origin does not have yet (not backed up).",
            m.pending_versions.clone(),
        );
        registry.register(
            "shoal_pending_oldest_age_seconds",
            "Age of the oldest pending version (0 when there is none).",
            m.pending_oldest_seconds.clone(),
        );
        registry.register(
            "shoal_pending_stuck_versions",
            "Pending versions no device has supplied a chunk of for the stuck period, or withdrawn: devices stop fetching them.",
            m.pending_stuck.clone(),
        );
        registry.register(
            "shoal_storage_requests",
            "Requests made to the S3 service holding the chunks, by kind (put, get, list, delete).",
            m.storage_requests.clone(),
        );
        registry.register(
            "shoal_storage_cache_reads",
            "Reads of chunk bytes from S3 storage answered by the local cache of recent packs (result=hit) or sent to S3 (miss).",
            m.storage_cache_reads.clone(),
        );
        registry.register("shoal_gc_running", "1 while a garbage collection runs.", m.gc_running.clone());
        registry.register("shoal_gc_runs", "Garbage collections completed.", m.gc_runs.clone());
        registry.register("shoal_gc_failures", "Garbage collections that failed.", m.gc_failures.clone());
        registry.register(
            "shoal_gc_last_run_timestamp_seconds",
            "When the last garbage collection completed (Unix time; 0: none since start).",
            m.gc_last_run.clone(),
        );
        registry.register(
            "shoal_gc_last_run_duration_seconds",
            "How long the last garbage collection took.",
            m.gc_last_seconds.clone(),
        );
        registry.register(
            "shoal_gc_versions_expired",
            "Versions past retention at the last collection (not restorable).",
            m.gc_versions_expired.clone(),
        );
        registry.register(
            "shoal_gc_chunks_condemned",
            "Chunks the last collection found unreferenced and not yet deleted.",
            m.gc_chunks_condemned.clone(),
        );
        registry.register("shoal_gc_chunks_deleted", "Chunks garbage collection deleted.", m.gc_chunks_deleted.clone());
        registry.register(
            "shoal_gc_bytes_reclaimed",
            "Pack bytes garbage collection deleted from storage.",
            m.gc_bytes_reclaimed.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Records a completed garbage collection.
    pub fn gc_finished(&self, r: &crate::gc::Report, now_ms: u64) {
        self.gc_runs.inc();
        self.gc_last_run.set(i64::try_from(now_ms / 1000).unwrap_or(i64::MAX));
        self.gc_last_seconds.set(r.millis as f64 / 1000.0);
        self.gc_versions_expired.set(i64::try_from(r.versions_expired).unwrap_or(i64::MAX));
        let waiting = r.chunks_unreferenced.saturating_sub(r.chunks_deleted);
        self.gc_chunks_condemned.set(i64::try_from(waiting).unwrap_or(i64::MAX));
        self.gc_chunks_deleted.inc_by(r.chunks_deleted);
        self.gc_bytes_reclaimed.inc_by(r.bytes_reclaimed);
    }

    /// The exposition text, with the values only known at scrape time brought up to date.
    pub fn render(&self, now: Scraped) -> String {
        let Scraped {
            users,
            corrupt_chunks,
            pending_versions,
            pending_stuck,
            pending_oldest_seconds,
            storage_requests,
            storage_cache_reads,
        } = now;
        // The backend counts these itself; each counter catches up to it.
        let catch_up = |family: &Family<Vec<(String, String)>, Counter>, label: &str, counts: Vec<(&str, u64)>| {
            for (value, n) in counts {
                let c = family.get_or_create(&vec![(label.to_string(), value.to_string())]);
                let seen = c.get();
                if n > seen {
                    c.inc_by(n - seen);
                }
            }
        };
        catch_up(&self.storage_requests, "op", storage_requests);
        catch_up(&self.storage_cache_reads, "result", storage_cache_reads);
        self.pending_stuck.set(i64::try_from(pending_stuck).unwrap_or(i64::MAX));
        self.users.set(i64::try_from(users).unwrap_or(i64::MAX));
        self.pending_versions.set(i64::try_from(pending_versions).unwrap_or(i64::MAX));
        self.pending_oldest_seconds.set(i64::try_from(pending_oldest_seconds).unwrap_or(i64::MAX));
        // The chunk store counts corrupt chunks itself; the counter catches up to it.
        let seen = self.corrupt_chunks.get();
        if corrupt_chunks > seen {
            self.corrupt_chunks.inc_by(corrupt_chunks - seen);
        }
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_under_its_name() {
        let m = Metrics::default();
        m.requests.inc();
        m.bytes_out.inc_by(4096);
        m.subscribers.inc();
        m.commit_seconds.observe(0.003);
        let scraped = || Scraped {
            users: 2,
            corrupt_chunks: 1,
            pending_versions: 3,
            pending_stuck: 1,
            pending_oldest_seconds: 40,
            storage_requests: vec![("put", 7), ("get", 2)],
            storage_cache_reads: vec![("hit", 5), ("miss", 1)],
        };
        let text = m.render(scraped());
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        };
        assert_eq!(value("shoal_requests_total"), 1.0);
        assert_eq!(value("shoal_chunk_bytes_out_total"), 4096.0);
        assert_eq!(value("shoal_connected_devices"), 1.0);
        assert_eq!(value("shoal_users"), 2.0);
        assert_eq!(value("shoal_chunks_corrupt_total"), 1.0);
        assert_eq!(value("shoal_commit_duration_seconds_count"), 1.0);
        assert_eq!(value("shoal_pending_versions"), 3.0);
        assert_eq!(value("shoal_pending_oldest_age_seconds"), 40.0);
        assert_eq!(value("shoal_pending_stuck_versions"), 1.0);
        assert_eq!(value("shoal_storage_requests_total{op=\"put\"}"), 7.0);
        assert_eq!(value("shoal_storage_requests_total{op=\"get\"}"), 2.0);
        assert_eq!(value("shoal_storage_cache_reads_total{result=\"hit\"}"), 5.0);
        assert_eq!(
            m.render(scraped()).matches("shoal_chunks_corrupt_total 1").count(),
            1,
            "corrupt count is not added twice"
        );
        assert!(m.render(scraped()).contains("shoal_storage_requests_total{op=\"put\"} 7\n"), "nor requests");
        assert!(text.ends_with("# EOF\n"));
    }
}
