//! The verdict path, without any transport: key → ownership →
//! check-and-insert → durable commit → the one [`Hook`] for accepted events.
//!
//! A transport (NATS today, HTTP later) hands an event to
//! [`Pipeline::decide`], which settles everything that needs no commit at
//! once (bad input, duplicate, not ready, owned elsewhere) and otherwise
//! queues the new id for the group-commit [`Writer`]. [`Pipeline::finish`]
//! then waits for that commit and either calls the hook (republish, later
//! the stages) and gives the `New` verdict, or forgets the id again and
//! gives the failure. Accept, hook and undo happen here and nowhere else;
//! the transport only turns an [`Outcome`] into a reply.
//!
//! Batches go the same way through [`Pipeline::decide_batch`] and
//! [`Pipeline::finish_batch`]: one table lock per shard and one submission
//! to the writer per batch.

pub mod ownership;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use crate::engine::batch::{self, Entry};
use crate::engine::event::{EventError, Seen};
use crate::engine::fingerprint::Fingerprint;
use crate::engine::{Deduplicator, Keyed, Record, Verdict, unix_ms};
use crate::journal::writer::Committed;
use crate::journal::{CommitFailed, Journal, JournalError, Writer};
use crate::observe::metrics::Metrics;

pub use ownership::{Ownership, ShardState};

/// Where accepted events go once their ids are durable: the republish, and
/// later the stages. Called per request and shard, in the order the events
/// were accepted.
pub trait Hook: Send + Sync + 'static {
    fn accepted(&self, shard: u32, events: Accepted<'_>) -> impl Future<Output = ()> + Send;
}

/// An output that takes each new event, and acknowledges it, *before* its
/// id is committed: a JetStream stream that drops repeats by
/// `Nats-Msg-Id`. A crash between the acknowledgement and the commit leaves
/// the id unremembered, so the producer's retry is accepted again and
/// published again, and the stream drops the second copy: the event
/// reaches the output exactly once for a producer that retries.
pub trait Ahead: Send + Sync + 'static {
    /// Publishes `event` of `shard` under its dedup key `id`; resolves once
    /// the output has acknowledged it (a repeat it dropped counts as
    /// acknowledged).
    fn publish(&self, shard: u32, id: &str, event: Bytes) -> BoxFuture<'static, Result<(), String>>;
}

/// The new events of one request in one shard, as the [`Hook`] gets them.
#[derive(Debug, Clone, Copy)]
pub enum Accepted<'a> {
    /// The event of a single-event request.
    One(&'a Bytes),
    /// The new lines of a batch that fall in this shard: `lines` of `body`,
    /// in request order, and the top-level fields the stages read, read
    /// with their keys (`seen.len() / lines.len()` per line; empty if
    /// they were not).
    Lines {
        body: &'a Bytes,
        lines: &'a [Range<usize>],
        seen: &'a [Seen],
    },
}

impl Accepted<'_> {
    pub fn len(&self) -> usize {
        match self {
            Accepted::One(_) => 1,
            Accepted::Lines { lines, .. } => lines.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each event's bytes, borrowed (no copy, no reference count).
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let (one, lines) = match *self {
            Accepted::One(event) => (Some(&event[..]), None),
            Accepted::Lines { body, lines, .. } => (None, Some(lines.iter().map(|r| &body[r.clone()]))),
        };
        one.into_iter().chain(lines.into_iter().flatten())
    }

    /// Each event, byte for byte as received (no copy).
    pub fn events(&self) -> impl Iterator<Item = Bytes> + '_ {
        let (one, lines) = match *self {
            Accepted::One(event) => (Some(event.clone()), None),
            Accepted::Lines { body, lines, .. } => (None, Some(lines.iter().map(|r| body.slice(r.clone())))),
        };
        one.into_iter().chain(lines.into_iter().flatten())
    }
}

/// The final answer on one event.
#[derive(Debug)]
pub enum Outcome {
    Verdict(Verdict),
    /// The event breaks a rule; nothing changed.
    Invalid(EventError),
    /// The shard is owned here but still recovering.
    NotReady(u32),
    /// New, but its id could not be made durable; it was forgotten again.
    Failed(CommitFailed),
}

const STORE_FAILED: &str = "the store could not commit this event; retry";
const OUTPUT_FAILED: &str = "the output stream did not acknowledge this event; retry";
const FENCED: &str = "the event's shard moved to another node while it was decided; retry";
const UNAVAILABLE: &str = "the journal (JetStream) did not acknowledge this event; retry";
const STOPPED: &str = "the store is not taking ids (shutting down, or its writer failed); retry";

