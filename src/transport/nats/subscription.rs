//! One task per subscription. Each subscription knows at creation what it
//! carries ([`Kind`]); its messages go to the pipeline as single events or
//! as batches, and the outcomes come back as replies.
//!
//! Single events are decided in the subscription's task, without a task of
//! their own; those waiting for their group commit are kept in that task
//! ([`Work`]) and answered as their commits complete. Batches and forwards
//! get a task each, at most [`MAX_TASKS`] per subscription.

use std::pin::Pin;
use std::sync::Arc;

use async_nats::{HeaderMap, Message, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::engine::Verdict;
use crate::engine::batch;
use crate::observe::metrics::Metrics;
use crate::pipeline::{Outcome, Step};
use crate::transport::nats::subjects::Subjects;
use crate::transport::nats::{Context, fence, forward};

/// Most batches and forwards one subscription has in progress.
const MAX_TASKS: usize = 256;

const ACCEPTED: &[u8] = br#"{"accepted":true}"#;
const DUPLICATE: &[u8] = br#"{"accepted":false}"#;

/// What a subscription carries, decided when it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `<prefix>.shard.<n>.*`: single events for shard `n`, owned here.
    Shard(u32),
    /// `<prefix>.ingest`: single events of any shard (queue group).
    Ingest,
    /// `<prefix>.batch`: producers' batches (queue group).
    Batch,
    /// `<prefix>.internal.batch.<n>`: sub-batches other sidecars forward
    /// for shard `n`; never forwarded again.
    SubBatch(u32),
}

impl Kind {
    /// The subject, the queue group, and the subject its fences go to.
    pub fn subjects(self, s: &Subjects) -> (String, Option<String>, Subject) {
        match self {
            Kind::Shard(n) => (s.shard_events(n), None, s.shard_fence(n).into()),
            Kind::Ingest => (s.ingest(), Some(s.ingest()), s.ingest().into()),
            Kind::Batch => (s.batch(), Some(s.batch()), s.batch().into()),
            Kind::SubBatch(n) => (s.sub_batch(n), None, s.sub_batch(n).into()),
        }
    }
}

/// A subscription being served.
pub struct Served {
    pub(crate) ctx: Arc<Context>,
    pub(crate) kind: Kind,
    pub(crate) sub: async_nats::Subscriber,
    /// Messages taken from `sub` so far (the fence counts on it).
    pub(crate) received: u64,
}

type Waiting = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a subscription's task has in progress.
#[derive(Default)]
pub struct Work {
    /// Single events waiting for their commit, answered when it completes.
    waiting: FuturesUnordered<Waiting>,
    /// Batches and forwards.
    tasks: JoinSet<()>,
}

impl Work {
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Completes when one waiting event has been answered.
    pub async fn completed(&mut self) {
        self.waiting.next().await;
    }

    /// Runs `task`, first waiting while [`MAX_TASKS`] are running.
    async fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        while self.tasks.len() >= MAX_TASKS {
            self.tasks.join_next().await;
        }
        self.tasks.spawn(task);
    }

    /// Answers everything still in progress.
    async fn finish(mut self) {
        while self.waiting.next().await.is_some() {}
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Serves `served` until `stop` changes; then fences it and answers every
/// request routed to it before the fence.
pub async fn serve(mut served: Served, fence_subject: Subject, mut stop: watch::Receiver<bool>) {
    let mut work = Work::default();
    loop {
        tokio::select! {
            biased;
            () = work.completed(), if work.has_waiting() => {}
            message = served.sub.next() => match message {
                Some(message) => {
                    served.received += 1;
                    served.handle(message, &mut work).await;
                }
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
    work.finish().await;
}

impl Served {
    pub(crate) async fn handle(&self, message: Message, work: &mut Work) {
        if fence::is_fence(&message) {
            return;
        }
        match self.kind {
            Kind::Shard(_) | Kind::Ingest => single(&self.ctx, message, work).await,
            Kind::Batch => work.spawn(batch(self.ctx.clone(), message, false)).await,
            Kind::SubBatch(_) => work.spawn(batch(self.ctx.clone(), message, true)).await,
        }
    }
}

/// One event: settled at once, forwarded to its owner, or answered when its
/// commit completes.
async fn single(ctx: &Arc<Context>, message: Message, work: &mut Work) {
    let Message { payload, reply, .. } = message;
    match ctx.pipeline.decide(&payload).await {
        Step::Done(outcome) => answer(ctx, reply, &outcome).await,
        Step::Elsewhere(keyed) => {
            let target = ctx.subjects.shard_event(keyed.shard, &keyed.id);
            work.spawn(forward::single(ctx.clone(), target, payload.clone(), reply))
                .await;
        }
        Step::Commit(pending) => {
            let ctx = ctx.clone();
            let event = payload.clone();
            work.waiting.push(Box::pin(async move {
                let outcome = ctx.pipeline.finish(pending, event).await;
                answer(&ctx, reply, &outcome).await;
            }));
        }
    }
}

/// A batch: this node's lines decided and committed while the others are
/// forwarded to their owners; then one reply with an entry per line.
async fn batch(ctx: Arc<Context>, message: Message, forwarded: bool) {
    let body = message.payload;
    let mut pending = ctx.pipeline.decide_batch(&body, forwarded).await;
    let forwards = pending.take_forwards();
    let (mut entries, answers) = tokio::join!(
        ctx.pipeline.finish_batch(pending, &body),
        forward::sub_batches(&ctx, forwards)
    );
    for (lines, got) in answers {
        for (line, entry) in lines.into_iter().zip(got) {
            entries[line] = Some(entry);
        }
    }
    let Some(to) = message.reply else { return };
    let mut out = Vec::with_capacity(entries.len() * 2);
    for entry in &entries {
        let entry = entry.as_ref().expect("every line of a batch gets an entry");
        batch::push(&mut out, entry);
    }
    publish(&ctx, to, out.into()).await;
}

/// The reply to a single event.
pub(crate) async fn answer(ctx: &Context, to: Option<Subject>, outcome: &Outcome) {
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
pub(crate) async fn reply_error(ctx: &Context, to: Subject, code: u16, reason: &str) {
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

pub(crate) async fn publish(ctx: &Context, to: Subject, body: Bytes) {
    if ctx.client.publish(to, body).await.is_err() {
        Metrics::inc(&ctx.metrics.publish_errors);
    }
}
