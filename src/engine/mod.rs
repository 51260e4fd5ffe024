//! The pure core: no I/O. Every decision takes `now` from its caller; only
//! [`unix_ms`] reads the clock, for callers and for the library's
//! convenience [`Deduplicator::ingest_event`].
//!
//! | module | role |
//! |---|---|
//! | [`event`] | find and validate the top-level `event_id`, no DOM |
//! | `scan` | the fast path of `event`: one pass over an event of the usual shape |
//! | [`shard`] | `FNV-1a-32(id) mod n`, the NATS `partition` function |
//! | [`fingerprint`] | the stable 128-bit hash of an id |
//! | [`table`] | one shard's hash-to-expiry table: check-and-insert, reclaim |
//! | [`dedup`] | [`Deduplicator`]: every shard's table behind its own lock |
//! | [`pending`] | ids decided new whose commit is pending, so that twins get its outcome |
//! | [`batch`] | the batch request (lines, or length-delimited messages) and its verdict-per-line reply |
//! | [`input`] | the format of events, JSON or protobuf: key, fields by name, batch framing |
//! | [`proto`] | a protobuf schema and the validating scan of the wire format |
//!
//! Nothing here imports from the layers above (journal, pipeline,
//! transport).

pub mod batch;
pub mod dedup;
pub mod event;
pub mod fingerprint;
pub mod input;
pub mod key;
pub mod pending;
pub mod proto;
mod scan;
pub mod shard;
pub mod table;

pub use dedup::{Checked, Deduplicator, EngineConfig, IngestError, Keyed, Record, unix_ms};
pub use table::Verdict;
