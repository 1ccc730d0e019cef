//! Prometheus counters for `/metrics`: requests, commits, chunk bytes in and out, connected
//! devices (open subscriptions), refused connections and corrupt chunks. Plain atomics rendered as the text exposition format.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub commits: AtomicU64,
    pub entries: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub errors: AtomicU64,
    pub subscribers: AtomicI64,
    /// Connections closed at once because a connection limit was reached.
    pub refused_connections: AtomicU64,
}

impl Metrics {
    pub fn render(&self, users: usize, corrupt_chunks: u64) -> String {
        let mut s = String::new();
        let mut put = |name: &str, kind: &str, help: &str, v: i64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        put("shoal_requests_total", "counter", "HTTP API requests served.", self.requests.load(Relaxed) as i64);
        put(
            "shoal_request_errors_total",
            "counter",
            "API requests answered with an error.",
            self.errors.load(Relaxed) as i64,
        );
        put("shoal_commits_total", "counter", "Commits applied.", self.commits.load(Relaxed) as i64);
        put("shoal_journal_entries_total", "counter", "Journal entries appended.", self.entries.load(Relaxed) as i64);
        put(
            "shoal_chunk_bytes_in_total",
            "counter",
            "Chunk bytes received from devices.",
            self.bytes_in.load(Relaxed) as i64,
        );
        put(
            "shoal_chunk_bytes_out_total",
            "counter",
            "Chunk bytes sent to devices.",
            self.bytes_out.load(Relaxed) as i64,
        );
        put(
            "shoal_connections_refused_total",
            "counter",
            "Connections closed at accept because a total or per-address limit was reached.",
            self.refused_connections.load(Relaxed) as i64,
        );
        put("shoal_connected_devices", "gauge", "Devices holding a push subscription.", self.subscribers.load(Relaxed));
        put("shoal_users", "gauge", "Users known to the coordinator.", users as i64);
        put(
            "shoal_chunks_corrupt_total",
            "counter",
            "Stored chunks that failed their BLAKE3 check when read (quarantined until uploaded again).",
            corrupt_chunks as i64,
        );
        s
    }
}
