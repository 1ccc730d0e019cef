//! The agent store's cost per indexed file as the folder grows: indexes N one-chunk files (default
//! 1,000,000) in batches of 1,000, as an initial scan does, and prints the time per 100,000, the
//! bytes the process wrote to disk meanwhile and its memory. Flat rows mean an edit's cost does
//! not grow with the folder.
//!
//! `cargo run --release -p shoal-agent --example chunk_map_bench [N]`

use shoal_agent::store::{Batch, IndexRec, Store};
use shoal_protocol::{ChunkId, ChunkRef, EntryKind, Manifest, SyncPath};
use std::time::Instant;

/// Bytes this process has caused to be written to storage so far.
fn written_mib() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let bytes = io.lines().find_map(|l| l.strip_prefix("write_bytes:")).and_then(|v| v.trim().parse::<u64>().ok());
    bytes.unwrap_or(0) >> 20
}

fn main() -> anyhow::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 1_000_000,
    };
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    println!("| files indexed | seconds per 100,000 | MiB written per 100,000 | RSS |\n|---|---|---|---|");
    let (mut t, start, mut written) = (Instant::now(), Instant::now(), written_mib());
    let mut i = 0usize;
    while i < n {
        let mut b = Batch::default();
        for _ in 0..1000.min(n - i) {
            let id = ChunkId::of(&i.to_le_bytes());
            let p = SyncPath::parse(&format!("tree/d{}/f{}", i / 100, i))?;
            let manifest = Manifest { size: 1024, hash: id, chunks: vec![ChunkRef { id, len: 1024 }] };
            let rec = IndexRec {
                kind: EntryKind::File,
                size: 1024,
                mtime_ns: 1,
                ctime_ns: 1,
                inode: i as u64,
                mode: 0o644,
                manifest: Some(manifest),
                hashed_ns: 2,
            };
            b.put_index(&p, &rec);
            i += 1;
        }
        store.apply(b)?;
        if i.is_multiple_of(100_000) || i == n {
            let now = written_mib();
            println!(
                "| {i} | {:.2} | {} | {} MiB |",
                t.elapsed().as_secs_f64(),
                now - written,
                shoal_sys::allocator::resident_mib()
            );
            (t, written) = (Instant::now(), now);
        }
    }
    println!("total {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
