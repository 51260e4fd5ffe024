//! The thread-safe deduplicator: event → `event_id` → shard →
//! fingerprint → that shard's [`Table`].
//!
//! Each shard's table sits behind its own mutex, padded to its own cache
//! lines, so threads working on different shards never contend; a lock is
//! held for one check-and-insert (a few hundred nanoseconds at most, plus at
//! most one segment rebuild), never across I/O.

use std::borrow::Cow;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::engine::event::{self, EventError, EventErrorKind, Limits, Seen};
use crate::engine::fingerprint::Fingerprint;
use crate::engine::input::Format;
use crate::engine::key::KeySpec;
use crate::engine::pending::{Ledger, Settle};
use crate::engine::shard::shard_of;
use crate::engine::table::{MAX_WINDOW_MS, Table, Verdict};

/// Settings of the engine. The sidecar's `config` module fills these from its
/// configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Rolling window in milliseconds, 1 ms to 7 days. Default 7 days.
    pub window_ms: u64,
    /// Shard count, 1 to 65 536. Default 32; must match the server's
    /// `partition(n,1)` mapping and every other sidecar.
    pub shards: u32,
    /// Table segments per shard. Default 2048, which with 32 shards makes
    /// the 65 536 segments the false-duplicate bound needs (see
    /// [`crate::engine::fingerprint::segments_per_shard`]).
    pub segments_per_shard: usize,
    /// Event and id size limits.
    pub limits: Limits,
    /// What makes two events the same. Default the top-level `event_id`.
    pub key: KeySpec,
    /// Top-level fields the stages read, read with the key of a batch's
    /// lines (see [`crate::engine::batch::Decision::seen`]). Default none.
    pub capture: Vec<String>,
    /// The top-level field whose value places an event in a shard; `None`
    /// (default): the key.
    pub shard_key: Option<String>,
    /// JSON (default) or protobuf messages of a schema.
    pub format: Format,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            window_ms: MAX_WINDOW_MS,
            shards: 32,
            segments_per_shard: 2048,
            limits: Limits::default(),
            key: KeySpec::default(),
            capture: Vec::new(),
            shard_key: None,
            format: Format::Json,
        }
    }
}

/// Why an event could not be ingested. A duplicate is a verdict, not an error.
#[derive(Debug)]
pub enum IngestError {
    /// The event breaks a rule of the `event` module; nothing was stored.
    Invalid(EventError),
}

impl std::fmt::Display for IngestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IngestError::Invalid(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for IngestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            IngestError::Invalid(e) => Some(e),
        }
    }
}

impl From<EventError> for IngestError {
    fn from(e: EventError) -> Self {
        IngestError::Invalid(e)
    }
}

/// An event that passed validation: where it belongs and what it hashes to.
#[derive(Debug, Clone)]
pub struct Keyed<'a> {
    pub id: Cow<'a, str>,
    pub shard: u32,
    pub fingerprint: Fingerprint,
}

/// An accepted id as the journal keeps it: enough to rebuild its shard's
/// table after a restart or on another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub shard: u32,
    /// When it was accepted, ms since the Unix epoch.
    pub born_ms: u64,
    pub fingerprint: Fingerprint,
}

/// One shard's table on its own cache lines.
#[repr(align(128))]
struct Shard {
    table: Mutex<Locked>,
}

/// What one shard's lock guards: its table, and the ids of it decided new
/// whose commit is pending (see [`crate::engine::pending`]). Derefs to the
/// table.
pub struct Locked {
    table: Table,
    pending: Ledger,
}

impl Deref for Locked {
    type Target = Table;

    fn deref(&self) -> &Table {
        &self.table
    }
}

impl DerefMut for Locked {
    fn deref_mut(&mut self) -> &mut Table {
        &mut self.table
    }
}

impl Locked {
    /// Ids decided new whose commit has not completed.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Forgets every id of the shard, pending ones included.
    pub fn clear(&mut self) {
        self.table.clear();
        self.pending.clear();
    }
}

