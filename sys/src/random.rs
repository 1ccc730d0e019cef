//! Random names and secrets from the OS source (tokens, invite secrets, temp-file names).

/// `n` random bytes as hex (`2n` characters).
pub fn hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("the OS random source is available");
    shoal_protocol::ids::to_hex(&b)
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_has_two_characters_a_byte_and_differs_each_time() {
        let (a, b) = (super::hex(16), super::hex(16));
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
    }
}
