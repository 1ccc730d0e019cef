//! Garbage collection at scale: fills a fresh store (local packs) with VERSIONS versions of
//! PATHS files, one distinct 1 KiB chunk each, committed over the 60 days before now in commits
//! of 1,000, then times a dry run and collections a grace period apart (30-day retention, which
//! expires 40 % of the versions, then 10-day retention, which leaves the pack mostly dead and
//! repacks it), with the process's peak memory after each step.
//! Prints a Markdown table.
//!
//! `cargo run --release --example gcbench -p shoal-coordinator -- [VERSIONS] [PATHS]`

use std::time::{Duration, Instant};

use shoal_coordinator::chunks::ChunkStore;
use shoal_coordinator::gc::{self, Policy};
use shoal_coordinator::store::Store;
use shoal_protocol::api::CommitResponse;
use shoal_protocol::{ChunkId, ChunkRef, CommitId, DeviceId, Entry, EntryKind, Manifest, SyncPath};

fn peak_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let versions = args.first().copied().unwrap_or(100_000);
    let paths = args.get(1).copied().unwrap_or(10_000).max(1);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(&dir.path().join("meta")).expect("opening the store");
    let chunks = ChunkStore::open_local(&dir.path().join("chunks"), store.clone()).expect("opening the chunk store");
    let user = 1;
    let now = shoal_sys::clock::now_ms();
    let day = 24 * 3600 * 1000;
    let span = 60 * day;

    let t = Instant::now();
    let mut heads: Vec<Option<u64>> = vec![None; paths as usize];
    let mut seq = 0u64;
    let mut commit = 0u64;
    while seq < versions {
        let n = (versions - seq).min(1000);
        let mut data = Vec::with_capacity(n as usize);
        let mut entries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            seq += 1;
            let mut bytes = vec![0u8; 1024];
            bytes[..8].copy_from_slice(&seq.to_be_bytes());
            let id = ChunkId::of(&bytes);
            let p = (seq % paths) as usize;
            let path = SyncPath::parse(&format!("dir{}/file{p}.bin", p % 100)).expect("a valid path");
            entries.push(Entry {
                path,
                kind: EntryKind::File,
                manifest: Some(Manifest { size: 1024, hash: id, chunks: vec![ChunkRef { id, len: 1024 }] }),
                exec: false,
                mtime_ns: 0,
                deleted: false,
                version: seq,
                base: heads[p],
                device: DeviceId([1; 16]),
                time_ms: now - span + span * seq / versions,
            });
            heads[p] = Some(seq);
            data.push((id, bytes));
        }
        let refs: Vec<(ChunkId, &[u8])> = data.iter().map(|(id, b)| (*id, &b[..])).collect();
        chunks.put_many(&refs).expect("storing chunks");
        let ids: Vec<ChunkId> = data.iter().map(|(id, _)| *id).collect();
        store.chunks_stored(user, &ids).expect("recording chunks");
        chunks.sync().expect("syncing chunks");
        commit += 1;
        let mut cid = [0u8; 16];
        cid[..8].copy_from_slice(&commit.to_be_bytes());
        store.append(user, &CommitId(cid), &CommitResponse { entries }, &[]).expect("appending");
    }
    store.flush_blocking().expect("flushing");
    let fill = t.elapsed();
    let filled_peak = peak_mib();

    let keep =
        |days: u64| Policy { keep: Some(Duration::from_secs(days * 24 * 3600)), grace: Duration::from_secs(3600) };
    let hour = 3600 * 1000;
    let mut rows = Vec::new();
    for (what, days, at, dry) in [
        ("dry run", 30, now, true),
        ("collection 1 (condemns)", 30, now, false),
        ("collection 2, past the grace period (deletes)", 30, now + 2 * hour, false),
        ("collection 3, retention cut to 10 days (condemns)", 10, now + 4 * hour, false),
        ("collection 4, past the grace period (deletes, repacks)", 10, now + 6 * hour, false),
        ("collection 5, past the grace period (deletes the emptied pack)", 10, now + 8 * hour, false),
    ] {
        let t = Instant::now();
        let r = gc::collect(&store, &chunks, &keep(days), at, dry).expect("collecting");
        rows.push((what, t.elapsed(), peak_mib(), r));
    }
    println!("Store: {versions} versions of {paths} files, one 1 KiB chunk each, over 60 days");
    println!("Filling it took {:.1} s; peak RSS after filling: {filled_peak} MiB", fill.as_secs_f64());
    println!();
    println!(
        "| step | time | peak RSS | versions expired | chunks unreferenced | condemned | deleted | packs repacked | chunks moved | bytes reclaimed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (what, took, peak, r) in rows {
        println!(
            "| {what} | {:.2} s | {peak} MiB | {} | {} | {} | {} | {} | {} | {} |",
            took.as_secs_f64(),
            r.versions_expired,
            r.chunks_unreferenced,
            r.chunks_condemned,
            r.chunks_deleted,
            r.packs_repacked,
            r.chunks_moved,
            r.bytes_reclaimed
        );
    }
}
