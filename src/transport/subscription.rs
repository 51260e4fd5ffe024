//! One task per subscription. Each subscription knows at creation what it
//! carries ([`Kind`]); its messages go to the pipeline as single events or
//! as batches, and the outcomes come back as replies.
//!
//! Single events are decided in the subscription's task, without a task of
//! their own; those waiting for their group commit are queued in that task
//! ([`Work`]) and answered as their commits complete. The writer signals in
//! the order it was given ids, so a subscription's waiting events settle in
//! its queue's order: the task waits on the oldest only, then answers every
//! event behind it that has settled too. Batches and forwards get a task
//! each, at most `MAX_TASKS` per subscription.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use async_nats::{HeaderMap, Message, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::engine::Verdict;
use crate::engine::batch;
use crate::nats::subjects::Subjects;
use crate::observe::metrics::{Endpoint, Metrics};
use crate::pipeline::{Admin, BatchPending, Outcome, Pending, Step};
use crate::shared::Shared;
use crate::shared::budget::Held;
use crate::transport::fence;
use crate::transport::forward::{self, SubBatches};
use crate::transport::{ACCEPTED, DUPLICATE, SUBJECT_HEADER};

/// Most batches and forwards one subscription has in progress.
const MAX_TASKS: usize = 256;

/// What a subscription carries, decided when it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `<prefix>.shard.<n>.*`: single events for shard `n`, owned here.
    Shard(u32),
    /// `<prefix>.shard.*.*`: single events of every shard, when this node
    /// owns them all (one subscription instead of one per shard).
    AllShards,
    /// `<prefix>.ingest`: single events of any shard (queue group).
    Ingest,
    /// `<prefix>.batch`: producers' batches (queue group).
    Batch,
    /// `<prefix>.internal.batch.<n>`: sub-batches other sidecars forward
    /// for shard `n`; never forwarded again.
    SubBatch(u32),
    /// `<prefix>.internal.batch.*`: sub-batches of every shard, when this
    /// node owns them all.
    AllSubBatches,
    /// `<prefix>.batches.<n>.*`: producers' batches sent to
    /// `<prefix>.batch.<token>`, which the server maps by the token's
    /// partition to the owner of shard `n`: one producer's batches (one
    /// token) reach one node, in the order sent.
    PinnedBatch(u32),
    /// `<prefix>.batches.*.*`: every shard's, when this node owns them all.
    AllPinnedBatches,
    /// `<prefix>.lookup.<id>` and `<prefix>.forget.<id>`: every node
    /// receives them (no queue group); the owner of the id's shard answers,
    /// the others stay silent.
    Lookup,
    Forget,
}

impl Kind {
    /// The subscriptions that come and go with shard `shard`.
    pub fn of_shard(shard: u32) -> [Kind; 3] {
        [
            Kind::Shard(shard),
            Kind::SubBatch(shard),
            Kind::PinnedBatch(shard),
        ]
    }

    /// The endpoint its requests count under in `$SRV.STATS`.
    pub fn endpoint(self) -> Endpoint {
        match self {
            Kind::Shard(_) | Kind::AllShards => Endpoint::Shards,
            Kind::Ingest => Endpoint::Ingest,
            Kind::Batch | Kind::PinnedBatch(_) | Kind::AllPinnedBatches => Endpoint::Batch,
            Kind::SubBatch(_) | Kind::AllSubBatches => Endpoint::SubBatches,
            Kind::Lookup => Endpoint::Lookup,
            Kind::Forget => Endpoint::Forget,
        }
    }

    /// `message` with the subject the producer's request came in on: the
    /// forwarding node's [`SUBJECT_HEADER`] on the subjects forwards go to
    /// (shards, sub-batches), else its own.
    fn took_in(self, mut message: Message) -> Message {
        let forwards_here = matches!(
            self,
            Kind::Shard(_) | Kind::AllShards | Kind::SubBatch(_) | Kind::AllSubBatches
        );
        if forwards_here && let Some(on) = message.headers.as_ref().and_then(|h| h.get(SUBJECT_HEADER)) {
            message.subject = Subject::from(on.as_str());
        }
        message
    }

    /// The subject, the queue group, and the subject its fences go to.
    pub fn subjects(self, s: &Subjects) -> (String, Option<String>, Subject) {
        match self {
            Kind::Shard(n) => (s.shard_events(n), None, s.shard_fence(n).into()),
            Kind::AllShards => (s.all_shard_events(), None, s.shard_fence(0).into()),
            Kind::Ingest => (s.ingest(), Some(s.ingest()), s.ingest().into()),
            Kind::Batch => (s.batch(), Some(s.batch()), s.batch().into()),
            Kind::SubBatch(n) => (s.sub_batch(n), None, s.sub_batch(n).into()),
            Kind::AllSubBatches => (s.all_sub_batches(), None, s.sub_batch(0).into()),
            Kind::PinnedBatch(n) => (s.pinned_batches(n), None, s.pinned_fence(n).into()),
            Kind::AllPinnedBatches => (s.all_pinned_batches(), None, s.pinned_fence(0).into()),
            // Every node receives these fences and skips them.
            Kind::Lookup => (s.lookup(), None, s.admin_fence("lookup").into()),
            Kind::Forget => (s.forget(), None, s.admin_fence("forget").into()),
        }
    }
}

