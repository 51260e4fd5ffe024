//! Thin adapters between the outside world and the [`crate::pipeline`]:
//! they receive requests, hand them to the pipeline, and turn its outcomes
//! into replies: [`nats`], and [`http`] beside it (which reaches other
//! nodes through NATS).

pub mod budget;
pub mod http;
pub mod nats;

/// The reply body of a new event, on every transport.
pub const ACCEPTED: &[u8] = br#"{"accepted":true}"#;
/// The reply body of a duplicate, on every transport.
pub const DUPLICATE: &[u8] = br#"{"accepted":false}"#;

/// The reason of a request refused because the bytes in flight are at
/// `max_inflight_bytes` (`total`): 503 on every transport.
pub fn overloaded(total: usize) -> String {
    format!("overloaded: max_inflight_bytes ({total}) are held by requests in progress; retry")
}
