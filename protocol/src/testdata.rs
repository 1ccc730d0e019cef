//! Deterministic pseudo-random bytes for tests and benchmarks (xorshift64*): the same seed gives
//! the same bytes on every machine, so snapshots and edits are reproducible without an RNG crate.

/// `len` pseudo-random bytes from `seed`.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}
