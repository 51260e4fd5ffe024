//! eventsieve: an event-deduplication sidecar for NATS JetStream.
//!
//! Producers send JSON events (each with a string `event_id`) as NATS
//! requests (or HTTP posts); eventsieve answers whether the id is new within a rolling window
//! and republishes new events for downstream consumers.
//!
//! The layers, from the bottom up. A module imports only from its own
//! layer and those above it in this table (`tests/layers.rs` holds the
//! code to it):
//!
//! | module | role |
//! |---|---|
//! | [`engine`] | the pure core: event parsing, shard, fingerprint, table, pending commits, batch format, [`Deduplicator`] |
//! | [`observe`] | counters, the Prometheus endpoint, logging |
//! | [`config`] | figment: defaults < TOML file < `EVENTSIEVE_*` variables, one file per section |
//! | [`nats`] | the connection to NATS: options and connecting, every subject, the KV bucket |
//! | [`journal`] | the durable log of accepted ids (trait, LMDB, in-memory, JetStream stream) and its group-commit writer |
//! | [`pipeline`] | the verdict path without transport: ownership → check-and-insert → commit → stages → output; the tables' upkeep |
//! | [`route`] | routing rules: CEL conditions, compiled or interpreted, the set in force swapped whole |
//! | [`output`] | where accepted events leave: core NATS after the commit, JetStream before it |
//! | [`shared`] | what the parts of a running sidecar share: pipeline, request budget, connection |
//! | [`transport`] | NATS subscriptions, replies, forwarding, fences, discovery; the HTTP gateway |
//! | [`cluster`] | `durability = "replicated"`: shard leases, the keeper's takeovers and handovers, membership |
//! | [`stages`] | stages over the accepted events: aggregates, their queries, snapshot and replicated pane log |
//! | [`control`] | the operator's commands at run time: window, status (responder and CLI side of each) |
//! | [`service`] | the composition root: start in order, stop in order |
//! | [`cli`] | the `eventsieve` command line |
//!
//! Two ways a request takes:
//!
//! - NATS, one event: `transport::subscription` receives it →
//!   `pipeline::Pipeline::decide` keys it (`engine::event`), checks
//!   ownership (`pipeline::ownership`) and the table (`engine::dedup`) → the
//!   writer (`journal::writer`) commits it to the journal (`journal::lmdb`)
//!   → `pipeline::Pipeline::finish` hands it to the stages (`stages`) and
//!   the output (`output::core_nats`) → `transport::subscription::answer`
//!   replies.
//! - HTTP: `transport::http` takes the post → the same `decide`/`finish`,
//!   or, for a shard owned elsewhere, `transport::forward::request` to its
//!   owner over NATS → a status code and the same body.
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
pub mod route;
pub mod service;
pub mod shared;
pub mod stages;
pub mod transport;

pub use engine::{Deduplicator, EngineConfig, IngestError, Verdict};
