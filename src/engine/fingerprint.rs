//! The stable fingerprint of an `event_id`: XXH3-128 (seed 0) of its bytes.
//!
//! The fingerprint is persisted and shared between nodes, so its function is
//! part of the store format ([`VERSION`]) and never changes; XXH3 is a
//! published, frozen algorithm with the same output on every platform.
//! (foldhash is used for in-memory maps only: its output is not promised
//! stable between versions.)
//!
//! # False duplicates
//!
//! The table keeps 64 bits of the fingerprint per id (`lo`, the *tag*) and
//! uses the other 64 (`hi`) to pick one of the table's segments, which is
//! therefore implied by where an entry lives. A new id is judged a duplicate
//! by mistake only if some live id of the **same shard and segment** has the
//! same 64-bit tag. With `m` live ids in that segment the probability per
//! event is at most `m / 2^64`.
//!
//! A one-week window at one million unique ids per second is `6×10^11` ids;
//! take `10^12`. They are spread over `S` shards × `G` segments per shard
//! (defaults 32 × 2048 = 65 536 segments), so `m ≈ 10^12 / 65 536 ≈ 1.5×10^7`
//! and the probability per event is `1.5×10^7 / 1.8×10^19 ≈ 8.3×10^-13`,
//! within the `10^-12` budget. The rule for other deployments: keep
//! `m ≤ 1.8×10^7`, that is `S × G ≥ ids / 1.8×10^7`. At 10 M live ids per
//! node with the defaults, `m ≈ 150` and the probability is `≈ 8×10^-18`.
//! A flat set of 64-bit hashes would give `6×10^11 / 2^64 ≈ 3×10^-8`.
//!
//! [`segments_per_shard`] keeps `S × G ≥` [`TOTAL_SEGMENTS`] (65 536) for
//! any shard count, so the bound above holds whatever `S`: 2048 segments per
//! shard at 32 shards, 64 at 1 024, one at 65 536. Segments cost nothing
//! until their shard is first used.

use xxhash_rust::xxh3::xxh3_128;

/// Segments over all shards that keep the false-duplicate probability per
/// event within `10^-12` at `10^12` live ids (see the module docs).
pub const TOTAL_SEGMENTS: usize = 65_536;

/// Segments per shard for `shards` shards: at least [`TOTAL_SEGMENTS`] in
/// all, at least one each.
pub fn segments_per_shard(shards: u32) -> usize {
    TOTAL_SEGMENTS.div_ceil(shards.max(1) as usize)
}

/// Version of the fingerprint function, recorded in every store.
pub const VERSION: u32 = 1;

/// A 128-bit fingerprint split in two halves with separate roles: `hi`
/// chooses the table segment, `lo` is the tag stored in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint {
    pub hi: u64,
    pub lo: u64,
}

impl Fingerprint {
    /// The fingerprint of an event id.
    pub fn of(event_id: &[u8]) -> Self {
        let h = xxh3_128(event_id);
        Self {
            hi: (h >> 64) as u64,
            lo: h as u64,
        }
    }

    /// Big-endian bytes, the persisted form.
    pub fn to_bytes(self) -> [u8; 16] {
        ((u128::from(self.hi) << 64) | u128::from(self.lo)).to_be_bytes()
    }

    /// Inverse of [`Fingerprint::to_bytes`].
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        let h = u128::from_be_bytes(bytes);
        Self {
            hi: (h >> 64) as u64,
            lo: h as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_pinned() {
        // Golden values: a change here breaks every existing store.
        assert_eq!(Fingerprint::of(b"abc").to_bytes(), xxh3_128(b"abc").to_be_bytes());
        assert_eq!(
            Fingerprint::of(b"abc"),
            Fingerprint {
                hi: 0x06b0_5ab6_733a_6185,
                lo: 0x78af_5f94_892f_3950
            }
        );
    }

    #[test]
    fn bytes_round_trip() {
        let fp = Fingerprint::of(b"evt123");
        assert_eq!(Fingerprint::from_bytes(fp.to_bytes()), fp);
    }

    #[test]
    fn segments_keep_the_false_duplicate_rule_for_any_shard_count() {
        assert_eq!(segments_per_shard(32), 2048);
        assert_eq!(segments_per_shard(1024), 64);
        assert_eq!(segments_per_shard(65_536), 1);
        for shards in [1, 3, 7, 1000, 40_000, 65_536] {
            assert!(
                segments_per_shard(shards) * shards as usize >= TOTAL_SEGMENTS,
                "{shards}"
            );
        }
    }
}