impl Outcome {
    /// The status code and reason of an outcome that is not a verdict, as
    /// both the single-event and the batch replies carry them.
    pub fn error(&self) -> Option<(u16, String)> {
        match self {
            Outcome::Verdict(_) => None,
            Outcome::Invalid(e) => Some((400, e.to_string())),
            Outcome::NotReady(shard) => Some((503, format!("shard {shard} is not ready (recovering)"))),
            Outcome::Failed(CommitFailed::Journal) => Some((500, STORE_FAILED.into())),
            Outcome::Failed(CommitFailed::Stopped) => Some((503, STOPPED.into())),
            Outcome::Failed(CommitFailed::Output) => Some((503, OUTPUT_FAILED.into())),
            Outcome::Failed(CommitFailed::Fenced) => Some((503, FENCED.into())),
            Outcome::Failed(CommitFailed::Unavailable) => Some((503, UNAVAILABLE.into())),
        }
    }
}

/// The answer to a look-up or a forget of one id.
#[derive(Debug)]
pub enum Admin {
    /// The id's shard is served by another node, which answers.
    Elsewhere,
    /// Remembered since this time (ms since the Unix epoch, to the time unit
    /// the table keeps), or not remembered. For a forget: what it was
    /// before (and it is forgotten now).
    Known(Option<u64>),
    /// Bad id (400), shard not ready (503), or the store failed (500).
    Failed(Outcome),
}

/// The first step on one event.
#[derive(Debug)]
pub enum Step<'a> {
    /// Settled: no commit needed.
    Done(Outcome),
    /// Its shard is owned by another node: the transport forwards it.
    Elsewhere(Keyed<'a>),
    /// New and queued: [`Pipeline::finish`] gives the outcome.
    Commit(Pending),
}

/// A new id waiting for its commit.
#[derive(Debug)]
pub struct Pending {
    shard: u32,
    fingerprint: Fingerprint,
    /// `None` when the pipeline keeps nothing durable (durability `memory`)
    /// or once the result has been taken into `settled`.
    committed: Option<Committed>,
    /// The commit's result, once known.
    settled: Option<Result<(), CommitFailed>>,
}

impl Pending {
    fn new(shard: u32, fingerprint: Fingerprint, committed: Option<Committed>) -> Self {
        let settled = committed.is_none().then_some(Ok(()));
        Self {
            shard,
            fingerprint,
            committed,
            settled,
        }
    }

    /// Waits until the commit's result is known; [`Pipeline::finish`] then
    /// completes without waiting. Cancel-safe.
    pub async fn settle(&mut self) {
        if self.settled.is_none()
            && let Some(committed) = &mut self.committed
        {
            self.settled = Some(committed.await.unwrap_or(Err(CommitFailed::Stopped)));
            self.committed = None;
        }
    }

    /// Whether the commit's result is known, without waiting.
    pub fn is_settled(&mut self) -> bool {
        if self.settled.is_none()
            && let Some(committed) = &mut self.committed
        {
            match committed.try_recv() {
                Ok(result) => self.settled = Some(result),
                Err(oneshot::error::TryRecvError::Closed) => self.settled = Some(Err(CommitFailed::Stopped)),
                Err(oneshot::error::TryRecvError::Empty) => return false,
            }
            self.committed = None;
        }
        true
    }
}

/// A batch once the lines of this node's shards are decided.
#[derive(Debug)]
pub struct BatchPending {
    lines: Vec<Range<usize>>,
    entries: Vec<Option<Entry>>,
    /// Lines new here, grouped by shard in line order, with their records.
    new: Vec<(usize, Record)>,
    /// Per shard owned elsewhere: its lines and their sub-batch body.
    forward: BTreeMap<u32, (Vec<usize>, Vec<u8>)>,
    /// The commit of `new`; `Ok(None)` while the [`Ahead`] output has yet
    /// to take them (they are submitted by [`Pipeline::finish_batch`]).
    committed: Result<Option<Committed>, CommitFailed>,
    /// The stages' fields of every line (see [`batch::Decision::seen`]).
    seen: Vec<Seen>,
}

impl BatchPending {
    /// The lines the transport must send to other nodes: per shard, the line
    /// numbers and the sub-batch body. Their entries stay `None` in
    /// [`Pipeline::finish_batch`]'s answer.
    pub fn take_forwards(&mut self) -> BTreeMap<u32, (Vec<usize>, Vec<u8>)> {
        std::mem::take(&mut self.forward)
    }
}