/// A check-and-insert's answer when commits may be pending.
#[derive(Debug)]
pub enum Checked {
    /// New; remembered from now. With the cell its commit completes when
    /// the caller tracks commits.
    New(Option<Arc<Settle>>),
    /// Remembered, and durable (or the caller keeps nothing durable).
    Duplicate,
    /// Remembered, but the commit of its first copy has not succeeded (yet):
    /// the duplicate's answer is that commit's outcome.
    Twin(Arc<Settle>),
    /// The sealed tier could not tell (a file damaged or unreadable): no
    /// verdict; nothing changed.
    Unreadable(String),
}

/// What the sealed tier holds and what its lookups cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierFigures {
    pub ids: u64,
    pub generations: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub filter_probes: u64,
    pub block_reads: u64,
}

/// Ids moved out of the tables into the sealed tier (`tier = "tiered"`):
/// a shard's check consults it under the shard's lock, before the table,
/// so that an id moving from the table to it is never missed by both.
pub trait Older: Send + Sync {
    /// When `fp` of `shard` last arrived, if it is held with an arrival at
    /// or after `horizon_ms`. Ids in it are durable.
    ///
    /// # Errors
    ///
    /// Why it cannot tell (a damaged or unreadable file).
    fn born_ms(&self, shard: u32, fp: Fingerprint, horizon_ms: u64) -> Result<Option<u64>, String>;

    /// Bytes of RAM it holds.
    fn memory_bytes(&self) -> usize;

    /// What it holds and what its lookups cost so far.
    fn figures(&self) -> TierFigures;

    /// [`Self::born_ms`] for each of `fps` of one shard, appended to `out`
    /// in order (an implementation may overlap their memory accesses).
    ///
    /// # Errors
    ///
    /// As [`Self::born_ms`].
    fn born_many(
        &self,
        shard: u32,
        fps: &[Fingerprint],
        horizon_ms: u64,
        out: &mut Vec<Option<u64>>,
    ) -> Result<(), String>;

    /// Hides the arrivals of `(shard, fp)` at or before `at_ms`: the id
    /// was forgotten then (durably, in the journal).
    fn forget(&self, shard: u32, fp: Fingerprint, at_ms: u64);
}

/// Sealed ids born before this are out of `table`'s window in force at
/// `now_ms`.
fn sealed_horizon(table: &Table, now_ms: u64) -> u64 {
    (now_ms + 1).saturating_sub(table.window_in_force(now_ms))
}

/// The verdicts of `fps` of `shard` with a sealed tier: those `older`
/// holds are duplicates, the others go to `table`, in order.
fn check_sealed_first(
    older: &dyn Older,
    table: &mut Table,
    (shard, fps): (u32, &[Fingerprint]),
    now_ms: u64,
    out: &mut Vec<Verdict>,
) -> Result<(), String> {
    let mut born = Vec::with_capacity(fps.len());
    older.born_many(shard, fps, sealed_horizon(table, now_ms), &mut born)?;
    let fresh: Vec<Fingerprint> = fps
        .iter()
        .zip(&born)
        .filter(|(_, b)| b.is_none())
        .map(|(fp, _)| *fp)
        .collect();
    let mut decided = Vec::with_capacity(fresh.len());
    table.check_and_insert_batch(&fresh, now_ms, &mut decided);
    let mut decided = decided.into_iter();
    out.extend(born.iter().map(|b| match b {
        Some(_) => Verdict::Duplicate,
        None => decided.next().expect("a verdict per id not sealed"),
    }));
    Ok(())
}

/// Segments [`Deduplicator::live`] counts per lock of a shard.
pub const LIVE_SEGMENTS_PER_LOCK: usize = 16;

/// Every how many check-and-inserts a shard sweeps one segment.
const SWEEP_EVERY: u32 = 256;

