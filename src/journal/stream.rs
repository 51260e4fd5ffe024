//! The journal of `durability = "replicated"`: a JetStream stream with one
//! subject per shard (`<prefix>.journal.<n>`) and one message per shard
//! per group commit, holding the ids accepted (or forgotten) in it.
//!
//! Every append carries `Nats-Expected-Last-Subject-Sequence`: the stream
//! sequence of the shard's last message as this node last saw it. JetStream
//! refuses the append if anyone else appended since, so a node that lost
//! its lease, or holds one it has not caught up on, cannot make an id
//! durable: two nodes never both answer `true` for one id. A `true` verdict
//! waits for the acknowledgement (the writer signals after [`Journal::append`]
//! returns).
//!
//! A message is a kind byte ([`ACCEPTED`] or [`FORGOTTEN`]) followed by
//! 24 bytes per id: the time it was accepted (or forgotten), ms since the
//! Unix epoch as u64 little-endian, then its 16-byte fingerprint. The
//! stream's `max_age` is the window plus [`GRACE`], so it holds every id
//! a verdict may still depend on.
//!
//! The writer calls [`Journal::append`] on a blocking thread; it waits for
//! JetStream's acknowledgements on the runtime through a handle.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use async_nats::{HeaderMap, HeaderValue, Subject};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;

use crate::engine::fingerprint::Fingerprint;
use crate::engine::{Deduplicator, Record, unix_ms};
use crate::journal::sealed::Sealed;
use crate::journal::{Journal, JournalError, JournalErrorKind, JournalReader, LmdbStore, StoreMeta};
use crate::observe::metrics::Metrics;

/// Kind byte of a message of accepted ids.
pub const ACCEPTED: u8 = 1;
/// Kind byte of a message of forgotten ids.
pub const FORGOTTEN: u8 = 2;
/// Bytes per id in a message.
const ID_BYTES: usize = 24;
/// How much longer than the window the stream keeps messages.
pub const GRACE: Duration = Duration::from_secs(600);
/// How long an append or a read waits for JetStream.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What this node knows of one shard's journal.
#[derive(Debug, Default)]
struct ShardLog {
    /// The stream sequence of the shard's last message, as far as this
    /// node has applied it to its table; `None` while the shard is not
    /// held here (appends of it fail).
    last: Option<u64>,
    /// Changes each time the shard is taken or let go: an acknowledgement
    /// of an append made before that does not move `last`.
    generation: u64,
    /// The lease is surely still ours until then; appends after it fail.
    valid_until: Option<Instant>,
    /// An append was refused: someone else appended. The lease keeper
    /// catches up (or lets the shard go).
    fenced: bool,
}

/// The per-shard journal positions, shared by the writer's journal and the
/// lease keeper.
#[derive(Debug)]
pub struct Positions {
    shards: Box<[Mutex<ShardLog>]>,
}

impl Positions {
    pub fn new(shards: u32) -> Self {
        Self {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
        }
    }

