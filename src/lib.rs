//! eventsieve: an event-deduplication sidecar for NATS JetStream.
//!
//! Producers send JSON events (each with a string `event_id`) as NATS
//! requests; eventsieve answers whether the id is new within a rolling window
//! and republishes new events for downstream consumers.
//!
//! The crate is a pure core with a thin async shell:
//!
//! | module | role |
//! |---|---|
//! | [`event`] | find and validate the top-level `event_id`, no DOM |
//! | [`shard`] | `FNV-1a-32(id) mod n`, the NATS `partition` function |
//! | [`fingerprint`] | the stable 128-bit hash of an id |
//! | [`table`] | one shard's hash-to-expiry table: check-and-insert, reclaim |
//! | [`batch`] | the newline-delimited batch request and its verdict-per-line reply |
//! | [`engine`] | [`Deduplicator`]: the thread-safe library API over all shards |
//! | [`store`] | LMDB durable log of accepted ids: group commit, range expiry |
//! | [`config`] | figment: defaults < TOML file < `EVENTSIEVE_*` variables |
//! | [`service`] | the NATS sidecar: subscriptions, replies, republish, commit task |
//! | [`discovery`] | `$SRV.PING/INFO/STATS` answers for `nats micro` |
//! | [`metrics`] | counters and the Prometheus endpoint |
//! | [`telemetry`] | logging and the shutdown signal |
//! | [`cli`] | the `eventsieve` command line |
//!
//! The engine alone, without NATS:
//!
//! ```
//! use eventsieve::{Deduplicator, EngineConfig};
//!
//! let dedup = Deduplicator::new(EngineConfig::default());
//! assert!(dedup.ingest_event(r#"{"event_id":"a1","n":1}"#).unwrap());
//! assert!(!dedup.ingest_event(r#"{"n":2,"event_id":"a1"}"#).unwrap());
//! assert!(dedup.ingest_event(r#"{"event_id":"a-1"}"#).is_err());
//! ```

pub mod batch;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod engine;
pub mod event;
pub mod fingerprint;
pub mod metrics;
pub mod service;
pub mod shard;
pub mod store;
pub mod table;
pub mod telemetry;

pub use engine::{Deduplicator, EngineConfig, IngestError};
pub use table::Verdict;
