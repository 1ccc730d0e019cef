//! The relay cache's eviction (whole segments, oldest first, a second chance for chunks read since
//! they were written) against exact least-recently-used and plain first-in-first-out eviction
//! of the same bytes, on seeded request traces: the real `Cache` on disk, the other two as
//! in-memory models. Prints a Markdown table of hit ratios and of the bytes the relay wrote per
//! byte it fetched (copies forward included). Run through `bench/relay_cache`.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use shoal_protocol::ChunkId;
use shoal_protocol::api::FRAME_HEADER;
use shoal_relay::cache::Cache;

const CHUNK: usize = 4096;
const CAP: u64 = 16 * 1024 * 1024;
const REQUESTS: usize = 200_000;

/// splitmix64: a small seeded generator, so every run sees the same traces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The bytes of chunk `n` of the universe.
fn chunk(n: u64) -> Bytes {
    let mut r = Rng(n.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let mut v = Vec::with_capacity(CHUNK);
    while v.len() < CHUNK {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    Bytes::from(v)
}

/// Requests drawn from a Zipf distribution (exponent `s`) over `n` chunks.
fn zipf(n: u64, s: f64, seed: u64) -> Vec<u64> {
    let mut cdf = Vec::with_capacity(n as usize);
    let mut sum = 0.0;
    for k in 1..=n {
        sum += 1.0 / (k as f64).powf(s);
        cdf.push(sum);
    }
    let mut r = Rng(seed);
    (0..REQUESTS)
        .map(|_| {
            let u = r.unit() * sum;
            cdf.partition_point(|c| *c < u) as u64
        })
        .collect()
}

/// A hot set of `hot` chunks asked for at random, each request with probability `p_hot`; the
/// others read chunks never asked for before (files fetched once, in order).
fn hot_and_scans(hot: u64, p_hot: f64, seed: u64) -> Vec<u64> {
    let mut r = Rng(seed);
    let mut fresh = hot;
    (0..REQUESTS)
        .map(|_| {
            if r.unit() < p_hot {
                r.below(hot)
            } else {
                fresh += 1;
                fresh
            }
        })
        .collect()
}

fn frame_bytes() -> u64 {
    (FRAME_HEADER + CHUNK) as u64
}

fn lru_hits(trace: &[u64]) -> usize {
    let slots = CAP / frame_bytes();
    let (mut at, mut order, mut hits) = (HashMap::new(), BTreeMap::new(), 0);
    for (tick, &n) in trace.iter().enumerate() {
        if let Some(old) = at.insert(n, tick) {
            order.remove(&old);
            hits += 1;
        } else if at.len() as u64 > slots
            && let Some((_, gone)) = order.pop_first()
        {
            at.remove(&gone);
        }
        order.insert(tick, n);
    }
    hits
}

fn fifo_hits(trace: &[u64]) -> usize {
    let slots = CAP / frame_bytes();
    let (mut held, mut queue, mut hits) = (std::collections::HashSet::new(), VecDeque::new(), 0);
    for &n in trace {
        if held.contains(&n) {
            hits += 1;
            continue;
        }
        if queue.len() as u64 >= slots
            && let Some(gone) = queue.pop_front()
        {
            held.remove(&gone);
        }
        held.insert(n);
        queue.push_back(n);
    }
    hits
}

/// Bytes this process has written with write(2) and friends so far.
fn written() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("wchar:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Hits of the relay's own cache, and the bytes it wrote per byte fetched.
fn relay_hits(trace: &[u64]) -> (usize, f64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = Cache::open(dir.path(), CAP).expect("cache");
    let mut ids: HashMap<u64, ChunkId> = HashMap::new();
    let (mut hits, mut fetched) = (0, 0u64);
    let before = written();
    for &n in trace {
        let id = *ids.entry(n).or_insert_with(|| ChunkId::of(&chunk(n)));
        if cache.read_frames(&[id])[0].is_some() {
            hits += 1;
        } else {
            cache.insert(&[(id, chunk(n))]).expect("insert");
            fetched += CHUNK as u64;
        }
    }
    (hits, (written() - before) as f64 / fetched.max(1) as f64)
}

fn main() {
    let universe = 4 * CAP / CHUNK as u64;
    let hot = (CAP * 5 / 8) / frame_bytes();
    let workloads: Vec<(String, Vec<u64>)> = vec![
        (format!("Zipf 0.8 over {universe} chunks (4x the cache)"), zipf(universe, 0.8, 1)),
        (format!("Zipf 1.0 over {universe} chunks"), zipf(universe, 1.0, 2)),
        (format!("uniform over {universe} chunks"), zipf(universe, 0.0, 3)),
        (
            format!("a hot set of {hot} chunks (5/8 of the cache) half the time, one-time reads the rest"),
            hot_and_scans(hot, 0.5, 4),
        ),
    ];
    println!("{REQUESTS} requests of {CHUNK}-byte chunks each, cache {} MiB (16 segments of 1 MiB)", CAP >> 20);
    println!();
    println!("| requests | exact LRU hits | FIFO hits | relay cache hits | relay bytes written per byte fetched |");
    println!("|---|---|---|---|---|");
    for (what, trace) in workloads {
        let pct = |h: usize| 100.0 * h as f64 / trace.len() as f64;
        let (relay, amp) = relay_hits(&trace);
        println!(
            "| {what} | {:.1}% | {:.1}% | {:.1}% | {amp:.2} |",
            pct(lru_hits(&trace)),
            pct(fifo_hits(&trace)),
            pct(relay)
        );
    }
}
