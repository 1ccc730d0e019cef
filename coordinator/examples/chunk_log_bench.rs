//! The coordinator's chunk records as they grow: records N chunks (default 1,000,000) as an
//! upload does (stored in the chunk store, then the user's), 256 at a time, and prints the time
//! per 100,000, then how long opening the store again takes (the chunk log is replayed into
//! memory on open) and the memory it then holds (the process's, with a store it no longer uses
//! dropped before). Flat rows mean a record's cost does not grow
//! with their number.
//!
//! `cargo run --release -p shoal-coordinator --example chunk_log_bench [N]`

use std::time::Instant;

use shoal_coordinator::store::{ChunkLoc, Store};
use shoal_protocol::ChunkId;

fn main() -> anyhow::Result<()> {
    let n: u64 = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 1_000_000,
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("meta");
    let store = Store::open(&path)?;
    println!("| chunks recorded | seconds per 100,000 | RSS |\n|---|---|---|");
    let mut t = Instant::now();
    let mut i = 0u64;
    while i < n {
        let group: Vec<(ChunkId, ChunkLoc)> = (i..(i + 256).min(n))
            .map(|k| (ChunkId::of(&k.to_le_bytes()), ChunkLoc { pack: (k >> 20) as u32, offset: k * 1024, len: 1024 }))
            .collect();
        store.put_chunk_locs(&group)?;
        let ids: Vec<ChunkId> = group.iter().map(|(id, _)| *id).collect();
        store.chunks_stored(1, &ids)?;
        let before = i;
        i += group.len() as u64;
        if i / 100_000 != before / 100_000 || i == n {
            println!("| {i} | {:.2} | {} MiB |", t.elapsed().as_secs_f64(), shoal_sys::allocator::resident_mib());
            t = Instant::now();
        }
    }
    store.flush_blocking()?;
    drop(store);
    let before = shoal_sys::allocator::resident_mib();
    let t = Instant::now();
    let store = Store::open(&path)?;
    let opened = t.elapsed();
    let probe = ChunkId::of(&(n / 2).to_le_bytes());
    anyhow::ensure!(store.user_has_chunk(1, &probe)? && store.chunk_loc(&probe)?.is_some(), "a chunk went missing");
    let after = shoal_sys::allocator::resident_mib();
    shoal_sys::allocator::release_free_memory();
    println!(
        "\nopened again in {:.2} s; RSS {before} MiB before, {after} MiB after, {} MiB once the allocator's free memory is released",
        opened.as_secs_f64(),
        shoal_sys::allocator::resident_mib()
    );
    Ok(())
}