    fn log(&self, shard: u32) -> std::sync::MutexGuard<'_, ShardLog> {
        self.shards[shard as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The shard is served from here on: its journal was applied up to
    /// `last`, and its lease holds until `valid_until`.
    pub fn hold(&self, shard: u32, last: u64, valid_until: Instant) {
        let mut log = self.log(shard);
        log.last = Some(last);
        log.generation += 1;
        log.valid_until = Some(valid_until);
        log.fenced = false;
    }

    /// The lease was renewed: appends may go on until `valid_until`.
    pub fn extend(&self, shard: u32, valid_until: Instant) {
        let mut log = self.log(shard);
        if log.last.is_some() {
            log.valid_until = Some(valid_until);
        }
    }

    /// The shard is no longer held here; appends of it fail from now on.
    /// Returns the last sequence this node had applied.
    pub fn release(&self, shard: u32) -> Option<u64> {
        let mut log = self.log(shard);
        log.generation += 1;
        log.valid_until = None;
        log.fenced = false;
        log.last.take()
    }

    /// The last sequence applied here, if the shard is held.
    pub fn last(&self, shard: u32) -> Option<u64> {
        self.log(shard).last
    }

    /// Whether an append of the shard was refused since it was taken.
    pub fn is_fenced(&self, shard: u32) -> bool {
        self.log(shard).fenced
    }
}

/// Most replayed ids written to the local copy in one transaction.
const COPY_BATCH: usize = 8192;

/// Replayed journal messages of one kind waiting to go into the local copy.
#[derive(Default)]
struct CopyBuffer {
    kind: u8,
    records: Vec<Record>,
    /// The sequence of the last message whose ids are in `records` (0:
    /// none yet).
    through: u64,
}

/// Why a shard's journal could not be read.
#[derive(Debug)]
pub struct ReplayError(pub String);

impl std::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The journal stream, for appends (the writer) and replays (takeovers),
/// with the node's local copy in LMDB: every acknowledged message is
/// written there too, with the sequence it got, so that taking a shard
/// (after a restart, or back from another node) reads the copy and replays
/// only the journal's messages beyond it.
#[derive(Clone)]
pub struct StreamJournal {
    local: Option<Arc<Mutex<LmdbStore>>>,
    /// The sealed tier (`tier = "tiered"`), built from the local copy: a
    /// replay adopts into it what it finds before the cut.
    sealed: Option<Arc<Sealed>>,
    /// The copy was found to be of another stream: not read any more.
    stale_copy: Arc<std::sync::atomic::AtomicBool>,
    js: jetstream::Context,
    stream: stream::Stream,
    name: String,
    prefix: String,
    /// How far back the stream holds every id.
    horizon: Arc<Horizon>,
    positions: Arc<Positions>,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
}

/// How far back the journal stream holds every id: its `max_age`, and
/// since when that applies (a `max_age` raised at run time keeps ids from
/// then on; those it had dropped before stay dropped).
#[derive(Debug)]
struct Horizon {
    max_age_ms: AtomicU64,
    /// Ids accepted before this may have been dropped under a smaller
    /// `max_age`.
    complete_from_ms: AtomicU64,
}

impl Horizon {
    fn expired_before(&self, now_ms: u64) -> u64 {
        let aged = now_ms.saturating_sub(self.max_age_ms.load(Relaxed));
        aged.max(self.complete_from_ms.load(Relaxed))
    }
}

impl StreamJournal {
    /// Keeps the stream's `max_age` at least the window set plus
    /// [`GRACE`] as the window changes at run time (checked every second,
    /// until aborted): a window raised beyond it would otherwise claim, after a
    /// takeover, ids the stream no longer holds. Until the stream has held
    /// them for a whole window, a takeover's window in force reaches back
    /// only as far as the stream does (`eventsieve window` shows it).
    pub async fn keep_window(self, window_ms: Arc<AtomicU64>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let want = window_ms.load(Relaxed) + GRACE.as_millis() as u64;
            let had = self.horizon.max_age_ms.load(Relaxed);
            if want <= had {
                continue;
            }
            let raised = async {
                let mut info = self.js.get_stream(&self.name).await.map_err(|e| e.to_string())?;
                let mut config = info.info().await.map_err(|e| e.to_string())?.config.clone();
                if config.max_age >= Duration::from_millis(want) {
                    return Ok::<_, String>(());
                }
                config.max_age = Duration::from_millis(want);
                self.js.update_stream(config).await.map_err(|e| e.to_string())?;
                Ok(())
            };
            let at = unix_ms();
            match raised.await {
                Ok(()) => {
                    self.horizon
                        .complete_from_ms
                        .fetch_max(at.saturating_sub(had), Relaxed);
                    self.horizon.max_age_ms.store(want, Relaxed);
                    tracing::info!(
                        message = "Journal stream keeps ids longer: the window grew.",
                        stream = %self.name,
                        max_age_ms = want,
                        from_ms = had
                    );
                }
                Err(e) => {
                    tracing::warn!(message = "Cannot raise the journal stream's max_age; takeovers reach back only as far as it does.", stream = %self.name, error = %e)
                }
            }
        }
    }

