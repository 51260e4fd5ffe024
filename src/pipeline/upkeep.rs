//! The tables' upkeep while the sidecar runs: expired entries reclaimed a
//! few segments at a time, and the tables held under `max_table_bytes`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::engine::{Deduplicator, unix_ms};
use crate::observe::metrics::Metrics;

/// How often expired table entries are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How often the tables' size is held against `max_table_bytes`.
const BUDGET_EVERY: Duration = Duration::from_millis(250);
/// The window is not halved below this.
const MIN_WINDOW_MS: u64 = 1000;

/// Keeps the tables under `max_bytes`: while they are over it the window in
/// force is halved (the oldest ids go first) and the dead entries are
/// reclaimed; once they are under half of it the window is set back to
/// the window set (`window_ms`, which may change at run time), which the
/// tables let grow only as far as the ids they still hold reach, so no
/// verdict claims an id they dropped.
pub async fn budget_loop(
    dedup: Arc<Deduplicator>,
    max_bytes: usize,
    window_ms: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(BUDGET_EVERY);
    loop {
        tick.tick().await;
        let dedup = dedup.clone();
        let window_ms = window_ms.load(Relaxed);
        let step = tokio::task::spawn_blocking(move || {
            let now = unix_ms();
            let bytes = dedup.memory_bytes();
            let in_force = dedup.window_in_force(now);
            if bytes > max_bytes && in_force > MIN_WINDOW_MS {
                let to = (in_force / 2).max(MIN_WINDOW_MS);
                dedup.set_window(to, now);
                dedup.sweep(now, dedup.config().segments_per_shard);
                Some((in_force, to, bytes, dedup.memory_bytes()))
            } else {
                if bytes < max_bytes / 2 && dedup.window_ms() < window_ms {
                    dedup.set_window(window_ms, now);
                }
                None
            }
        })
        .await;
        if let Ok(Some((from, to, before, after))) = step {
            Metrics::inc(&metrics.window_shrinks);
            tracing::warn!(
                message = "Tables over max_table_bytes: halved the window in force (oldest ids go first).",
                from_ms = from,
                to_ms = to,
                table_bytes_before = before,
                table_bytes_after = after,
                max_table_bytes = max_bytes,
            );
        }
    }
}

/// Reclaims expired table entries a few segments at a time.
pub async fn sweep_loop(dedup: Arc<Deduplicator>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        dedup.sweep(unix_ms(), 64);
    }
}
