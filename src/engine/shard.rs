//! Which shard owns an event: `FNV-1a-32(event_id) mod n`.
//!
//! This is exactly the function behind nats-server's `{{partition(n,1)}}`
//! subject mapping (32-bit FNV-1a over the token's bytes, remainder by the
//! partition count), so a producer, the NATS server and every sidecar agree on
//! the owner of an id. It is part of the wire contract and never changes.

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// 32-bit FNV-1a of `bytes`.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(FNV_OFFSET, |h, &b| (h ^ u32::from(b)).wrapping_mul(FNV_PRIME))
}

/// The shard, in `0..shards`, that owns `event_id`.
///
/// # Panics
///
/// If `shards` is zero; configuration rejects that before any engine exists.
pub fn shard_of(event_id: &str, shards: u32) -> u32 {
    fnv1a32(event_id.as_bytes()) % shards
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a32_reference_values() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn matches_nats_partition_vectors() {
        // The same vectors are checked against a real nats-server mapping in tests/.
        for (id, want) in [
            ("abc", 11),
            ("evt123", 22),
            ("X9", 26),
            ("0", 15),
            ("zzzzzzzzzzzzzzzz", 5),
        ] {
            assert_eq!(shard_of(id, 32), want, "{id}");
        }
    }
}
