//! Thin adapters between the outside world and the [`crate::pipeline`]:
//! they receive requests, hand them to the pipeline, and turn its outcomes
//! into replies: [`nats`], and [`http`] beside it (which reaches other
//! nodes through NATS).

pub mod budget;
pub mod http;
pub mod nats;
