//! The verdict path, without any transport: key → ownership →
//! check-and-insert → durable commit → the chain of [`Stage`]s and the
//! [`Output`] for accepted events.
//!
//! A transport (NATS or HTTP) hands an event to [`Pipeline::decide`],
//! which settles everything that needs no commit at once (bad input,
//! duplicate of a committed id, not ready, owned elsewhere) and otherwise
//! queues the new id for the group-commit [`Writer`]. [`Pipeline::finish`]
//! then waits for that commit and either hands the event to the stages and
//! the output and gives the `New` verdict, or forgets the id again and
//! gives the failure. A duplicate of an id whose commit is still pending
//! (a twin, see [`crate::engine::pending`]) waits for that commit too, and
//! gives `Duplicate` or the same failure. Accept, hand-over and undo happen here
//! and nowhere else; the transport only turns an [`Outcome`] into a reply.
//!
//! Batches go the same way through [`Pipeline::decide_batch`] and
//! [`Pipeline::finish_batch`]: one table lock per shard and one submission
//! to the writer per batch.

pub mod lanes;
pub mod ownership;
pub mod reorder;
pub mod upkeep;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use async_nats::Subject;
use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::engine::batch::{self, Entry};
use crate::engine::event::{EventError, Seen};
use crate::engine::fingerprint::Fingerprint;
use crate::engine::pending::{Settle, Signal};
use crate::engine::{Checked, Deduplicator, Keyed, Record, Verdict, unix_ms};
use crate::journal::{CommitFailed, Journal, JournalError, Writer};
use crate::observe::metrics::Metrics;
use lanes::{Lanes, Ticket};
use reorder::{Released, Reorder, Taken};

pub use ownership::{Ownership, ShardState};

/// A step over accepted events, run in place once their ids are durable,
/// per request and shard in decision order: the aggregates today;
/// routing and per-session order next. Runs before the [`Output`].
pub trait Stage: Send + Sync + 'static {
    fn accepted(&self, shard: u32, events: &Accepted<'_>);
}

/// The last stage: where accepted events leave the sidecar once their ids
/// are durable (the `output` module holds one per kind). Called per request and shard, in
/// the order the events were accepted.
pub trait Output: Send + Sync + 'static {
    /// What one request's events all go out under (the routing rules in
    /// force when its first shard went out, and the subject it came in
    /// on): taken once per request.
    type Request: Clone + Send + Sync + 'static;

    fn request(&self, subject: &Subject) -> Self::Request;

    /// Whether the events of `next` may go out in one delivery with those
    /// of `first` (the same rules and subject): the reorder buffer joins
    /// the batched events it releases together.
    fn joins(&self, first: &Self::Request, next: &Self::Request) -> bool;

    fn accepted(
        &self,
        request: &Self::Request,
        shard: u32,
        events: Accepted<'_>,
    ) -> impl Future<Output = ()> + Send;
}

/// An output that takes each new event, and acknowledges it, *before* its
/// id is committed: a JetStream stream that drops repeats by
/// `Nats-Msg-Id`. A crash between the acknowledgement and the commit leaves
/// the id unremembered, so the producer's retry is accepted again and
/// published again, and the stream drops the second copy: the event
/// reaches the output exactly once for a producer that retries.
pub trait PublishFirst: Send + Sync + 'static {
    /// Publishes the new events of one request that came in on `subject`,
    /// each `(shard, dedup key, event)`, in order: sent once this
    /// completes (so that a shard's events reach the output in the order
    /// they were decided). One future per event, resolving once the output
    /// has acknowledged it (a repeat it dropped counts as acknowledged).
    fn publish<'a>(
        &'a self,
        subject: &'a Subject,
        events: Vec<(u32, String, Bytes)>,
    ) -> BoxFuture<'a, Vec<BoxFuture<'static, Result<(), String>>>>;
}

