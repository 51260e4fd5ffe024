//! The tables' upkeep while the sidecar runs: expired entries reclaimed a
//! few segments at a time, the tables held under `max_table_bytes`, and
//! (`tier = "tiered"`) their oldest ids sealed on disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::engine::{Deduplicator, unix_ms};
use crate::journal::JournalReader;
use crate::journal::sealed::{self, Sealed, Span};
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

/// How often the tables' size is held against `hot_bytes`, and the sealed
/// generations kept (expired ones dropped, small ones merged).
const SEAL_EVERY: Duration = Duration::from_secs(1);
/// Ids younger than this stay in the tables at a seal: the time between a
/// verdict reading the clock and its id entering the table and its
/// commit's queue is far below it.
pub const SEAL_MARGIN_MS: u64 = 2_000;
/// Longest a seal waits for the commits pending when it starts; past it
/// the seal is tried again at the next tick.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most sealed generations a new id's lookup probes (one filter each):
/// above it the newest ones of like size are merged.
pub const MAX_GENERATIONS: usize = 8;

/// The tiered table's upkeep (`tier = "tiered"`): once the tables take
/// more than `hot_bytes`, the ids older than [`SEAL_MARGIN_MS`] are sealed
/// into a new generation built from the journal, then dropped from the
/// tables; damaged generations are rebuilt from the journal. Expired ones
/// are deleted and small ones merged by [`merge_loop`].
pub async fn seal_loop(
    dedup: Arc<Deduplicator>,
    sealed: Arc<Sealed>,
    reader: Arc<dyn JournalReader>,
    hot_bytes: usize,
) {
    let mut tick = tokio::time::interval(SEAL_EVERY);
    loop {
        tick.tick().await;
        let (dedup, sealed, reader) = (dedup.clone(), sealed.clone(), reader.clone());
        let step =
            tokio::task::spawn_blocking(move || seal_step(&dedup, &sealed, reader.as_ref(), hot_bytes)).await;
        match step {
            Ok(Ok(Some((span, bytes_before, bytes_after, elapsed)))) => tracing::info!(
                message = "Sealed the oldest ids of the tables.",
                ids = span.ids,
                cut_ms = span.cut_ms,
                table_bytes_before = bytes_before,
                table_bytes_after = bytes_after,
                elapsed_ms = elapsed.as_millis() as u64,
            ),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::error!(message = "Sealing failed; tried again in a second.", error = %e)
            }
            Err(e) => tracing::error!(message = "The seal task panicked.", error = %e),
        }
    }
}

/// Rebuilds the generations `sealed` found damaged, from `reader`.
///
/// # Errors
///
/// The journal or the new file could not be read or written.
pub fn rebuild_damaged(sealed: &Sealed, reader: &dyn JournalReader, horizon_ms: u64) -> Result<(), String> {
    for (shard, cut) in sealed.take_damaged_adopted() {
        // Every id of the shard before the cut that the copy holds: what
        // the file held, and what the generations hold besides.
        let mut ids = Vec::new();
        reader
            .scan_span(horizon_ms, cut, &mut |r| {
                if r.shard == shard {
                    ids.push((r.fingerprint, r.born_ms));
                }
            })
            .map_err(|e| e.to_string())?;
        let rebuilt = sealed
            .rebuild_adopted(shard, cut, ids, horizon_ms)
            .map_err(|e| e.to_string())?;
        tracing::warn!(
            message = "Rebuilt a damaged adopted sealed file from the journal's local copy.",
            shard,
            cut_ms = cut,
            ids = rebuilt.map_or(0, |s| s.ids)
        );
    }
    for span in sealed.take_damaged() {
        let rebuilt = sealed.rebuild_journal(reader, span).map_err(|e| e.to_string())?;
        tracing::warn!(
            message = "Rebuilt a damaged sealed generation from the journal.",
            from_ms = rebuilt.from_ms,
            cut_ms = rebuilt.cut_ms,
            ids = rebuilt.ids
        );
    }
    Ok(())
}

/// One tick of [`seal_loop`]: what was sealed, the tables' bytes before and
/// after, and how long it took.
fn seal_step(
    dedup: &Deduplicator,
    sealed: &Sealed,
    reader: &dyn JournalReader,
    hot_bytes: usize,
) -> Result<Option<(Span, usize, usize, Duration)>, String> {
    let now = unix_ms();
    let horizon = (now + 1).saturating_sub(dedup.window_in_force(now));
    rebuild_damaged(sealed, reader, horizon)?;
    let before = dedup.table_bytes();
    let cut = now.saturating_sub(SEAL_MARGIN_MS);
    let mut done = None;
    if before > hot_bytes && cut > sealed.cut_ms() && dedup.wait_settled(SETTLE_TIMEOUT) {
        // No replay of a shard's journal runs from here until the tables
        // dropped what was sealed (see `Sealed::adopt`).
        let turn = sealed.turn().blocking_write();
        let started = std::time::Instant::now();
        let span = sealed
            .seal_journal(reader, horizon, cut)
            .map_err(|e| e.to_string())?;
        dedup.sealed_before(cut);
        drop(turn);
        sealed.save_summary_after_seal();
        dedup.sweep(now, dedup.config().segments_per_shard);
        done = Some((span, before, dedup.table_bytes(), started.elapsed()));
    }
    Ok(done)
}

/// The sealed generations kept (`tier = "tiered"`), beside [`seal_loop`]:
/// expired files deleted, small ones merged into larger ones. A merge of
/// large files takes minutes; seals go on meanwhile.
pub async fn merge_loop(dedup: Arc<Deduplicator>, sealed: Arc<Sealed>) {
    let mut tick = tokio::time::interval(SEAL_EVERY);
    loop {
        tick.tick().await;
        let (dedup, sealed) = (dedup.clone(), sealed.clone());
        let step = tokio::task::spawn_blocking(move || {
            let now = unix_ms();
            let horizon = (now + 1).saturating_sub(dedup.window_in_force(now));
            let started = std::time::Instant::now();
            let merges = sealed.merges.load(Relaxed);
            let removed = sealed.compact(horizon, MAX_GENERATIONS)?;
            Ok::<_, sealed::SealedError>((removed, sealed.merges.load(Relaxed) - merges, started.elapsed()))
        })
        .await;
        match step {
            Ok(Ok((removed, merges, elapsed))) if merges > 0 => tracing::info!(
                message = "Merged sealed generations.",
                merges,
                files_removed = removed,
                elapsed_ms = elapsed.as_millis() as u64,
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(message = "Merging sealed generations failed; tried again in a second.", error = %e)
            }
            Err(e) => tracing::error!(message = "The merge task panicked.", error = %e),
        }
    }
}