/// A subscription being served.
pub struct Listener {
    pub(crate) ctx: Arc<Shared>,
    pub(crate) kind: Kind,
    pub(crate) sub: async_nats::Subscriber,
    /// Messages taken from `sub` so far (the fence counts on it).
    pub(crate) received: u64,
}

/// A single event waiting for its commit.
struct Waiting {
    pending: Pending,
    event: Bytes,
    /// The subject the producer's request came in on.
    came_in_on: Subject,
    reply: Option<Subject>,
    /// When it was received, and on which endpoint (for `$SRV.STATS`).
    started: Instant,
    endpoint: Endpoint,
    /// The event's bytes in the budget, given back once answered.
    _held: Held,
}

/// What a subscription's task has in progress.
#[derive(Default)]
pub struct Work {
    /// Single events waiting for their commit, oldest first.
    waiting: VecDeque<Waiting>,
    /// Batches and forwards.
    tasks: JoinSet<()>,
    /// Completes once the last batch taken has been decided (and its
    /// sub-batches sent on): the next one decides after it.
    last_decided: Option<oneshot::Receiver<()>>,
}

impl Work {
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Completes when the oldest waiting event's commit has settled.
    /// Cancel-safe.
    pub async fn settled(&mut self) {
        if let Some(front) = self.waiting.front_mut() {
            front.pending.settle().await;
        }
    }

    /// Answers the waiting events whose commits have settled, oldest first.
    pub async fn answer_settled(&mut self, ctx: &Shared) {
        while let Some(front) = self.waiting.front_mut() {
            if !front.pending.is_settled() {
                break;
            }
            let Some(Waiting {
                pending,
                event,
                came_in_on,
                reply,
                started,
                endpoint,
                ..
            }) = self.waiting.pop_front()
            else {
                break;
            };
            let outcome = ctx.pipeline.finish(pending, event, &came_in_on).await;
            answer(ctx, reply, &outcome).await;
            ctx.metrics.served(endpoint, started, outcome.error().is_some());
        }
    }

