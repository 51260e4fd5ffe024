//! Thin adapters between the outside world and the [`crate::pipeline`]:
//! they receive requests, hand them to the pipeline, and turn its outcomes
//! into replies. [`nats`] today; HTTP will sit beside it.

pub mod budget;
pub mod nats;