/// The new events of one request in one shard, as the stages and the [`Output`] get them.
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

    /// Each event with the fields read with its key (empty if they were
    /// not).
    pub fn events_seen(&self) -> impl Iterator<Item = (Bytes, &[Seen])> + '_ {
        let (seen, per_line): (&[Seen], usize) = match *self {
            Accepted::Lines { lines, seen, .. } if !lines.is_empty() => (seen, seen.len() / lines.len()),
            _ => (&[], 0),
        };
        self.events()
            .enumerate()
            .map(move |(i, e)| (e, seen.get(i * per_line..(i + 1) * per_line).unwrap_or(&[])))
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
    /// The sealed tier could not be read for it (a damaged or unreadable
    /// file, rebuilt from the journal): no verdict; nothing changed.
    Unreadable(String),
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
            Outcome::Failed(failed) => Some(failure(*failed)),
            Outcome::Unreadable(why) => Some((503, format!("{why}; retry"))),
        }
    }
}

/// The status code and reason of a failed commit.
fn failure(failed: CommitFailed) -> (u16, String) {
    match failed {
        CommitFailed::Journal => (500, STORE_FAILED.into()),
        CommitFailed::Stopped => (503, STOPPED.into()),
        CommitFailed::Output => (503, OUTPUT_FAILED.into()),
        CommitFailed::Fenced => (503, FENCED.into()),
        CommitFailed::Unavailable => (503, UNAVAILABLE.into()),
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

/// An event waiting for a commit: its own (a new id), or its first copy's
/// (a twin: the same id, remembered but not yet durable).
#[derive(Debug)]
pub struct Pending {
    shard: u32,
    fingerprint: Fingerprint,
    /// The cell the commit completes; `None` when the pipeline keeps
    /// nothing durable (durability `memory`): settled at once.
    settle: Option<Arc<Settle>>,
    /// Whether this event is a twin, waiting for its first copy's commit.
    twin: bool,
    /// The commit's result, once known.
    settled: Option<Result<(), CommitFailed>>,
    /// Its place in the shard's lane (a new event's).
    ticket: Option<Ticket>,
}

/// How often a twin looks at its first copy's commit (the cell keeps one
/// waker, its submitter's); a twin is rare.
const TWIN_POLL: std::time::Duration = std::time::Duration::from_millis(1);

/// The outcome of a twin's first copy: its commit's, once known.
async fn first_copy(settle: &Settle) -> Result<(), CommitFailed> {
    loop {
        match settle.get() {
            Some(result) => return result,
            None => tokio::time::sleep(TWIN_POLL).await,
        }
    }
}

impl Pending {
    fn new(
        shard: u32,
        fingerprint: Fingerprint,
        settle: Option<Arc<Settle>>,
        ticket: Option<Ticket>,
    ) -> Self {
        let settled = settle.is_none().then_some(Ok(()));
        Self {
            shard,
            fingerprint,
            settle,
            twin: ticket.is_none(),
            settled,
            ticket,
        }
    }

    /// Waits until the commit's result is known; [`Pipeline::finish`] then
    /// completes without waiting. Cancel-safe.
    pub async fn settle(&mut self) {
        if self.settled.is_some() {
            return;
        }
        let Some(settle) = &self.settle else { return };
        self.settled = Some(if self.twin {
            first_copy(settle).await
        } else {
            settle.wait().await
        });
    }

    /// Whether the commit's result is known, without waiting.
    pub fn is_settled(&mut self) -> bool {
        if self.settled.is_none()
            && let Some(settle) = &self.settle
        {
            self.settled = settle.get();
        }
        self.settled.is_some()
    }
}

/// A batch once the lines of this node's shards are decided.
pub struct BatchPending {
    lines: Vec<Range<usize>>,
    entries: Vec<Option<Entry>>,
    /// Lines new here, grouped by shard in line order, with their records.
    new: Vec<(usize, Record)>,
    /// Per shard owned elsewhere: its lines and their sub-batch body.
    forward: BTreeMap<u32, (Vec<usize>, Vec<u8>)>,
    /// Per shard of `new`, in its order, the cell its commit completes
    /// (empty when nothing is kept durable). With a [`PublishFirst`] output the
    /// ids are submitted by [`Pipeline::finish_batch`], once published.
    /// Held as [`Signal`]s: a batch dropped before it is finished (its
    /// request cancelled) sets them to `Stopped`, so no twin waits forever.
    settles: Vec<Signal>,
    /// Lines whose id waits for a commit: an earlier line's of this batch,
    /// or another request's.
    twins: Vec<(usize, Arc<Settle>)>,
    /// The stages' fields of every line (see [`batch::Decision::seen`]).
    seen: Vec<Seen>,
    /// Per shard of `new`, its place in the shard's lane.
    tickets: Vec<Ticket>,
    /// With a [`PublishFirst`] output: per line of `new`, its
    /// acknowledgement (the lines were sent when decided).
    acks: Vec<BoxFuture<'static, Result<(), String>>>,
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
pub struct Pipeline<O: Output> {
    /// Every shard's table (shared with the upkeep tasks and takeovers).
    dedup: Arc<Deduplicator>,
    /// Which shards are served here, and which are ready.
    ownership: Ownership,
    /// The group-commit writer; `None` for durability `memory`.
    writer: Option<Writer>,
    /// The stages and the output, run for each shard in decision order
    /// by the shard's lane.
    chain: Arc<Chain<O>>,
    lanes: Lanes,
    /// The output that must take new events before their commit, if any.
    publish_first: Option<Arc<dyn PublishFirst>>,
    /// Verdict counters.
    metrics: Arc<Metrics>,
}

impl<O: Output> Pipeline<O> {
    pub fn new(
        dedup: Deduplicator,
        ownership: Ownership,
        writer: Option<Writer>,
        output: O,
        metrics: Arc<Metrics>,
    ) -> Self {
        let lanes = Lanes::new(dedup.shard_count());
        Self {
            dedup: Arc::new(dedup),
            ownership,
            writer,
            chain: Arc::new(Chain {
                stages: Vec::new(),
                output,
                reorder: None,
            }),
            lanes,
            publish_first: None,
            metrics,
        }
    }

    /// New events go to `first`, and are acknowledged there, before their
    /// ids are committed.
    pub fn with_publish_first(mut self, first: Arc<dyn PublishFirst>) -> Self {
        self.publish_first = Some(first);
        self
    }

    /// Adds `stage` to the chain, after those added before it.
    pub fn with_stage(mut self, stage: Arc<dyn Stage>) -> Self {
        Arc::get_mut(&mut self.chain)
            .expect("stages are added before the pipeline runs")
            .stages
            .push(stage);
        self
    }

    /// Accepted events pass the reorder buffer of `ordering` before the
    /// stages and the output.
    pub fn with_ordering(mut self, ordering: crate::config::OrderingSettings) -> Self {
        let shards = self.dedup.shard_count();
        Arc::get_mut(&mut self.chain)
            .expect("set before the pipeline runs")
            .reorder = Some(Reorder::with_format(
            ordering,
            shards,
            self.dedup.config().format.clone(),
            &self.dedup.config().capture,
        ));
        self
    }

    /// The reorder buffer's counters, if there is one.
    pub fn reorder_counters(&self) -> Option<Arc<reorder::ReorderCounters>> {
        self.chain.reorder.as_ref().map(|r| r.counters.clone())
    }

    /// Releases what the reorder buffer holds past its `hold`, through
    /// each shard's lane; returns how long to wait before the next call.
    pub async fn release_due(&self) -> std::time::Duration {
        let Some(reorder) = &self.chain.reorder else {
            return std::time::Duration::from_secs(1);
        };
        for shard in reorder.holding() {
            self.let_go(shard, false).await;
        }
        std::time::Duration::from_millis(reorder.tick_ms())
    }

    /// Hands what the reorder buffer lets go of in `shard` (everything, or
    /// what is due) to the shard's lane, after what is in it already.
    async fn let_go(&self, shard: u32, everything: bool) {
        let chain = self.chain.clone();
        let release = async move {
            if let Some(reorder) = &chain.reorder {
                let out = if everything {
                    reorder.flush(shard)
                } else {
                    reorder.due(shard, unix_ms())
                };
                let out: Vec<&Released<_>> = out.iter().collect();
                chain.deliver_released(shard, &out).await;
            }
        };
        self.lanes.ticket(shard).deliver(release).await;
    }

    pub fn dedup(&self) -> &Arc<Deduplicator> {
        &self.dedup
    }

    pub fn ownership(&self) -> &Ownership {
        &self.ownership
    }

    pub fn output(&self) -> &O {
        &self.chain.output
    }

    /// Waits until every accepted event of `shard` decided so far has been
    /// through the stages and the output: before the shard is handed over.
    /// The reorder buffer lets go of what it holds first.
    pub async fn drained(&self, shard: u32) {
        self.flush(shard).await;
        self.lanes.drained(shard).await;
    }

    /// [`Self::drained`] for every shard: at stop.
    pub async fn all_drained(&self) {
        for shard in 0..self.dedup.shard_count() {
            self.flush(shard).await;
        }
        self.lanes.all_drained().await;
    }

    /// Hands what the reorder buffer holds of `shard` to its lane.
    async fn flush(&self, shard: u32) {
        if self.chain.reorder.as_ref().is_some_and(|r| r.holds(shard)) {
            self.let_go(shard, true).await;
        }
    }

    /// Settles `event` if it needs no commit, else inserts its id and
    /// queues it for the writer (waiting while the writer's queue is full).
    /// `subject`: the one the request came in on.
    pub async fn decide<'a>(&self, event: &'a Bytes, subject: &Subject) -> Step<'a> {
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
        let fingerprint = keyed.fingerprint;
        let settle = match self.dedup.check_and_insert_tracked(&keyed, now, self.tracks()) {
            Checked::Duplicate => {
                Metrics::inc(&self.metrics.duplicates);
                return Step::Done(Outcome::Verdict(Verdict::Duplicate));
            }
            Checked::Twin(settle) => {
                return Step::Commit(Pending::new(shard, fingerprint, Some(settle), None));
            }
            Checked::Unreadable(why) => {
                Metrics::inc(&self.metrics.not_ready);
                return Step::Done(Outcome::Unreadable(why));
            }
            Checked::New(None) => {
                let ticket = self.lanes.ticket(shard);
                return Step::Commit(Pending::new(shard, fingerprint, None, Some(ticket)));
            }
            Checked::New(Some(settle)) => settle,
        };
        let ticket = self.lanes.ticket(shard);
        let record = Record {
            shard,
            born_ms: now,
            fingerprint,
        };
        match (&self.publish_first, &self.writer) {
            (Some(first), writer) => {
                // Sent now, in decision order; acknowledged, then
                // committed, in a task of its own, so that events behind
                // it proceed too.
                let publish = first
                    .publish(
                        subject,
                        vec![(shard, keyed.id.clone().into_owned(), event.clone())],
                    )
                    .await
                    .pop()
                    .expect("one future per event");
                let writer = writer.clone();
                // Set to `Stopped` should the task end without setting it
                // or handing it to the writer.
                let signal = Signal::new(settle.clone());
                tokio::spawn(async move {
                    let settle = signal.settle();
                    match publish.await {
                        Err(e) => {
                            tracing::warn!(message = "The output did not take an event.", error = %e);
                            settle.set(Err(CommitFailed::Output));
                        }
                        Ok(()) => match writer {
                            None => {
                                settle.set(Ok(()));
                            }
                            // The writer sets it now (or, refusing, has set it).
                            Some(writer) => {
                                let _ = writer.submit_one(record, settle).await;
                                signal.disarm();
                            }
                        },
                    }
                });
            }
            (None, Some(writer)) => {
                if let Err(failed) = writer.submit_one(record, &settle).await {
                    return Step::Done(self.undo(fingerprint, &settle, failed));
                }
            }
            (None, None) => unreachable!("a tracked id has a writer or an output"),
        }
        Step::Commit(Pending::new(shard, fingerprint, Some(settle), Some(ticket)))
    }

    /// Whether new ids become durable after they are decided (so twins
    /// must wait for that): with a writer or an output ahead of it.
    fn tracks(&self) -> bool {
        self.writer.is_some() || self.publish_first.is_some()
    }

    /// Waits for `pending`'s commit; then hands `event` to the stages and the output and
    /// answers `New`, or forgets the id and answers the failure.
    pub async fn finish(&self, mut pending: Pending, event: Bytes, subject: &Subject) -> Outcome {
        pending.settle().await;
        let Pending {
            shard,
            fingerprint,
            settle,
            twin,
            settled,
            ticket,
        } = pending;
        match (settled.unwrap_or(Err(CommitFailed::Stopped)), twin) {
            (Ok(()), false) => {
                Metrics::inc(&self.metrics.accepted);
                let request = self.chain.output.request(subject);
                let chain = self.chain.clone();
                let delivery = async move {
                    chain.accepted(&request, shard, Accepted::One(&event)).await;
                };
                ticket.expect("a new event has a ticket").deliver(delivery).await;
                Outcome::Verdict(Verdict::New)
            }
            (Ok(()), true) => {
                Metrics::inc(&self.metrics.duplicates);
                Outcome::Verdict(Verdict::Duplicate)
            }
            (Err(failed), false) => match &settle {
                Some(settle) => self.undo(fingerprint, settle, failed),
                None => Outcome::Failed(failed),
            },
            // Its first copy's request forgets the id.
            (Err(failed), true) => {
                Metrics::inc(&self.metrics.twin_errors);
                Outcome::Failed(failed)
            }
        }
    }

    /// [`Self::decide`] then [`Self::finish`], for callers that can wait in
    /// place; `Err` with the keyed event when another node owns its shard.
    ///
    /// # Errors
    ///
    /// The keyed event, when it must be forwarded.
    pub async fn ingest<'a>(&self, event: &'a Bytes, subject: &Subject) -> Result<Outcome, Keyed<'a>> {
        match self.decide(event, subject).await {
            Step::Done(outcome) => Ok(outcome),
            Step::Elsewhere(keyed) => Err(keyed),
            Step::Commit(pending) => Ok(self.finish(pending, event.clone(), subject).await),
        }
    }

    /// Decides the lines of `body` whose shards are ready here, queues the
    /// new ids as one submission (with a [`PublishFirst`] output: sends
    /// them to it), and sets aside the lines of other nodes' shards
    /// (refused with 503 when `forwarded`: a sub-batch is never sent on
    /// again). `subject`: the one the batch came in on.
    pub async fn decide_batch(&self, body: &Bytes, forwarded: bool, subject: &Subject) -> BatchPending {
        Metrics::inc(&self.metrics.batches);
        let d = batch::decide(&self.dedup, body, unix_ms(), self.tracks(), |shard| {
            self.ownership.route(shard, forwarded)
        });
        for kind in &d.invalid {
            Metrics::inc(self.metrics.invalid(*kind));
        }
        self.metrics.not_ready.fetch_add(d.not_ready, Relaxed);
        self.metrics.duplicates.fetch_add(d.duplicates, Relaxed);
        if let Some(writer) = &self.writer
            && !d.new.is_empty()
            && self.publish_first.is_none()
        {
            // A refused submission sets the cells itself.
            let _ = writer
                .submit(d.new.iter().map(|(_, r)| *r).collect(), &d.settles)
                .await;
        }
        let tickets = d
            .new
            .chunk_by(|a, b| a.1.shard == b.1.shard)
            .map(|group| self.lanes.ticket(group[0].1.shard))
            .collect();
        let acks = match &self.publish_first {
            Some(first) if !d.new.is_empty() => {
                let events = d.new.iter().map(|(line, record)| {
                    let event = body.slice(d.lines[*line].clone());
                    // The line was keyed when it was decided; its id
                    // again, for the output's duplicate detection.
                    let id = self
                        .dedup
                        .key(&event)
                        .map(|k| k.id.into_owned())
                        .unwrap_or_default();
                    (record.shard, id, event)
                });
                first.publish(subject, events.collect()).await
            }
            _ => Vec::new(),
        };
        BatchPending {
            lines: d.lines,
            entries: d.entries,
            new: d.new,
            forward: d.forward,
            settles: d.settles.into_iter().map(Signal::new).collect(),
            twins: d.twins,
            seen: d.seen,
            tickets,
            acks,
        }
    }

    /// Waits for the batch's commit; then hands the new lines to the stages and the output,
    /// shard by shard, or forgets their ids and gives each the failure.
    /// Returns an entry per line (`None` for the lines taken by
    /// [`BatchPending::take_forwards`]).
    pub async fn finish_batch(
        &self,
        pending: BatchPending,
        body: &Bytes,
        subject: &Subject,
    ) -> Vec<Option<Entry>> {
        let BatchPending {
            lines,
            mut entries,
            new,
            settles,
            twins,
            seen,
            tickets,
            acks,
            ..
        } = pending;
        if self.publish_first.is_some() {
            self.commit_once_acknowledged(acks, &new, &settles).await;
        }
        let per_line = seen.len() / lines.len().max(1);
        let request = Arc::new(self.chain.output.request(subject));
        for ((i, group), ticket) in new
            .chunk_by(|a, b| a.1.shard == b.1.shard)
            .enumerate()
            .zip(tickets)
        {
            let result = match settles.get(i) {
                Some(signal) => signal.settle().wait().await,
                None => Ok(()), // nothing kept durable
            };
            if let Err(failed) = result {
                for (line, record) in group {
                    let outcome = self.undo(record.fingerprint, settles[i].settle(), failed);
                    entries[*line] = outcome.error().map(|(code, reason)| Entry::error(code, reason));
                }
                continue;
            }
            self.metrics.accepted.fetch_add(group.len() as u64, Relaxed);
            let ranges: Vec<Range<usize>> = group.iter().map(|(line, _)| lines[*line].clone()).collect();
            let mut seen_here = Vec::with_capacity(group.len() * per_line);
            for (line, _) in group {
                seen_here.extend_from_slice(&seen[line * per_line..(line + 1) * per_line]);
            }
            let (chain, request, body, shard) = (
                self.chain.clone(),
                request.clone(),
                body.clone(),
                group[0].1.shard,
            );
            let delivery = async move {
                let events = Accepted::Lines {
                    body: &body,
                    lines: &ranges,
                    seen: &seen_here,
                };
                chain.accepted(&request, shard, events).await;
            };
            ticket.deliver(delivery).await;
        }
        // Twins last: the commits of this batch's own first copies are
        // known by now.
        for (line, settle) in twins {
            entries[line] = Some(match first_copy(&settle).await {
                Ok(()) => {
                    Metrics::inc(&self.metrics.duplicates);
                    Entry::Duplicate
                }
                Err(failed) => {
                    Metrics::inc(&self.metrics.twin_errors);
                    let (code, reason) = failure(failed);
                    Entry::error(code, reason)
                }
            });
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
        // Ids born before the sealed tier's cut are in it.
        let since = now
            .saturating_sub(self.dedup.config().window_ms)
            .max(self.dedup.sealed_cut());
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

    /// Whether the id `name` (`<id>`, or `<shard key value>.<id>` with a
    /// `shard_key`) is remembered here, and since when; changes nothing.
    pub fn lookup(&self, name: &str) -> Admin {
        let keyed = match self.keyed_name(name) {
            Ok(keyed) => keyed,
            Err(e) => return Admin::Failed(Outcome::Invalid(e)),
        };
        match self.ownership.state(keyed.shard) {
            ShardState::Elsewhere => Admin::Elsewhere,
            ShardState::Recovering => Admin::Failed(Outcome::NotReady(keyed.shard)),
            ShardState::Ready => match self.dedup.born_ms(keyed.shard, keyed.fingerprint, unix_ms()) {
                Ok(born) => Admin::Known(born),
                Err(why) => Admin::Failed(Outcome::Unreadable(why)),
            },
        }
    }

    /// Forgets the id `name` (as [`Self::lookup`] names it), durably
    /// (journaled like an insert), so that its next event is accepted
    /// again: for operators who must replay an event on purpose. Answers
    /// what was remembered before.
    pub async fn forget(&self, name: &str) -> Admin {
        let keyed = match self.keyed_name(name) {
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
        let since = match self.dedup.born_ms(shard, fingerprint, now) {
            Ok(Some(since)) => since,
            Ok(None) => return Admin::Known(None),
            Err(why) => return Admin::Failed(Outcome::Unreadable(why)),
        };
        if let Some(writer) = &self.writer {
            let record = Record {
                shard,
                born_ms: now,
                fingerprint,
            };
            let committed = match writer.forget(record).await {
                Ok(committed) => committed.await,
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
        self.dedup.forget(shard, fingerprint, now);
        Metrics::inc(&self.metrics.forgotten);
        Admin::Known(Some(since))
    }

    /// Waits for the acknowledgement of every new line of a batch (sent
    /// to the [`PublishFirst`] output when decided); then submits each
    /// shard whose lines were all taken, and fails the others as a whole
    /// (their published lines are dropped by the stream as repeats when
    /// the producer retries).
    async fn commit_once_acknowledged(
        &self,
        acks: Vec<BoxFuture<'static, Result<(), String>>>,
        new: &[(usize, Record)],
        settles: &[Signal],
    ) {
        let mut results = futures_util::future::join_all(acks).await.into_iter();
        let (mut records, mut taken) = (Vec::new(), Vec::new());
        for (group, settle) in new
            .chunk_by(|a, b| a.1.shard == b.1.shard)
            .zip(settles.iter().map(Signal::settle))
        {
            let mut all = true;
            for result in results.by_ref().take(group.len()) {
                if let Err(e) = result {
                    tracing::warn!(message = "The output did not take an event.", error = %e);
                    all = false;
                }
            }
            if all {
                records.extend(group.iter().map(|(_, r)| *r));
                taken.push(settle.clone());
            } else {
                settle.set(Err(CommitFailed::Output));
            }
        }
        match &self.writer {
            // A refused submission sets the cells itself.
            Some(writer) if !records.is_empty() => drop(writer.submit(records, &taken).await),
            Some(_) => {}
            None => {
                for settle in &taken {
                    settle.set(Ok(()));
                }
            }
        }
    }

    /// The id `name` of a look-up or a forget: `<id>`, or `<shard key
    /// value>.<id>`.
    fn keyed_name<'a>(&self, name: &'a str) -> Result<Keyed<'a>, EventError> {
        match name.split_once('.') {
            Some((placed_by, id)) => self.dedup.key_of_id(id, Some(placed_by)),
            None => self.dedup.key_of_id(name, None),
        }
    }

    /// Forgets an id whose commit failed; the outcome to give for it.
    fn undo(&self, fingerprint: Fingerprint, settle: &Arc<Settle>, failed: CommitFailed) -> Outcome {
        self.dedup.forget_failed(fingerprint, settle);
        Outcome::Failed(failed)
    }
}

/// What the reorder buffer holds an event with: its request, and whether
/// it came in a batch.
type With<R> = (R, bool);

/// The stages and the output, shared with the shards' lanes.
struct Chain<O: Output> {
    /// What sees accepted events, in order, before the output.
    stages: Vec<Arc<dyn Stage>>,
    /// Where accepted events go last.
    output: O,
    /// Holds a session's events to release them in order (`[ordering]`).
    reorder: Option<Reorder<With<O::Request>>>,
}

impl<O: Output> Chain<O> {
    /// Hands accepted `events` of `shard` to every stage, then the output
    /// (through the reorder buffer, if there is one).
    async fn accepted(&self, request: &O::Request, shard: u32, events: Accepted<'_>) {
        match &self.reorder {
            None => self.deliver(request, shard, events).await,
            Some(reorder) => {
                let with = (request.clone(), matches!(events, Accepted::Lines { .. }));
                let taken = reorder.take(shard, events.events_seen(), &with, unix_ms());
                self.deliver_taken(request, shard, &events, &taken).await;
            }
        }
    }

    async fn deliver(&self, request: &O::Request, shard: u32, events: Accepted<'_>) {
        for stage in &self.stages {
            stage.accepted(shard, &events);
        }
        self.output.accepted(request, shard, events).await;
    }

    /// What the reorder buffer let go of on taking `events` of `request`,
    /// in order: each run of those of them that go at once, as they came
    /// (all of a batch's, in the common case, without a copy), and of
    /// events it had held.
    async fn deliver_taken(
        &self,
        request: &O::Request,
        shard: u32,
        events: &Accepted<'_>,
        taken: &[Taken<With<O::Request>>],
    ) {
        let mut rest = taken;
        while !rest.is_empty() {
            let run = rest.iter().take_while(|t| matches!(t, Taken::Now(_))).count();
            if run > 0 {
                let (now, after) = rest.split_at(run);
                rest = after;
                let now = now.iter().filter_map(|t| match t {
                    Taken::Now(i) => Some(*i),
                    Taken::Released(_) => None,
                });
                match *events {
                    Accepted::Lines { body, lines, seen } if run < lines.len() => {
                        let per_line = seen.len() / lines.len();
                        let some: Vec<Range<usize>> = now.clone().map(|i| lines[i].clone()).collect();
                        let seen: Vec<Seen> = now
                            .flat_map(|i| &seen[i * per_line..(i + 1) * per_line])
                            .copied()
                            .collect();
                        let events = Accepted::Lines {
                            body,
                            lines: &some,
                            seen: &seen,
                        };
                        self.deliver(request, shard, events).await;
                    }
                    // All of them.
                    _ => self.deliver(request, shard, *events).await,
                }
                continue;
            }
            let released: Vec<&Released<_>> = rest
                .iter()
                .map_while(|t| match t {
                    Taken::Released(r) => Some(r),
                    Taken::Now(_) => None,
                })
                .collect();
            rest = &rest[released.len()..];
            self.deliver_released(shard, &released).await;
        }
    }

    /// Events released by the reorder buffer, in order: each run of
    /// those that came in batches, under requests that go out alike, as
    /// one batch (one message per output subject, as a batch's own events
    /// go), with the fields read with their keys; the others one each.
    async fn deliver_released(&self, shard: u32, released: &[&Released<With<O::Request>>]) {
        let mut rest = released;
        while let Some(first) = rest.first() {
            let (request, batched) = &first.with;
            let run = match batched {
                true => rest
                    .iter()
                    .take_while(|r| {
                        let (next, batched) = &r.with;
                        *batched && self.output.joins(request, next)
                    })
                    .count(),
                false => 1,
            };
            let (now, after) = rest.split_at(run);
            rest = after;
            if run == 1 {
                self.deliver(request, shard, Accepted::One(&first.event)).await;
                continue;
            }
            let mut body = Vec::with_capacity(now.iter().map(|r| r.event.len()).sum());
            let lines: Vec<Range<usize>> = now
                .iter()
                .map(|r| {
                    body.extend_from_slice(&r.event);
                    body.len() - r.event.len()..body.len()
                })
                .collect();
            // The fields, if every event has them.
            let per_line = first.seen.len();
            let seen: Vec<Seen> = match now.iter().all(|r| r.seen.len() == per_line) {
                true => now.iter().flat_map(|r| r.seen.iter().copied()).collect(),
                false => Vec::new(),
            };
            let body = Bytes::from(body);
            let events = Accepted::Lines {
                body: &body,
                lines: &lines,
                seen: &seen,
            };
            self.deliver(request, shard, events).await;
        }
    }
}

#[cfg(test)]
mod tests;