/// The deduplicator: `Send + Sync`, shared by reference between threads.
pub struct Deduplicator {
    shards: Box<[Shard]>,
    config: EngineConfig,
    /// Where [`EngineConfig::shard_key`] is in `capture`, when it is read
    /// with the key.
    shard_at: Option<usize>,
    /// The sealed tier, when there is one.
    older: std::sync::OnceLock<Arc<dyn Older>>,
    /// Ids born before this are in the sealed tier, not the tables.
    sealed_cut: std::sync::atomic::AtomicU64,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Deduplicator {
    /// An empty deduplicator.
    ///
    /// # Panics
    ///
    /// If the window is not in `1..=7 days` or there are no shards; the
    /// `config` module rejects such settings with a message first.
    pub fn new(mut config: EngineConfig) -> Self {
        assert!(config.shards > 0, "shard count must be positive");
        // The shard key is read with the key, in the same pass, where the
        // key is read so (a top-level field).
        let with_key = matches!(config.key, KeySpec::Field(_)) || config.format.is_protobuf();
        let shard_at = match &config.shard_key {
            Some(field) if with_key => Some(match config.capture.iter().position(|c| c == field) {
                Some(at) => at,
                None => {
                    config.capture.push(field.clone());
                    config.capture.len() - 1
                }
            }),
            _ => None,
        };
        let shards = (0..config.shards)
            .map(|_| Shard {
                table: Mutex::new(Locked {
                    table: Table::new(config.window_ms, config.segments_per_shard),
                    pending: Ledger::default(),
                }),
            })
            .collect();
        Self {
            shards,
            config,
            shard_at,
            older: std::sync::OnceLock::new(),
            sealed_cut: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Puts the sealed tier behind the tables (once, before the first
    /// verdict).
    pub fn set_older(&self, older: Arc<dyn Older>) {
        let _ = self.older.set(older);
    }

    /// When `fp` of `shard` arrived, if the sealed tier holds it alive at
    /// `now_ms` (with the window in force of `table`); `Ok(None)` without a
    /// sealed tier.
    fn sealed_born(
        &self,
        table: &Table,
        shard: u32,
        fp: Fingerprint,
        now_ms: u64,
    ) -> Result<Option<u64>, String> {
        match self.older.get() {
            None => Ok(None),
            Some(older) => older.born_ms(shard, fp, sealed_horizon(table, now_ms)),
        }
    }

    /// When `fp` of `shard` arrived, if it is remembered at `now_ms`, in
    /// the table or the sealed tier; changes nothing.
    ///
    /// # Errors
    ///
    /// The sealed tier could not tell.
    pub fn born_ms(&self, shard: u32, fp: Fingerprint, now_ms: u64) -> Result<Option<u64>, String> {
        let table = self.table(shard);
        match table.born_ms(fp, now_ms) {
            Some(born) => Ok(Some(born)),
            None => self.sealed_born(&table, shard, fp, now_ms),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn shard_count(&self) -> u32 {
        self.config.shards
    }

    /// `true` if `event` is new within the window (and is now remembered),
    /// `false` if its `event_id` was accepted within the window.
    ///
    /// # Errors
    ///
    /// [`IngestError::Invalid`] when the event breaks a rule; nothing changes.
    pub fn ingest_event(&self, event: &str) -> Result<bool, IngestError> {
        let keyed = self.key(event.as_bytes())?;
        Ok(self.check_and_insert(&keyed, unix_ms()).is_new())
    }

    /// Validates `event` and computes its shard and fingerprint.
    ///
    /// # Errors
    ///
    /// The [`EventError`] of the first rule the event breaks.
    pub fn key<'a>(&self, event: &'a [u8]) -> Result<Keyed<'a>, EventError> {
        let id = self
            .config
            .format
            .id_of(&self.config.key, event, &self.config.limits)?;
        Ok(Keyed {
            shard: self.shard(event, &id)?,
            fingerprint: Fingerprint::of(id.as_bytes()),
            id,
        })
    }

    /// The shard of `event`, whose id is `id`: by the id, or by the value
    /// of [`EngineConfig::shard_key`].
    ///
    /// # Errors
    ///
    /// The shard key's field is missing or not a valid id.
    fn shard(&self, event: &[u8], id: &str) -> Result<u32, EventError> {
        match &self.config.shard_key {
            None => Ok(shard_of(id, self.config.shards)),
            Some(field) => {
                let value = self.config.format.id_field(event, field, &self.config.limits)?;
                Ok(shard_of(&value, self.config.shards))
            }
        }
    }

    /// Whether events are placed by a field of their own rather than by
    /// their key.
    pub fn shards_by_field(&self) -> bool {
        self.config.shard_key.is_some()
    }

    /// As [`Self::key`], and reads the fields [`EngineConfig::capture`]
    /// into `seen` (one each) in the same pass; returns whether it did.
    ///
    /// # Errors
    ///
    /// As [`Self::key`].
    pub fn key_capturing<'a>(
        &self,
        event: &'a [u8],
        seen: &mut [Seen],
    ) -> Result<(Keyed<'a>, bool), EventError> {
        let (id, captured) = self.config.format.id_capturing(
            &self.config.key,
            event,
            &self.config.limits,
            &self.config.capture,
            seen,
        )?;
        let shard = match (self.shard_at.map(|at| seen[at]), captured) {
            (Some(Seen::Text { start, end }), true) => {
                let value = std::str::from_utf8(&event[start as usize..end as usize])
                    .map_err(|_| EventError::new(EventErrorKind::IdInvalidChars))?;
                let field = self.config.shard_key.as_deref().unwrap_or_default();
                event::validate_id(value, &self.config.limits).map_err(|e| e.about(field))?;
                shard_of(value, self.config.shards)
            }
            // Missing, escaped or not text: read again, for its error.
            _ => self.shard(event, &id)?,
        };
        let keyed = Keyed {
            shard,
            fingerprint: Fingerprint::of(id.as_bytes()),
            id,
        };
        Ok((keyed, captured))
    }

    /// Validates a bare `event_id` (as in a look-up subject), and the
    /// value of its shard key if it has one of its own (`placed_by`), and
    /// computes its shard and fingerprint.
    ///
    /// # Errors
    ///
    /// The [`EventError`] of the id rule it breaks, or a shard key's value
    /// missing (or given without [`EngineConfig::shard_key`]).
    pub fn key_of_id<'a>(&self, id: &'a str, placed_by: Option<&str>) -> Result<Keyed<'a>, EventError> {
        event::validate_id(id, &self.config.limits)?;
        let shard = match (&self.config.shard_key, placed_by) {
            (None, None) => shard_of(id, self.config.shards),
            (Some(_), Some(value)) => {
                event::validate_id(value, &self.config.limits)?;
                shard_of(value, self.config.shards)
            }
            (Some(field), None) => {
                return Err(EventError::new(EventErrorKind::MissingId).about(field).because(
                    "events are sharded by it: give its value before the id (<prefix>.lookup.<value>.<id>)",
                ));
            }
            (None, Some(_)) => {
                return Err(EventError::new(EventErrorKind::IdInvalidChars)
                    .because("events are sharded by their key (no shard_key): give the id alone"));
            }
        };
        Ok(Keyed {
            shard,
            fingerprint: Fingerprint::of(id.as_bytes()),
            id: id.into(),
        })
    }

    /// The verdict for an already keyed event at `now_ms`.
    pub fn check_and_insert(&self, keyed: &Keyed<'_>, now_ms: u64) -> Verdict {
        self.check_and_insert_fp(keyed.shard, keyed.fingerprint, now_ms)
    }

    /// The verdict for a fingerprint in a shard at `now_ms`; every
    /// `SWEEP_EVERY` calls the shard also reclaims one segment.
    pub fn check_and_insert_fp(&self, shard: u32, fp: Fingerprint, now_ms: u64) -> Verdict {
        let mut table = self.table(shard);
        let verdict = table.check_and_insert(fp, now_ms);
        // The low bits of the tag are uniform: sweep on about 1 in SWEEP_EVERY calls.
        if (fp.lo as u32).is_multiple_of(SWEEP_EVERY) {
            table.sweep(now_ms, 1);
        }
        verdict
    }

    /// As [`Self::check_and_insert`], for a caller whose new ids become
    /// durable later: with `track`, a new id is recorded as pending with a
    /// fresh [`Settle`] cell (returned) that its commit must complete, and a
    /// duplicate of a pending id is a [`Checked::Twin`].
    pub fn check_and_insert_tracked(&self, keyed: &Keyed<'_>, now_ms: u64, track: bool) -> Checked {
        let (shard, fp) = (keyed.shard, keyed.fingerprint);
        let mut locked = self.table(shard);
        let Locked { table, pending } = &mut *locked;
        if track {
            pending.prune(|fp| {
                table.remove(fp);
            });
        }
        match self.sealed_born(table, shard, fp, now_ms) {
            Ok(None) => {}
            Ok(Some(_)) => return Checked::Duplicate,
            Err(why) => return Checked::Unreadable(why),
        }
        let verdict = table.check_and_insert(fp, now_ms);
        if (fp.lo as u32).is_multiple_of(SWEEP_EVERY) {
            table.sweep(now_ms, 1);
        }
        match (verdict, track) {
            (Verdict::New, false) => Checked::New(None),
            (Verdict::Duplicate, false) => Checked::Duplicate,
            (Verdict::New, true) => {
                let settle = Settle::new(shard);
                pending.push(fp, &settle);
                Checked::New(Some(settle))
            }
            (Verdict::Duplicate, true) => match pending.twin_of(fp) {
                Some(settle) => Checked::Twin(settle),
                None => Checked::Duplicate,
            },
        }
    }

    /// The verdicts for many fingerprints of one shard, in order, under one
    /// lock (with prefetch); sweeps as [`Self::check_and_insert_fp`] would.
    /// With `settle`, the new ids are recorded as pending on that cell, and
    /// each duplicate of a pending id (this call's included) is appended to
    /// `twins` with its index in `fps` and the cell it waits for.
    ///
    /// # Errors
    ///
    /// The sealed tier could not tell for one of them: nothing changed.
    pub fn check_and_insert_many(
        &self,
        shard: u32,
        fps: &[Fingerprint],
        now_ms: u64,
        settle: Option<&Arc<Settle>>,
        out: &mut Vec<Verdict>,
        twins: &mut Vec<(usize, Arc<Settle>)>,
    ) -> Result<(), String> {
        let mut locked = self.table(shard);
        let Locked { table, pending } = &mut *locked;
        if settle.is_some() {
            pending.prune(|fp| {
                table.remove(fp);
            });
        }
        let first = out.len();
        match self.older.get() {
            Some(older) => check_sealed_first(older.as_ref(), table, (shard, fps), now_ms, out)?,
            None => table.check_and_insert_batch(fps, now_ms, out),
        }
        let sweeps = fps
            .iter()
            .filter(|fp| (fp.lo as u32).is_multiple_of(SWEEP_EVERY))
            .count();
        if sweeps > 0 {
            table.sweep(now_ms, sweeps);
        }
        let Some(settle) = settle else { return Ok(()) };
        for (i, (fp, verdict)) in fps.iter().zip(&out[first..]).enumerate() {
            match verdict {
                Verdict::New => pending.push(*fp, settle),
                Verdict::Duplicate if !pending.is_empty() => {
                    if let Some(cell) = pending.twin_of(*fp) {
                        twins.push((i, cell));
                    }
                }
                Verdict::Duplicate => {}
            }
        }
        Ok(())
    }

    /// Forgets an id whose commit `settle` failed, and its pending entry,
    /// under one lock: a twin sees either both or neither. Nothing if the
    /// entry was pruned already (the id was forgotten then, and the table
    /// may hold a later acceptance of it).
    pub fn forget_failed(&self, fp: Fingerprint, settle: &Arc<Settle>) {
        let mut locked = self.table(settle.shard());
        if locked.pending.remove(fp, settle) {
            locked.table.remove(fp);
        }
    }

    /// Forgets every id of one shard (see [`Table::clear`]), pending ones
    /// included.
    pub fn clear(&self, shard: u32) {
        self.table(shard).clear();
    }

    /// Locks one shard's table (recovering it if a panicking thread held it:
    /// the table has no invariant a panic between its operations can break).
    ///
    /// # Panics
    ///
    /// If `shard` is not below the shard count.
    pub fn table(&self, shard: u32) -> MutexGuard<'_, Locked> {
        self.shards[shard as usize]
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the window of every shard (a smaller one applies at once).
    ///
    /// # Panics
    ///
    /// If the window is not in `1..=7 days`.
    pub fn set_window(&self, window_ms: u64, now_ms: u64) {
        for shard in 0..self.config.shards {
            self.table(shard).set_window(window_ms, now_ms);
        }
    }

    /// Records that ids accepted before `ms` are no longer held, in every
    /// shard (see [`Table::held_since`]).
    pub fn held_since(&self, ms: u64) {
        for shard in 0..self.config.shards {
            self.table(shard).held_since(ms);
        }
    }

    /// The window set for the tables (all shards share it).
    pub fn window_ms(&self) -> u64 {
        self.table(0).window_ms()
    }

    /// The window in force at `now_ms` (see [`Table::window_in_force`]).
    pub fn window_in_force(&self, now_ms: u64) -> u64 {
        self.table(0).window_in_force(now_ms)
    }

    /// Reclaims up to `segments` segments in every shard; returns the count
    /// of entries reclaimed.
    pub fn sweep(&self, now_ms: u64, segments: usize) -> usize {
        (0..self.config.shards)
            .map(|s| self.table(s).sweep(now_ms, segments))
            .sum()
    }

    /// Slots in use across shards (live entries plus unreclaimed dead ones).
    pub fn len(&self) -> usize {
        (0..self.config.shards).map(|s| self.table(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ids alive at `now_ms` across shards: a scan of every table, taking
    /// each shard's lock for [`LIVE_SEGMENTS_PER_LOCK`] segments at a time so
    /// that verdicts on that shard wait microseconds, not the whole walk.
    pub fn live(&self, now_ms: u64) -> usize {
        let mut live = 0;
        for shard in 0..self.config.shards {
            let segments = self.table(shard).segments();
            for start in (0..segments).step_by(LIVE_SEGMENTS_PER_LOCK) {
                live += self
                    .table(shard)
                    .live_in(now_ms, start..start + LIVE_SEGMENTS_PER_LOCK);
            }
        }
        live
    }

    /// Heap bytes held by the tables, and by the sealed tier's filters if
    /// there is one.
    pub fn memory_bytes(&self) -> usize {
        self.table_bytes() + self.older.get().map_or(0, |o| o.memory_bytes())
    }

    /// Heap bytes held by the tables alone (the hot tier).
    pub fn table_bytes(&self) -> usize {
        (0..self.config.shards)
            .map(|s| self.table(s).memory_bytes())
            .sum()
    }

    /// Drops from every table the ids born before `ms`, which the sealed
    /// tier holds now.
    pub fn sealed_before(&self, ms: u64) {
        self.sealed_cut
            .fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
        for shard in 0..self.config.shards {
            self.table(shard).sealed_before(ms);
        }
    }

    /// The sealed tier's figures, if there is one.
    pub fn sealed_figures(&self) -> Option<TierFigures> {
        self.older.get().map(|o| o.figures())
    }

    /// Ids born before this are held by the sealed tier (0: none are).
    pub fn sealed_cut(&self) -> u64 {
        self.sealed_cut.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Forgets `fp` of `shard` as of `at_ms`, in its table and the sealed
    /// tier (an operator's `forget`, already journaled).
    pub fn forget(&self, shard: u32, fp: Fingerprint, at_ms: u64) {
        let mut table = self.table(shard);
        table.table.remove(fp);
        if let Some(older) = self.older.get() {
            older.forget(shard, fp, at_ms);
        }
    }

    /// Waits until every commit pending when it was called has completed,
    /// or `timeout` has passed; returns whether they all completed.
    pub fn wait_settled(&self, timeout: std::time::Duration) -> bool {
        let mut waiting: Vec<Arc<Settle>> = (0..self.config.shards)
            .flat_map(|s| self.table(s).pending.unsettled())
            .collect();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            waiting.retain(|s| s.get().is_none());
            if waiting.is_empty() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn small() -> Deduplicator {
        Deduplicator::new(EngineConfig {
            window_ms: 60_000,
            segments_per_shard: 16,
            ..EngineConfig::default()
        })
    }

    #[test]
    fn a_shard_key_places_events_by_its_value_on_both_paths_and_bad_values_are_named() {
        let d = Deduplicator::new(EngineConfig {
            window_ms: 60_000,
            segments_per_shard: 16,
            shard_key: Some("session_id".into()),
            ..EngineConfig::default()
        });
        let mut seen = vec![Seen::Missing; d.config().capture.len()];
        for event in [
            &br#"{"event_id":"e1","session_id":"s7"}"#[..],
            br#"{"session_id":"\u0073\u0037","event_id":"e2"}"#,
        ] {
            assert_eq!(d.key(event).unwrap().shard, shard_of("s7", 32));
            assert_eq!(
                d.key_capturing(event, &mut seen).unwrap().0.shard,
                shard_of("s7", 32)
            );
        }
        for (event, why) in [
            (&br#"{"event_id":"e3"}"#[..], "no top-level \"session_id\""),
            (
                br#"{"event_id":"e3","session_id":"a b"}"#,
                "\"session_id\" may only contain",
            ),
            (
                br#"{"event_id":"e3","session_id":7}"#,
                "\"session_id\" is not a string",
            ),
        ] {
            let single = d.key(event).unwrap_err().to_string();
            let batch = d.key_capturing(event, &mut seen).unwrap_err().to_string();
            assert!(single.contains(why) && batch.contains(why), "{single} / {batch}");
        }
        // Look-ups name the value.
        assert_eq!(d.key_of_id("e1", Some("s7")).unwrap().shard, shard_of("s7", 32));
        assert!(d.key_of_id("e1", None).is_err());
    }

    #[test]
    fn ingest_event_answers_new_then_duplicate() {
        let d = small();
        assert!(d.ingest_event(r#"{"event_id":"a1","v":1}"#).unwrap());
        assert!(!d.ingest_event(r#"{"v":2,"event_id":"a1"}"#).unwrap());
        assert!(
            !d.ingest_event(r#"{"event_id":"\u0061\u0031"}"#).unwrap(),
            "escaped form is the same id"
        );
        assert!(d.ingest_event(r#"{"event_id":"a2"}"#).unwrap());
    }

    #[test]
    fn bad_input_changes_nothing() {
        let d = small();
        for bad in ["", "{", "[]", r#"{"event_id":1}"#, r#"{"event_id":"a-1"}"#] {
            assert!(d.ingest_event(bad).is_err(), "{bad}");
        }
        assert!(d.is_empty());
    }

    #[test]
    fn keyed_events_use_the_partition_shard() {
        let d = small();
        assert_eq!(d.key(br#"{"event_id":"abc"}"#).unwrap().shard, 11);
    }

    #[test]
    fn concurrent_ingest_accepts_each_id_once() {
        let d = small();
        let accepted = AtomicUsize::new(0);
        let per_thread = 20_000usize;
        let distinct = 7 * 5_000 + per_thread;
        let per_id: Vec<AtomicUsize> = (0..distinct).map(|_| AtomicUsize::new(0)).collect();
        std::thread::scope(|s| {
            for t in 0..8usize {
                let (d, accepted, per_id) = (&d, &accepted, &per_id);
                s.spawn(move || {
                    // Overlapping ranges: thread t covers [t*5000, t*5000 + 20000).
                    for i in 0..per_thread {
                        let id = t * 5_000 + i;
                        if d.ingest_event(&format!(r#"{{"event_id":"id{id}"}}"#)).unwrap() {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            per_id[id].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert!(
            per_id.iter().all(|n| n.load(Ordering::Relaxed) == 1),
            "an id accepted twice or never"
        );
        assert_eq!(accepted.load(Ordering::Relaxed), distinct);
        assert_eq!(d.len(), distinct);
    }

    #[test]
    fn deduplicator_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Deduplicator>();
    }
}