/// The verdict path of one node.
pub struct Pipeline<H> {
    /// Every shard's table.
    dedup: Deduplicator,
    /// Which shards are served here, and which are ready.
    ownership: Ownership,
    /// The group-commit writer; `None` for durability `memory`.
    writer: Option<Writer>,
    /// Where accepted events go.
    hook: H,
    /// The output that must take new events before their commit, if any.
    ahead: Option<Arc<dyn Ahead>>,
    /// Verdict counters.
    metrics: Arc<Metrics>,
}

impl<H: Hook> Pipeline<H> {
    pub fn new(
        dedup: Deduplicator,
        ownership: Ownership,
        writer: Option<Writer>,
        hook: H,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            dedup,
            ownership,
            writer,
            hook,
            ahead: None,
            metrics,
        }
    }

    /// New events go to `ahead`, and are acknowledged there, before their
    /// ids are committed.
    pub fn with_ahead(mut self, ahead: Arc<dyn Ahead>) -> Self {
        self.ahead = Some(ahead);
        self
    }

    pub fn dedup(&self) -> &Deduplicator {
        &self.dedup
    }

    pub fn ownership(&self) -> &Ownership {
        &self.ownership
    }

    pub fn hook(&self) -> &H {
        &self.hook
    }

    /// Settles `event` if it needs no commit, else inserts its id and
    /// queues it for the writer (waiting while the writer's queue is full).
    pub async fn decide<'a>(&self, event: &'a Bytes) -> Step<'a> {
        let keyed = match self.dedup.key(event) {
            Ok(keyed) => keyed,
            Err(e) => {
                Metrics::inc(self.metrics.invalid(e.kind()));
                return Step::Done(Outcome::Invalid(e));
            }
        };
        let shard = keyed.shard;
        match self.ownership.state(shard) {
            ShardState::Ready => {}
            ShardState::Recovering => {
                Metrics::inc(&self.metrics.not_ready);
                return Step::Done(Outcome::NotReady(shard));
            }
            ShardState::Elsewhere => return Step::Elsewhere(keyed),
        }
        let now = unix_ms();
        if self.dedup.check_and_insert(&keyed, now) == Verdict::Duplicate {
            Metrics::inc(&self.metrics.duplicates);
            return Step::Done(Outcome::Verdict(Verdict::Duplicate));
        }
        let fingerprint = keyed.fingerprint;
        let record = Record {
            shard,
            born_ms: now,
            fingerprint,
        };
        let committed = match (&self.ahead, &self.writer) {
            (Some(ahead), writer) => {
                // Published and acknowledged first, then committed: in a
                // task of its own, so that events behind it proceed too.
                let publish = ahead.publish(shard, &keyed.id, event.clone());
                let writer = writer.clone();
                let (done, committed) = oneshot::channel();
                tokio::spawn(async move {
                    let result = match publish.await {
                        Err(e) => {
                            tracing::warn!(message = "The output did not take an event.", error = %e);
                            Err(CommitFailed::Output)
                        }
                        Ok(()) => match writer {
                            None => Ok(()),
                            Some(writer) => match writer.submit_one(record).await {
                                Ok(committed) => committed.await.unwrap_or(Err(CommitFailed::Stopped)),
                                Err(failed) => Err(failed),
                            },
                        },
                    };
                    let _ = done.send(result);
                });
                Some(committed)
            }
            (None, None) => None,
            (None, Some(writer)) => match writer.submit_one(record).await {
                Ok(committed) => Some(committed),
                Err(failed) => return Step::Done(self.undo(shard, fingerprint, failed)),
            },
        };
        Step::Commit(Pending::new(shard, fingerprint, committed))
    }

    /// Waits for `pending`'s commit; then hands `event` to the hook and
    /// answers `New`, or forgets the id and answers the failure.
    pub async fn finish(&self, mut pending: Pending, event: Bytes) -> Outcome {
        pending.settle().await;
        let Pending {
            shard,
            fingerprint,
            settled,
            ..
        } = pending;
        match settled.unwrap_or(Err(CommitFailed::Stopped)) {
            Ok(()) => {
                Metrics::inc(&self.metrics.accepted);
                self.hook.accepted(shard, Accepted::One(&event)).await;
                Outcome::Verdict(Verdict::New)
            }
            Err(failed) => self.undo(shard, fingerprint, failed),
        }
    }

    /// [`Self::decide`] then [`Self::finish`], for callers that can wait in
    /// place; `Err` with the keyed event when another node owns its shard.
    ///
    /// # Errors
    ///
    /// The keyed event, when it must be forwarded.
    pub async fn ingest<'a>(&self, event: &'a Bytes) -> Result<Outcome, Keyed<'a>> {
        match self.decide(event).await {
            Step::Done(outcome) => Ok(outcome),
            Step::Elsewhere(keyed) => Err(keyed),
            Step::Commit(pending) => Ok(self.finish(pending, event.clone()).await),
        }
    }

    /// Decides the lines of `body` whose shards are ready here, queues the
    /// new ids as one submission, and sets aside the lines of other nodes'
    /// shards (refused with 503 when `forwarded`: a sub-batch is never sent
    /// on again).
    pub async fn decide_batch(&self, body: &[u8], forwarded: bool) -> BatchPending {
        Metrics::inc(&self.metrics.batches);
        let d = batch::decide(&self.dedup, body, unix_ms(), |shard| {
            self.ownership.route(shard, forwarded)
        });
        for kind in &d.invalid {
            Metrics::inc(self.metrics.invalid(*kind));
        }
        self.metrics.not_ready.fetch_add(d.not_ready, Relaxed);
        self.metrics.duplicates.fetch_add(d.duplicates, Relaxed);
        let committed = match &self.writer {
            Some(writer) if !d.new.is_empty() && self.ahead.is_none() => writer
                .submit(d.new.iter().map(|(_, r)| *r).collect())
                .await
                .map(Some),
            _ => Ok(None),
        };
        BatchPending {
            lines: d.lines,
            entries: d.entries,
            new: d.new,
            forward: d.forward,
            committed,
            seen: d.seen,
        }
    }

    /// Waits for the batch's commit; then hands the new lines to the hook,
    /// shard by shard, or forgets their ids and gives each the failure.
    /// Returns an entry per line (`None` for the lines taken by
    /// [`BatchPending::take_forwards`]).
    pub async fn finish_batch(&self, pending: BatchPending, body: &Bytes) -> Vec<Option<Entry>> {
        let BatchPending {
            lines,
            mut entries,
            mut new,
            mut committed,
            seen,
            ..
        } = pending;
        if let Some(ahead) = &self.ahead {
            new = self
                .publish_ahead(ahead.as_ref(), new, &lines, &mut entries, body)
                .await;
            committed = match &self.writer {
                Some(writer) if !new.is_empty() => writer
                    .submit(new.iter().map(|(_, r)| *r).collect())
                    .await
                    .map(Some),
                _ => Ok(None),
            };
        }
        let result = match committed {
            Ok(committed) => wait(committed).await,
            Err(failed) => Err(failed),
        };
        match result {
            Ok(()) => {
                self.metrics.accepted.fetch_add(new.len() as u64, Relaxed);
                let mut ranges = Vec::new();
                let mut seen_here = Vec::new();
                let per_line = seen.len() / lines.len().max(1);
                for group in new.chunk_by(|a, b| a.1.shard == b.1.shard) {
                    ranges.clear();
                    ranges.extend(group.iter().map(|(line, _)| lines[*line].clone()));
                    seen_here.clear();
                    for (line, _) in group {
                        seen_here.extend_from_slice(&seen[line * per_line..(line + 1) * per_line]);
                    }
                    let events = Accepted::Lines {
                        body,
                        lines: &ranges,
                        seen: &seen_here,
                    };
                    self.hook.accepted(group[0].1.shard, events).await;
                }
            }
            Err(failed) => {
                for (line, record) in &new {
                    let outcome = self.undo(record.shard, record.fingerprint, failed);
                    entries[*line] = outcome.error().map(|(code, reason)| Entry::error(code, reason));
                }
            }
        }
        entries
    }

    /// Rebuilds `shards` from `journal` (ids of the last window) and marks
    /// them ready; returns how many ids were restored.
    ///
    /// # Errors
    ///
    /// The journal's error; the shards stay as they were.
    pub fn recover(&self, journal: &dyn Journal, shards: &[u32]) -> Result<usize, JournalError> {
        let now = unix_ms();
        let since = now.saturating_sub(self.dedup.config().window_ms);
        let mut restored = 0;
        // A chunk's ids are of one shard: its table stays locked across them.
        let mut open = None;
        journal.scan(shards, since, &mut |r| {
            if open.as_ref().is_none_or(|(shard, _)| *shard != r.shard) {
                drop(open.take()); // one table lock at a time
                open = Some((r.shard, self.dedup.table(r.shard)));
            }
            let (_, table) = open.as_mut().expect("just opened");
            restored += usize::from(table.restore(r.fingerprint, r.born_ms, now));
        })?;
        drop(open);
        // Ids the journal expired under a smaller window are not claimed.
        self.dedup.held_since(journal.expired_before());
        for &shard in shards {
            self.ownership.set(shard, ShardState::Ready);
        }
        Ok(restored)
    }

    /// Whether `id` is remembered here, and since when; changes nothing.
    pub fn lookup(&self, id: &str) -> Admin {
        let keyed = match self.dedup.key_of_id(id) {
            Ok(keyed) => keyed,
            Err(e) => return Admin::Failed(Outcome::Invalid(e)),
        };
        match self.ownership.state(keyed.shard) {
            ShardState::Elsewhere => Admin::Elsewhere,
            ShardState::Recovering => Admin::Failed(Outcome::NotReady(keyed.shard)),
            ShardState::Ready => Admin::Known(
                self.dedup
                    .table(keyed.shard)
                    .born_ms(keyed.fingerprint, unix_ms()),
            ),
        }
    }

    /// Forgets `id`, durably (journaled like an insert), so that its next
    /// event is accepted again: for operators who must replay an event on
    /// purpose. Answers what was remembered before.
    pub async fn forget(&self, id: &str) -> Admin {
        let keyed = match self.dedup.key_of_id(id) {
            Ok(keyed) => keyed,
            Err(e) => return Admin::Failed(Outcome::Invalid(e)),
        };
        let (shard, fingerprint) = (keyed.shard, keyed.fingerprint);
        match self.ownership.state(shard) {
            ShardState::Elsewhere => return Admin::Elsewhere,
            ShardState::Recovering => return Admin::Failed(Outcome::NotReady(shard)),
            ShardState::Ready => {}
        }
        let now = unix_ms();
        let Some(since) = self.dedup.table(shard).born_ms(fingerprint, now) else {
            return Admin::Known(None);
        };
        if let Some(writer) = &self.writer {
            let record = Record {
                shard,
                born_ms: now,
                fingerprint,
            };
            let committed = match writer.forget(record).await {
                Ok(committed) => committed.await.unwrap_or(Err(CommitFailed::Stopped)),
                Err(failed) => Err(failed),
            };
            if let Err(failed) = committed {
                return Admin::Failed(Outcome::Failed(failed));
            }
            // The journal hides acceptances up to `now`: one in the same
            // millisecond, after this forget, must not be hidden.
            while unix_ms() <= now {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        self.dedup.remove(shard, fingerprint);
        Metrics::inc(&self.metrics.forgotten);
        Admin::Known(Some(since))
    }

    /// Publishes the new lines of a batch to `ahead`, all at once, and
    /// waits for every acknowledgement; the lines it did not take are
    /// forgotten and answered 503. Returns the lines it took.
    async fn publish_ahead(
        &self,
        ahead: &dyn Ahead,
        new: Vec<(usize, Record)>,
        lines: &[Range<usize>],
        entries: &mut [Option<Entry>],
        body: &Bytes,
    ) -> Vec<(usize, Record)> {
        let publishes = new.iter().map(|(line, record)| {
            let event = body.slice(lines[*line].clone());
            // The line was keyed when it was decided; its id again, for
            // the output's duplicate detection.
            let id = self
                .dedup
                .key(&event)
                .map(|k| k.id.into_owned())
                .unwrap_or_default();
            ahead.publish(record.shard, &id, event)
        });
        let results = futures_util::future::join_all(publishes).await;
        let mut taken = Vec::with_capacity(new.len());
        for ((line, record), result) in new.into_iter().zip(results) {
            match result {
                Ok(()) => taken.push((line, record)),
                Err(e) => {
                    tracing::warn!(message = "The output did not take an event.", error = %e);
                    let outcome = self.undo(record.shard, record.fingerprint, CommitFailed::Output);
                    entries[line] = outcome.error().map(|(code, reason)| Entry::error(code, reason));
                }
            }
        }
        taken
    }

    /// Forgets an id whose commit failed; the outcome to give for it.
    fn undo(&self, shard: u32, fingerprint: Fingerprint, failed: CommitFailed) -> Outcome {
        self.dedup.remove(shard, fingerprint);
        Outcome::Failed(failed)
    }
}

/// The commit's result; a writer that went away before signalling counts as
/// stopped.
async fn wait(committed: Option<Committed>) -> Result<(), CommitFailed> {
    match committed {
        None => Ok(()),
        Some(committed) => committed.await.unwrap_or(Err(CommitFailed::Stopped)),
    }
}

#[cfg(test)]
mod tests;