    /// Runs `task`, first waiting while `MAX_TASKS` are running.
    async fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        while self.tasks.len() >= MAX_TASKS {
            self.tasks.join_next().await;
        }
        self.tasks.spawn(task);
    }

    /// Answers everything still in progress.
    async fn finish(mut self, ctx: &Shared) {
        while let Some(Waiting {
            pending,
            event,
            came_in_on,
            reply,
            ..
        }) = self.waiting.pop_front()
        {
            let outcome = ctx.pipeline.finish(pending, event, &came_in_on).await;
            answer(ctx, reply, &outcome).await;
        }
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The subscriptions of a node that owns `owned` of `shards` shards: one
/// per owned shard, or one wildcard when it owns them all.
pub fn kinds(owned: &[u32], shards: u32) -> Vec<Kind> {
    let mut kinds = if owned.len() == shards as usize {
        vec![Kind::AllShards, Kind::AllSubBatches, Kind::AllPinnedBatches]
    } else {
        owned.iter().flat_map(|&s| Kind::of_shard(s)).collect()
    };
    kinds.extend([Kind::Ingest, Kind::Batch, Kind::Lookup, Kind::Forget]);
    kinds
}

/// Serves `served` until `stop` changes; then fences it and answers every
/// request routed to it before the fence.
pub async fn serve(mut served: Listener, fence_subject: Subject, mut stop: watch::Receiver<bool>) {
    let mut work = Work::default();
    loop {
        tokio::select! {
            biased;
            () = work.settled(), if work.has_waiting() => work.answer_settled(&served.ctx).await,
            message = served.sub.next() => match message {
                Some(message) => served.handle(message, &mut work).await,
                None => break,
            },
            _ = stop.changed() => {
                fence::fence(&mut served, &fence_subject, &mut work).await;
                break;
            }
        }
        // Reap finished tasks so the set stays small.
        while work.tasks.try_join_next().is_some() {}
    }
    work.finish(&served.ctx).await;
}

impl Listener {
    /// Counts `message` (the fence relies on the count) and handles it.
    pub(crate) async fn handle(&mut self, message: Message, work: &mut Work) {
        let started = Instant::now();
        self.received += 1;
        if fence::is_fence(&message) {
            return;
        }
        if let Some(reply) = &message.reply
            && self.ctx.subjects.is_ours(reply)
        {
            Metrics::inc(&self.ctx.metrics.refused_replies);
            tracing::debug!(message = "Request dropped: its reply subject is one of the sidecar's own.", reply = %reply);
            return;
        }
        let batch_kind = matches!(
            self.kind,
            Kind::Batch
                | Kind::SubBatch(_)
                | Kind::AllSubBatches
                | Kind::PinnedBatch(_)
                | Kind::AllPinnedBatches
        );
        let endpoint = self.kind.endpoint();
        let Some(held) = self.ctx.budget.try_hold(message.payload.len()) else {
            overloaded(&self.ctx, message, batch_kind).await;
            return self.ctx.metrics.served(endpoint, started, true);
        };
        let ctx = self.ctx.clone();
        let message = self.kind.took_in(message);
        match self.kind {
            Kind::Shard(_) | Kind::AllShards | Kind::Ingest => {
                single(&ctx, message, work, held, (started, endpoint)).await;
            }
            Kind::Batch
            | Kind::SubBatch(_)
            | Kind::AllSubBatches
            | Kind::PinnedBatch(_)
            | Kind::AllPinnedBatches => {
                // In a task, decided after the batch taken before it (so a
                // shard's lines leave in the order received), while this
                // task reads on (and refuses what the budget has no room
                // for).
                let forwarded = endpoint == Endpoint::SubBatches;
                let (decided, next) = oneshot::channel();
                let turn = work.last_decided.replace(next);
                work.spawn(async move {
                    if let Some(turn) = turn {
                        let _ = turn.await;
                    }
                    let mut pending = ctx
                        .pipeline
                        .decide_batch(&message.payload, forwarded, &message.subject)
                        .await;
                    let forwards =
                        forward::sub_batches(&ctx, &message.subject, pending.take_forwards()).await;
                    drop(decided);
                    batch(ctx.clone(), message, (pending, forwards), held).await;
                    ctx.metrics.served(endpoint, started, false);
                })
                .await;
            }
            Kind::Lookup | Kind::Forget => admin(ctx, message, self.kind, work, started).await,
        }
    }
}

/// A look-up or a forget: the id is what follows `<prefix>.<verb>.` (with
/// a `shard_key`: its value, a dot, the id).
async fn admin(ctx: Arc<Shared>, message: Message, kind: Kind, work: &mut Work, started: Instant) {
    let Some(to) = message.reply else { return };
    let verb = if kind == Kind::Lookup { "lookup" } else { "forget" };
    let id = message
        .subject
        .strip_prefix(ctx.subjects.prefix())
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|rest| rest.strip_prefix(verb))
        .and_then(|rest| rest.strip_prefix('.'))
        .unwrap_or_default()
        .to_string();
    if kind == Kind::Lookup {
        let admin = ctx.pipeline.lookup(&id);
        let error = matches!(admin, Admin::Failed(_));
        admin_reply(&ctx, to, admin, "remembered").await;
        return ctx.metrics.served(Endpoint::Lookup, started, error);
    }
    work.spawn(async move {
        let admin = ctx.pipeline.forget(&id).await;
        let error = matches!(admin, Admin::Failed(_));
        admin_reply(&ctx, to, admin, "forgotten").await;
        ctx.metrics.served(Endpoint::Forget, started, error);
    })
    .await;
}

/// `{"<what>":true,"since":<ms>}`, `{"<what>":false}`, an error reply, or
/// silence when another node answers.
async fn admin_reply(ctx: &Shared, to: Subject, admin: Admin, what: &str) {
    let body = match admin {
        Admin::Elsewhere => return,
        Admin::Failed(outcome) => {
            let (code, reason) = outcome.error().expect("a failure");
            return reply_error(ctx, to, code, &reason).await;
        }
        Admin::Known(Some(since)) => serde_json::json!({ what: true, "since": since }),
        Admin::Known(None) => serde_json::json!({ what: false }),
    };
    publish(ctx, to, body.to_string().into()).await;
}

/// A request the budget has no room for: 503 at once (one entry per line
/// for a batch), so that its bytes are freed.
async fn overloaded(ctx: &Shared, message: Message, batch_kind: bool) {
    Metrics::inc(&ctx.metrics.overloaded);
    let Some(to) = message.reply else { return };
    let reason = ctx.budget.refusal();
    if batch_kind {
        let entry = batch::Entry::error(503, reason);
        let mut out = Vec::new();
        let frames = ctx.pipeline.dedup().config().format.split(&message.payload);
        for _ in 0..frames.ranges.len() + usize::from(frames.truncated.is_some()) {
            batch::push(&mut out, &entry);
        }
        publish(ctx, to, out.into()).await;
    } else {
        reply_error(ctx, to, 503, &reason).await;
    }
}

