//! Chunker benchmarks, run by `bench/run`:
//! - `chunkbench throughput FILE`: chunk + BLAKE3 (per chunk and whole file) of FILE, read from
//!   the page cache; prints GiB/s (best of three).
//! - `chunkbench params`: for several FastCDC parameter sets, the chunk count per GiB and the new
//!   chunk bytes after small edits (insert, overwrite, delete) in a 64 MiB file: the trade-off
//!   behind `CHUNK_PARAMS`.

use std::time::Instant;

use shoal_protocol::testdata::noise;
use shoal_protocol::{ChunkParams, Chunker};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("throughput") => throughput(args.get(2).expect("FILE")),
        Some("params") => params(),
        _ => eprintln!("usage: chunkbench throughput FILE | chunkbench params"),
    }
}

fn throughput(path: &str) {
    let size = std::fs::metadata(path).expect("file").len();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let f = std::fs::File::open(path).expect("open");
        let t = Instant::now();
        let m = Chunker::default().manifest(f).expect("chunk");
        best = best.min(t.elapsed().as_secs_f64());
        assert_eq!(m.size, size);
    }
    println!("{:.2}", size as f64 / best / (1u64 << 30) as f64);
}

/// New chunk bytes needed to sync `new` when `old` is already stored.
fn delta(c: &Chunker, old: &[u8], new: &[u8]) -> u64 {
    let known: std::collections::HashSet<_> = c.manifest(old).unwrap().chunks.into_iter().map(|c| c.id).collect();
    c.manifest(new).unwrap().chunks.iter().filter(|c| !known.contains(&c.id)).map(|c| u64::from(c.len)).sum()
}

/// One position's edited versions: (offset, 1 KiB insert, 4 KiB overwrite, 10 KB delete).
type Edits = (usize, Vec<u8>, Vec<u8>, Vec<u8>);

/// Average new-chunk bytes over edits at `TRIES` positions.
const TRIES: usize = 16;

fn params() {
    let base = noise(1, 64 << 20);
    let edits: Vec<Edits> = (0..TRIES)
        .map(|i| {
            let at = (base.len() - 20_000) / TRIES * i + 7919 * i;
            let mut insert = base[..at].to_vec();
            insert.extend_from_slice(&noise(2 + i as u64, 1024));
            insert.extend_from_slice(&base[at..]);
            let mut overwrite = base.clone();
            overwrite[at..at + 4096].copy_from_slice(&noise(100 + i as u64, 4096));
            let mut delete = base[..at].to_vec();
            delete.extend_from_slice(&base[at + 10_000..]);
            (at, insert, overwrite, delete)
        })
        .collect();
    println!("| min / avg / max | chunks per GiB | 1 KiB insert | 4 KiB overwrite | 10 KB delete |");
    println!("|---|---|---|---|---|");
    for (min, avg, max) in [(4, 16, 64), (8, 32, 128), (16, 64, 256), (32, 128, 512), (64, 256, 1024)] {
        let p = ChunkParams { min: min * 1024, avg: avg * 1024, max: max * 1024 };
        let c = Chunker::with_params(p);
        let n = c.manifest(&base[..]).unwrap().chunks.len() as u64 * 16;
        let mean = |k: usize| {
            let total: u64 = edits
                .iter()
                .map(|e| {
                    delta(
                        &c,
                        &base,
                        match k {
                            0 => &e.1,
                            1 => &e.2,
                            _ => &e.3,
                        },
                    )
                })
                .sum();
            format!("{:.0} KiB", total as f64 / TRIES as f64 / 1024.0)
        };
        println!("| {min}K / {avg}K / {max}K | {n} | {} | {} | {} |", mean(0), mean(1), mean(2));
    }
}