    /// Opens the stream `cluster.journal_stream` over
    /// `<prefix>.journal.*`, creating it with `cluster.replicas` replicas
    /// and a `max_age` of the window plus [`GRACE`] if it does not exist.
    /// Call on the runtime.
    ///
    /// # Errors
    ///
    /// If JetStream does not answer or refuses the stream.
    pub async fn open(
        client: async_nats::Client,
        settings: &crate::config::Settings,
        positions: Arc<Positions>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let name = settings.config.cluster.journal_stream.as_str();
        let prefix = settings.config.subject_prefix.as_str();
        let (window_ms, replicas) = (settings.window_ms, settings.config.cluster.replicas);
        let mut js = jetstream::new(client);
        js.set_timeout(TIMEOUT);
        let max_age = Duration::from_millis(window_ms) + GRACE;
        let config = stream::Config {
            name: name.to_owned(),
            description: Some("eventsieve: ids accepted per shard (durability replicated)".into()),
            subjects: vec![format!("{prefix}.journal.*")],
            max_age,
            num_replicas: replicas,
            storage: stream::StorageType::File,
            allow_direct: true,
            ..Default::default()
        };
        let stream = js
            .get_or_create_stream(config)
            .await
            .map_err(|e| format!("journal stream {name}: {e}"))?;
        let max_age = stream.cached_info().config.max_age;
        Ok(Self {
            local: None,
            sealed: None,
            stale_copy: Arc::default(),
            js,
            stream,
            name: name.to_owned(),
            prefix: prefix.to_owned(),
            horizon: Arc::new(Horizon {
                max_age_ms: AtomicU64::new(max_age.as_millis() as u64),
                complete_from_ms: AtomicU64::new(0),
            }),
            positions,
            runtime: tokio::runtime::Handle::current(),
            metrics,
        })
    }

    /// Keeps `local` as the node's copy of this journal (see
    /// [`Self::identity`] for making sure it is of this stream).
    pub fn with_copy(mut self, local: LmdbStore) -> Self {
        self.local = Some(Arc::new(Mutex::new(local)));
        self
    }

    /// Adopts into `sealed` what replays find before its cut (see
    /// [`Sealed::adopt`]).
    pub fn with_sealed(mut self, sealed: Arc<Sealed>) -> Self {
        self.sealed = Some(sealed);
        self
    }

    /// What tells this journal stream from another of the same name (one
    /// deleted and made again): its creation time, in ns since the epoch.
    pub fn identity(&self) -> String {
        self.stream
            .cached_info()
            .created
            .unix_timestamp_nanos()
            .to_string()
    }

    pub fn positions(&self) -> &Arc<Positions> {
        &self.positions
    }

    fn subject(&self, shard: u32) -> String {
        format!("{}.journal.{shard}", self.prefix)
    }

