//! eventsieve: an event-deduplication sidecar for NATS JetStream.
//!
//! Producers send JSON events (each with a string `event_id`) as NATS
//! requests (or HTTP posts); eventsieve answers whether the id is new within a rolling window
//! and republishes new events for downstream consumers.
//!
//! The layers, from the bottom up; each imports only those listed above it:
//!
//! | module | role |
//! |---|---|
//! | [`engine`] | the pure core: event parsing, shard, fingerprint, table, batch format, [`Deduplicator`] |
//! | [`observe`] | counters, the Prometheus endpoint, logging |
//! | [`journal`] | the durable log of accepted ids (trait, LMDB, in-memory) and its group-commit writer |
//! | [`pipeline`] | the verdict path without transport: ownership → check-and-insert → commit → accepted hook |
//! | [`transport`] | NATS subscriptions, replies, forwarding, republish (core or JetStream), fences, discovery; the HTTP gateway |
//! | [`cluster`] | `durability = "replicated"`: shard leases in the KV bucket, the JetStream journal, takeover and handover |
//! | [`service`] | the composition root: start in order, stop in order |
//! | [`cli`] | the `eventsieve` command line |
//!
//! [`config`] (figment: defaults < TOML file < `EVENTSIEVE_*` variables)
//! reads only engine types; the transport and the service read it.
//!
//! A request's way: `transport::nats::subscription` receives it →
//! `pipeline::Pipeline::decide` keys it (`engine::event`), checks ownership
//! (`pipeline::ownership`) and the table (`engine::table`) → the writer
//! (`journal::writer`) commits it to the journal (`journal::lmdb`) →
//! `pipeline::Pipeline::finish` calls the hook (republish) → the
//! subscription replies.
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

pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod engine;
pub mod journal;
pub mod nats;
pub mod observe;
pub mod output;
pub mod pipeline;
pub mod service;
pub mod shared;
pub mod stages;
pub mod transport;

pub use engine::{Deduplicator, EngineConfig, IngestError, Verdict};
