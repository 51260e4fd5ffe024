//! Many sidecars, one answer (`durability = "replicated"`): shard leases in
//! the KV bucket, the JetStream journal, takeover and handover.
//!
//! | module | role |
//! |---|---|
//! | [`lease`] | `shard.<n>` leases and `node.<id>` heartbeats in the KV bucket |
//! | [`keeper`] | this node's rounds: heartbeat, renew, catch up, hand over, take over |
//! | [`membership`] | what the keeper learns of the other nodes, for the aggregates |
//!
//! The journal the shards are replayed from is
//! [`crate::journal::stream`].
//!
//! Safety does not rest on the leases: an id is `true` only once the
//! journal took it on the sequence the node had replayed to (see
//! [`crate::journal::stream`]). Leases decide who *should* serve; the journal makes a
//! wrong belief cost 503s, never a doubled `true`. A node also stops
//! appending for a shard once its last renewal is older than two thirds of
//! the TTL, so a node paused past its lease (SIGSTOP, a long GC-like stall)
//! refuses on waking up instead of answering from a stale table.

pub mod keeper;
pub mod lease;
pub mod membership;

pub use keeper::{Keeper, OnStop};
pub use lease::{Holder, Lease, Leases};
pub use membership::Membership;