    /// The stream sequence of `shard`'s last message (0: none).
    ///
    /// # Errors
    ///
    /// If the stream cannot be read.
    pub async fn last_sequence(&self, shard: u32) -> Result<u64, ReplayError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subject(shard))
            .await
        {
            Ok(message) => Ok(message.sequence),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(ReplayError(format!("journal of shard {shard}: {e}"))),
        }
    }

    /// Rebuilds `shard`'s (emptied) table: from the local copy, if it
    /// holds part of the shard's journal, then from the journal's messages
    /// beyond that. Returns the last sequence applied, and the ids restored
    /// from the copy and from the journal.
    ///
    /// # Errors
    ///
    /// If the journal cannot be read.
    pub async fn restore(
        &self,
        shard: u32,
        dedup: &Arc<Deduplicator>,
    ) -> Result<(u64, usize, usize), ReplayError> {
        // With a sealed tier, what it holds (before its cut) is not read
        // into the table: the copy is read from the cut on, and the
        // journal's ids before it are adopted (the cut holds still
        // meanwhile).
        let (turn, cut) = self.hold_cut().await;
        let last = self.last_sequence(shard).await?;
        let mut after = 0;
        let mut from_copy = 0;
        if let Some(local) = &self.local {
            let (local, tables) = (local.clone(), dedup.clone());
            let stale = self.stale_copy.clone();
            let tiered = self.sealed.is_some();
            let copied = tokio::task::spawn_blocking(move || -> Result<(u64, usize), JournalError> {
                let local = local.lock().unwrap_or_else(PoisonError::into_inner);
                let at = local.journal_position(shard)?;
                // A copy ahead of the journal is of another stream (one
                // deleted and made again): its ids are not this journal's,
                // and it is not read again while this process runs.
                if at > last && !stale.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        message =
                            "The local copy is ahead of the journal stream (made again?); not using it.",
                        shard,
                        copy_at = at,
                        journal_last = last,
                    );
                }
                if tiered && stale.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(JournalError::new(
                        JournalErrorKind::Mismatch,
                        "the local copy, and the sealed files built from it, are of an earlier journal stream \
                         of this name: restart the node (its data_dir is then moved aside and rebuilt)",
                    ));
                }
                if at == 0 || stale.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok((0, 0));
                }
                let now = unix_ms();
                let since = now.saturating_sub(tables.config().window_ms).max(cut);
                let mut table = tables.table(shard);
                let mut restored = 0;
                local.scan(&[shard], since, &mut |r| {
                    restored += usize::from(table.restore(r.fingerprint, r.born_ms, now))
                })?;
                Ok((at, restored))
            })
            .await;
            match copied {
                Ok(Ok((at, n))) => (after, from_copy) = (at, n),
                Ok(Err(e)) if e.kind() == JournalErrorKind::Mismatch => {
                    return Err(ReplayError(format!("shard {shard}: {e}")));
                }
                Ok(Err(e)) => {
                    tracing::warn!(message = "Cannot read the local copy; replaying the whole journal.", shard, error = %e)
                }
                Err(e) => {
                    tracing::warn!(message = "Reading the local copy failed; replaying the whole journal.", shard, error = %e)
                }
            }
            if after == 0 {
                dedup.clear(shard);
            }
        }
        let (last, from_journal) = self.replay_cut(shard, after, dedup, cut).await?;
        drop(turn);
        // The window in force reaches back no further than the stream
        // holds ids (a window raised beyond its max_age grows into it).
        dedup.held_since(self.expired_before());
        Ok((last, from_copy, from_journal))
    }

    /// Applies `shard`'s journal messages after sequence `after` to its
    /// table in `dedup`, in order, up to the shard's last message; returns
    /// that message's sequence and how many ids were restored.
    ///
    /// # Errors
    ///
    /// If the stream cannot be read or holds a message that is not a
    /// journal message.
    pub async fn replay(
        &self,
        shard: u32,
        after: u64,
        dedup: &Deduplicator,
    ) -> Result<(u64, usize), ReplayError> {
        let (turn, cut) = self.hold_cut().await;
        let replayed = self.replay_cut(shard, after, dedup, cut).await;
        drop(turn);
        replayed
    }

    /// The sealed tier's cut (0 without one), held still (no seal moves
    /// it) while the guard lives.
    async fn hold_cut(&self) -> (Option<tokio::sync::RwLockReadGuard<'_, ()>>, u64) {
        match &self.sealed {
            Some(sealed) => (Some(sealed.turn().read().await), sealed.cut_ms()),
            None => (None, 0),
        }
    }

    /// [`Self::replay`], the sealed tier's cut at `cut_ms` (held still by
    /// the caller): ids before it go to the sealed tier, not the table.
    async fn replay_cut(
        &self,
        shard: u32,
        after: u64,
        dedup: &Deduplicator,
        cut_ms: u64,
    ) -> Result<(u64, usize), ReplayError> {
        let last = self.last_sequence(shard).await?;
        if last <= after {
            return Ok((after, 0));
        }
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            ReplayError(format!("journal of shard {shard}: {what}: {e}"))
        };
        let config = consumer::pull::OrderedConfig {
            filter_subject: self.subject(shard),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            ..Default::default()
        };
        let consumer = self
            .stream
            .create_consumer(config)
            .await
            .map_err(|e| fail("cannot read", &e))?;
        let mut messages = consumer.messages().await.map_err(|e| fail("cannot read", &e))?;
        let window_ms = dedup.config().window_ms;
        let mut restored = 0;
        // What is replayed goes into the local copy too, so that the copy
        // holds the whole journal up to the position it records. With a
        // sealed tier the position is recorded only once what goes to it
        // is adopted: a copy read from the cut on would not hold the rest
        // for a replay cut short (a crash, a failed adoption) to finish.
        let mut copy = CopyBuffer::default();
        let positioned = self.sealed.is_none();
        // Ids before the sealed tier's cut, for it to adopt.
        let mut adopted = Vec::new();
        loop {
            let message = match tokio::time::timeout(TIMEOUT, messages.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(e))) => return Err(fail("read failed", &e)),
                Ok(None) => return Err(fail("read ended", &"before the last message")),
                Err(_) => return Err(fail("read stalled", &format!("no message within {TIMEOUT:?}"))),
            };
            let sequence = message
                .info()
                .map_err(|e| fail("bad message", &e))?
                .stream_sequence;
            let now = unix_ms();
            let (kind, ids) =
                decode(&message.payload).map_err(|e| fail(&format!("message {sequence}"), &e))?;
            if copy.kind != kind || copy.records.len() >= COPY_BATCH {
                self.copy(shard, &mut copy, positioned)
                    .await
                    .map_err(|e| fail("local copy", &e))?;
                copy.kind = kind;
            }
            {
                let mut table = dedup.table(shard);
                for (born_ms, fingerprint) in ids {
                    copy.records.push(Record {
                        shard,
                        born_ms,
                        fingerprint,
                    });
                    match kind {
                        FORGOTTEN => {
                            table.remove(fingerprint);
                            if let Some(sealed) = &self.sealed {
                                sealed.forget(shard, fingerprint, born_ms);
                            }
                        }
                        _ if now.saturating_sub(born_ms) >= window_ms => {}
                        _ if born_ms < cut_ms => adopted.push((fingerprint, born_ms)),
                        _ => restored += usize::from(table.restore(fingerprint, born_ms, now)),
                    }
                }
            }
            copy.through = sequence;
            if sequence >= last {
                restored += self
                    .adopt(shard, adopted, window_ms)
                    .await
                    .map_err(|e| fail("sealed tier", &e))?;
                self.copy(shard, &mut copy, true)
                    .await
                    .map_err(|e| fail("local copy", &e))?;
                return Ok((sequence, restored));
            }
        }
    }

    /// Hands `ids` of `shard` (before the cut) to the sealed tier; how
    /// many.
    async fn adopt(&self, shard: u32, ids: Vec<(Fingerprint, u64)>, window_ms: u64) -> Result<usize, String> {
        let Some(sealed) = self.sealed.clone().filter(|_| !ids.is_empty()) else {
            return Ok(0);
        };
        let n = ids.len();
        let horizon = unix_ms().saturating_sub(window_ms);
        let adopted = tokio::task::spawn_blocking(move || sealed.adopt(shard, ids, horizon))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        tracing::info!(
            message = "Sealed the shard's ids from before the cut found in the journal stream.",
            shard,
            ids = n,
            adopted = adopted.map_or(0, |s| s.ids),
        );
        Ok(n)
    }

    /// Writes the replayed messages in `buffer` to the local copy, with the
    /// shard's position after them if `positioned`, and empties it. A
    /// failure fails the replay: writing later messages would record a
    /// position past the missing ones, which a later takeover would then
    /// skip.
    async fn copy(&self, shard: u32, buffer: &mut CopyBuffer, positioned: bool) -> Result<(), JournalError> {
        let Some(local) = &self.local else { return Ok(()) };
        if buffer.through == 0 {
            return Ok(());
        }
        let (local, kind, through) = (local.clone(), buffer.kind, buffer.through);
        let records = std::mem::take(&mut buffer.records);
        let written = tokio::task::spawn_blocking(move || {
            let mut local = local.lock().unwrap_or_else(PoisonError::into_inner);
            let at = [(shard, through)];
            let positions = if positioned { &at[..] } else { &[] };
            if kind == FORGOTTEN {
                local.forget_at(&records, positions)
            } else {
                local.append_at(&records, positions)
            }
        })
        .await;
        if let Ok(Err(e)) | Err(e) =
            written.map_err(|e| JournalError::new(JournalErrorKind::Io, e.to_string()))
        {
            Metrics::inc(&self.metrics.store_errors);
            tracing::warn!(message = "Cannot copy replayed journal messages to the local store.", shard, error = %e);
            return Err(e);
        }
        Ok(())
    }

    /// Appends one message of `kind` per shard of `records`, all at once,
    /// each conditioned on the shard's last sequence; waits for every
    /// acknowledgement.
    fn append_kind(&mut self, kind: u8, records: &[Record]) -> Result<(), JournalError> {
        let mut by_shard: BTreeMap<u32, Vec<&Record>> = BTreeMap::new();
        for r in records {
            by_shard.entry(r.shard).or_default().push(r);
        }
        let now = Instant::now();
        let mut sends = Vec::with_capacity(by_shard.len());
        // Each shard's append succeeds or fails on its own.
        let mut fenced = Vec::new();
        for (shard, records) in by_shard {
            let log = self.positions.log(shard);
            match (log.last, log.valid_until) {
                (Some(last), Some(until)) if until > now && !log.fenced => {
                    sends.push((shard, last, log.generation, encode(kind, &records)));
                }
                _ => fenced.push(shard),
            }
        }
        let started = Instant::now();
        let results = self
            .runtime
            .block_on(futures_util::future::join_all(sends.iter().map(
                |(shard, last, _, payload)| {
                    let mut headers = HeaderMap::new();
                    headers.insert(
                        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                        HeaderValue::from(*last),
                    );
                    let subject: Subject = self.subject(*shard).into();
                    let js = self.js.clone();
                    let payload = payload.clone();
                    async move { js.publish_with_headers(subject, headers, payload).await?.await }
                },
            )));
        let micros = started.elapsed().as_micros() as u64;
        let mut unavailable = Vec::new();
        let mut why = None;
        let mut acked = Vec::with_capacity(sends.len());
        for ((shard, _, generation, _), result) in sends.iter().zip(results) {
            match result {
                Ok(ack) => {
                    Metrics::inc(&self.metrics.journal_appends);
                    self.metrics
                        .journal_append_micros
                        .fetch_add(micros, std::sync::atomic::Ordering::Relaxed);
                    let mut log = self.positions.log(*shard);
                    if log.generation == *generation {
                        log.last = Some(ack.sequence);
                    }
                    acked.push((*shard, ack.sequence));
                }
                Err(e) if wrong_sequence(&e) => {
                    Metrics::inc(&self.metrics.journal_fenced);
                    let mut log = self.positions.log(*shard);
                    if log.generation == *generation {
                        log.fenced = true;
                    }
                    fenced.push(*shard);
                }
                Err(e) => {
                    why.get_or_insert_with(|| format!("journal of shard {shard}: {e}"));
                    unavailable.push(*shard);
                }
            }
        }
        if !acked.is_empty() {
            let partial = !(fenced.is_empty() && unavailable.is_empty());
            // A copy that missed these messages must not take later ones:
            // it would record a position past messages it lacks, and a
            // takeover reading it would skip them. So their ids are not
            // acknowledged (503: the producer's retry is appended again).
            // The sealed tier, which seals what the copy holds, needs it
            // whole too.
            self.copy_locally(kind, records, &acked, partial)?;
        }
        if fenced.is_empty() && unavailable.is_empty() {
            return Ok(());
        }
        // Both answer 503: a fenced shard's owner takes the retry, an
        // unavailable one is retried here.
        let error = match why {
            Some(why) => JournalError::new(JournalErrorKind::Unavailable, why),
            None => JournalError::new(
                JournalErrorKind::Fenced,
                format!(
                    "shards {fenced:?} are not held here (lease lost or handed over, or another node appended to their journal)"
                ),
            ),
        };
        if acked.is_empty() {
            return Err(error);
        }
        fenced.extend(unavailable);
        Err(error.only_shards(fenced))
    }

    /// Writes the journalled records of the `acked` shards (only some of
    /// the records' shards when `partial`) into the local copy with their
    /// journal positions.
    fn copy_locally(
        &self,
        kind: u8,
        records: &[Record],
        acked: &[(u32, u64)],
        partial: bool,
    ) -> Result<(), JournalError> {
        if let Some(local) = &self.local {
            let kept: Vec<Record>;
            let records = if partial {
                let shards: std::collections::BTreeSet<u32> = acked.iter().map(|a| a.0).collect();
                kept = records
                    .iter()
                    .filter(|r| shards.contains(&r.shard))
                    .copied()
                    .collect();
                &kept
            } else {
                records
            };
            let mut local = local.lock().unwrap_or_else(PoisonError::into_inner);
            let copied = if kind == FORGOTTEN {
                local.forget_at(records, acked)
            } else {
                local.append_at(records, acked)
            };
            if let Err(e) = copied {
                Metrics::inc(&self.metrics.store_errors);
                tracing::warn!(message = "Cannot write the local copy of the journal; the append fails.", error = %e);
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Whether a conditioned publish failed because the subject's last
/// sequence was not the one expected. nats-server answers with one of two
/// codes; async-nats names only the first (10071), not the constant form
/// (10164).
pub fn wrong_sequence(e: &async_nats::jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::{Error, ErrorCode};
    e.kind() == PublishErrorKind::WrongLastSequence
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<Error>())
            .is_some_and(|j| j.error_code() == ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT)
}

/// One journal message: the kind byte, then each id's time and fingerprint.
fn encode(kind: u8, records: &[&Record]) -> Bytes {
    let mut out = BytesMut::with_capacity(1 + records.len() * ID_BYTES);
    out.put_u8(kind);
    for r in records {
        out.put_u64_le(r.born_ms);
        out.put_slice(&r.fingerprint.to_bytes());
    }
    out.freeze()
}

/// The kind and ids of a journal message.
fn decode(payload: &[u8]) -> Result<(u8, impl Iterator<Item = (u64, Fingerprint)> + '_), String> {
    let (&kind, ids) = payload.split_first().ok_or("empty message")?;
    if kind != ACCEPTED && kind != FORGOTTEN {
        return Err(format!("unknown kind {kind}: not an eventsieve journal message"));
    }
    if ids.len() % ID_BYTES != 0 {
        return Err(format!(
            "{} bytes of ids is not a multiple of {ID_BYTES}",
            ids.len()
        ));
    }
    Ok((
        kind,
        ids.chunks_exact(ID_BYTES).map(|c| {
            let born = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
            let fp = Fingerprint::from_bytes(c[8..].try_into().expect("16 bytes"));
            (born, fp)
        }),
    ))
}

impl Journal for StreamJournal {
    fn append(&mut self, records: &[Record]) -> Result<(), JournalError> {
        self.append_kind(ACCEPTED, records)
    }

    fn forget(&mut self, records: &[Record]) -> Result<(), JournalError> {
        self.append_kind(FORGOTTEN, records)
    }

    /// Nothing: a shard's journal is read when its lease is taken
    /// ([`StreamJournal::replay`]), not at start.
    fn scan(&self, _: &[u32], _: u64, _: &mut dyn FnMut(Record)) -> Result<usize, JournalError> {
        Ok(0)
    }

    /// The local copy's old ids; the stream drops messages older than its
    /// `max_age` by itself.
    fn expire(&mut self, before_ms: u64) -> Result<usize, JournalError> {
        match &self.local {
            Some(local) => local
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .expire(before_ms),
            None => Ok(0),
        }
    }

    fn expired_before(&self) -> u64 {
        self.horizon.expired_before(unix_ms())
    }

    fn sync(&mut self) -> Result<(), JournalError> {
        match &self.local {
            Some(local) => local.lock().unwrap_or_else(PoisonError::into_inner).sync(),
            None => Ok(()),
        }
    }

    fn location(&self) -> String {
        format!("JetStream stream {}", self.name)
    }

    /// A reader of the local copy (what the sealed tier is built from).
    fn reader(&self) -> Option<Box<dyn JournalReader>> {
        self.local
            .as_ref()
            .and_then(|local| local.lock().unwrap_or_else(PoisonError::into_inner).reader())
    }
}

/// Opens the local copy of the journal whose stream is `stream` (its
/// [`StreamJournal::identity`]) in `dir`. A store that cannot be opened
/// (damaged, or of another format or shard count), or that copied another
/// stream of the same name, is moved aside and a new one made: the
/// journal has everything this node needs. Blocking.
///
/// # Errors
///
/// If no store can be made in `dir`, or a bad one cannot be moved aside.
pub fn local_copy(
    dir: &std::path::Path,
    meta: StoreMeta,
    fsync: bool,
    stream: &str,
) -> Result<LmdbStore, JournalError> {
    const STREAM_KEY: &str = "journal_stream";
    let problem = match LmdbStore::open(dir, meta.clone(), fsync) {
        Ok(mut store) => match store.meta(STREAM_KEY)? {
            Some(seen) if seen != stream => {
                drop(store);
                format!(
                    "it copied another journal stream of that name (created {seen} ns, this one {stream} ns)"
                )
            }
            _ => {
                store.set_meta(STREAM_KEY, stream)?;
                return Ok(store);
            }
        },
        Err(e) => e.to_string(),
    };
    let aside = crate::journal::lmdb::move_aside(dir).map_err(|m| {
        JournalError::new(
            JournalErrorKind::Open,
            format!("{problem}; and it cannot be moved aside: {m}"),
        )
    })?;
    tracing::warn!(
        message = "The local store cannot be used; moved aside, rebuilding from the journal.",
        why = %problem,
        moved_to = %aside.display(),
    );
    let mut store = LmdbStore::open(dir, meta, fsync)?;
    store.set_meta(STREAM_KEY, stream)?;
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_foreign_ones_are_refused() {
        let records: Vec<Record> = (0..3u64)
            .map(|i| Record {
                shard: 7,
                born_ms: 1_700_000_000_000 + i,
                fingerprint: Fingerprint::of(&i.to_le_bytes()),
            })
            .collect();
        let refs: Vec<&Record> = records.iter().collect();
        let payload = encode(ACCEPTED, &refs);
        assert_eq!(payload.len(), 1 + 3 * ID_BYTES);
        let (kind, ids) = decode(&payload).unwrap();
        assert_eq!(kind, ACCEPTED);
        let ids: Vec<_> = ids.collect();
        assert_eq!(ids.len(), 3);
        for ((born, fp), r) in ids.iter().zip(&records) {
            assert_eq!((*born, *fp), (r.born_ms, r.fingerprint));
        }
        assert!(decode(b"").is_err());
        let error = |payload: &[u8]| decode(payload).err().unwrap();
        assert!(error(b"{\"event_id\":1}").contains("unknown kind"));
        assert!(error(&payload[..10]).contains("multiple"));
    }

    #[test]
    fn positions_refuse_shards_not_held_and_ignore_stale_acknowledgements() {
        let p = Positions::new(4);
        assert_eq!(p.last(1), None);
        p.hold(1, 10, Instant::now() + Duration::from_secs(1));
        assert_eq!(p.last(1), Some(10));
        let generation = p.log(1).generation;
        assert_eq!(p.release(1), Some(10));
        p.hold(1, 20, Instant::now());
        assert_ne!(
            p.log(1).generation,
            generation,
            "an old append cannot move the new position"
        );
    }
}
