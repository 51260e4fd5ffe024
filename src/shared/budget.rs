//! The bytes of requests a sidecar holds at once (`max_inflight_bytes`).
//!
//! A transport takes a request's bytes from the budget when it receives the
//! request and gives them back once it has answered. When the budget is
//! spent the request is answered 503 (`overloaded`) at once and its bytes
//! are freed: producers that send faster than the sidecar answers get quick
//! refusals to retry, and memory stays bounded, instead of queues growing
//! until the server cuts the sidecar off as a slow consumer.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::observe::metrics::Metrics;

/// The budget; cheap to share.
pub struct Budget {
    permits: Arc<Semaphore>,
    total: usize,
    metrics: Arc<Metrics>,
}

/// Bytes taken from the budget, given back on drop.
pub struct Held {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    metrics: Arc<Metrics>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.metrics.inflight_bytes.fetch_sub(self.bytes, Relaxed);
    }
}

impl Budget {
    /// A budget of `total` bytes (at most `u32::MAX`).
    pub fn new(total: usize, metrics: Arc<Metrics>) -> Self {
        let total = total.min(u32::MAX as usize);
        Self {
            permits: Arc::new(Semaphore::new(total)),
            total,
            metrics,
        }
    }

    /// Takes `bytes` (at most the whole budget) if they are free now.
    pub fn try_hold(&self, bytes: usize) -> Option<Held> {
        let bytes = bytes.min(self.total);
        let permit = self.permits.clone().try_acquire_many_owned(bytes as u32).ok()?;
        self.metrics.inflight_bytes.fetch_add(bytes as u64, Relaxed);
        Some(Held {
            _permit: permit,
            bytes: bytes as u64,
            metrics: self.metrics.clone(),
        })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// The reason a request refused by this budget is answered with.
    pub fn refusal(&self) -> String {
        format!(
            "overloaded: max_inflight_bytes ({}) are held by requests in progress; retry",
            self.total
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_held_until_dropped_and_a_request_never_exceeds_the_whole() {
        let metrics = Arc::new(Metrics::default());
        let budget = Budget::new(100, metrics.clone());
        let a = budget.try_hold(60).unwrap();
        assert!(budget.try_hold(50).is_none());
        let b = budget.try_hold(40).unwrap();
        assert_eq!(metrics.inflight_bytes.load(Relaxed), 100);
        drop(a);
        assert!(budget.try_hold(1000).is_none(), "clamped to 100, 40 still held");
        drop(b);
        let whole = budget.try_hold(1000).expect("clamped to the whole budget");
        drop(whole);
        assert_eq!(metrics.inflight_bytes.load(Relaxed), 0);
    }
}
