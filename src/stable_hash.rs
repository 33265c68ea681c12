//! FNV-1a (64-bit, its published constants): a hash that is the same on every build and
//! platform, unlike std's `DefaultHasher`, for what must never move: A/B arm assignment, eval
//! splits and per-question seeds. Eight lines did not warrant a dependency.

/// FNV-1a of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    #[test]
    fn published_values() {
        // The offset basis, and FNV-1a 64 of "a" and "foobar" from the reference tables.
        assert_eq!(super::fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