/// One event: settled at once, forwarded to its owner, or answered when its
/// commit completes; `held` goes back to the budget once it is answered.
/// `(started, endpoint)`: when it was received and where it counts.
async fn single(ctx: &Arc<Shared>, message: Message, work: &mut Work, held: Held, at: (Instant, Endpoint)) {
    let (started, endpoint) = at;
    let Message {
        payload,
        reply,
        subject: came_in_on,
        ..
    } = message;
    match ctx.pipeline.decide(&payload, &came_in_on).await {
        Step::Done(outcome) => {
            answer(ctx, reply, &outcome).await;
            ctx.metrics.served(endpoint, started, outcome.error().is_some());
        }
        Step::Elsewhere(keyed) => {
            let target = ctx.subjects.shard_event(keyed.shard, &keyed.id);
            // Sent now, in the order received; answered in a task.
            let forwarding = forward::single(ctx.clone(), (target, came_in_on), payload.clone(), reply).await;
            let ctx = ctx.clone();
            work.spawn(async move {
                let error = forwarding.await;
                ctx.metrics.served(endpoint, started, error);
                drop(held);
            })
            .await;
        }
        Step::Commit(pending) => {
            let event = payload.clone();
            work.waiting.push_back(Waiting {
                pending,
                event,
                came_in_on,
                reply,
                started,
                endpoint,
                _held: held,
            });
            // Nothing to wait for without a journal: answer at once.
            work.answer_settled(ctx).await;
        }
    }
}

/// A batch whose lines of this node are decided: committed while the
/// others are forwarded to their owners; then one reply with an entry per
/// line.
async fn batch(ctx: Arc<Shared>, message: Message, decided: (BatchPending, SubBatches), _held: Held) {
    let out = batch_answer(&ctx, decided, &message.payload, &message.subject).await;
    let Some(to) = message.reply else { return };
    publish(&ctx, to, out.into()).await;
}

/// Decides a batch that came in on `came_in_on` (this node's lines here,
/// the others' by their owners) and returns its reply body: an entry per
/// line, in order.
pub(crate) async fn batch_reply(
    ctx: &Arc<Shared>,
    body: &Bytes,
    came_in_on: &Subject,
    forwarded: bool,
) -> Vec<u8> {
    let mut pending = ctx.pipeline.decide_batch(body, forwarded, came_in_on).await;
    let forwards = forward::sub_batches(ctx, came_in_on, pending.take_forwards()).await;
    batch_answer(ctx, (pending, forwards), body, came_in_on).await
}

/// [`batch_reply`] once the batch is decided.
async fn batch_answer(
    ctx: &Arc<Shared>,
    (pending, forwards): (BatchPending, SubBatches),
    body: &Bytes,
    came_in_on: &Subject,
) -> Vec<u8> {
    let (mut entries, answers) = tokio::join!(ctx.pipeline.finish_batch(pending, body, came_in_on), forwards);
    for (lines, got) in answers {
        for (line, entry) in lines.into_iter().zip(got) {
            entries[line] = Some(entry);
        }
    }
    let mut out = Vec::with_capacity(entries.len() * 2);
    for entry in &entries {
        let entry = entry.as_ref().expect("every line of a batch gets an entry");
        batch::push(&mut out, entry);
    }
    out
}

/// The reply to a single event.
pub(crate) async fn answer(ctx: &Shared, to: Option<Subject>, outcome: &Outcome) {
    let Some(to) = to else { return };
    match outcome {
        Outcome::Verdict(Verdict::New) => publish(ctx, to, Bytes::from_static(ACCEPTED)).await,
        Outcome::Verdict(Verdict::Duplicate) => publish(ctx, to, Bytes::from_static(DUPLICATE)).await,
        other => {
            let (code, reason) = other.error().expect("not a verdict");
            if code == 400 {
                tracing::debug!(message = "Rejected event.", %reason);
            }
            reply_error(ctx, to, code, &reason).await;
        }
    }
}

/// A NATS service error reply: `Nats-Service-Error-Code` and
/// `Nats-Service-Error` headers, and the same as a JSON body.
pub(crate) async fn reply_error(ctx: &Shared, to: Subject, code: u16, reason: &str) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Service-Error-Code", code.to_string().as_str());
    headers.insert("Nats-Service-Error", reason);
    let body = serde_json::json!({ "error": reason, "code": code }).to_string();
    if ctx
        .client
        .publish_with_headers(to, headers, body.into())
        .await
        .is_err()
    {
        Metrics::inc(&ctx.metrics.publish_errors);
    }
}

pub(crate) async fn publish(ctx: &Shared, to: Subject, body: Bytes) {
    if ctx.client.publish(to, body).await.is_err() {
        Metrics::inc(&ctx.metrics.publish_errors);
    }
}
