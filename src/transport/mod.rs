//! Thin adapters between the outside world and the [`crate::pipeline`]:
//! they receive requests, hand them to the pipeline, and turn its outcomes
//! into replies. NATS subscriptions, and the [`http`] gateway beside them
//! (which reaches other nodes through the same [`forward`]er).
//!
//! | module | role |
//! |---|---|
//! | [`subscription`] | one task per subscription; its [`Kind`] decides how messages are handled |
//! | [`forward`] | events and sub-batches of shards owned elsewhere, for both transports |
//! | [`fence`] | unsubscribing without dropping a routed request |
//! | [`discovery`] | `$SRV.PING/INFO/STATS` for `nats micro` |
//! | [`http`] | the HTTP gateway: events, batches, look-ups, forgets, health, readiness, metrics |

pub mod discovery;
pub mod fence;
pub mod forward;
pub mod http;
pub mod subscription;

use std::sync::Arc;

use async_nats::Subject;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::nats::NatsError;
use crate::shared::Shared;

pub use subscription::Kind;

/// The reply body of a new event, on every transport.
pub const ACCEPTED: &[u8] = br#"{"accepted":true}"#;
/// The reply body of a duplicate, on every transport.
pub const DUPLICATE: &[u8] = br#"{"accepted":false}"#;

/// The header of a request one node sends on to another: the subject the
/// producer's request came in on (the routing rules' `subject`), so that
/// the owner routes by it rather than by the subject of the forward.
pub const SUBJECT_HEADER: &str = "Eventsieve-Subject";

/// Subscribes to `kind`'s subject (in its queue group, if any).
async fn subscribe(ctx: &Arc<Shared>, kind: Kind) -> Result<(subscription::Listener, Subject), NatsError> {
    let (subject, queue, fence_subject) = kind.subjects(&ctx.subjects);
    let sub = match queue {
        Some(q) => ctx.client.queue_subscribe(subject.clone(), q).await,
        None => ctx.client.subscribe(subject.clone()).await,
    }
    .map_err(|e| NatsError::Subscribe(format!("{subject}: {e}")))?;
    let served = subscription::Listener {
        ctx: ctx.clone(),
        kind,
        sub,
        received: 0,
    };
    Ok((served, fence_subject))
}

/// One subscription served in a task of its own and stopped on its own:
/// a shard's, while this node holds the shard's lease.
pub struct Serving {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    /// Subscribes to `kind` and serves it.
    ///
    /// # Errors
    ///
    /// [`NatsError::Subscribe`] if the subscription cannot be made.
    pub async fn start(ctx: &Arc<Shared>, kind: Kind) -> Result<Self, NatsError> {
        let (served, fence_subject) = subscribe(ctx, kind).await?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(subscription::serve(served, fence_subject, stop_rx));
        Ok(Self { stop, task })
    }

    /// Fences the subscription and answers every request routed to it
    /// before the fence.
    pub async fn drain(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The running subscriptions.
pub struct Transport {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Transport {
    /// Subscribes to every kind in `kinds` and serves each in its own task.
    ///
    /// # Errors
    ///
    /// [`NatsError::Subscribe`] if a subscription cannot be made, or
    /// [`NatsError::Connect`] if the server does not confirm them.
    pub async fn start(ctx: Arc<Shared>, kinds: &[Kind]) -> Result<Self, NatsError> {
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for &kind in kinds {
            let (served, fence_subject) = subscribe(&ctx, kind).await?;
            tasks.spawn(subscription::serve(served, fence_subject, stop_rx.clone()));
        }
        // The service confirms every subscription with the server once, at
        // the end of its start (`registered`).
        Ok(Self { stop, tasks })
    }

    /// Fences every subscription and answers every request routed here
    /// before its fence. Waits on the server: bound it with a timeout.
    pub async fn drain(&mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stops every subscription task at once; requests they held go
    /// unanswered.
    pub fn abort(&mut self) {
        self.tasks.abort_all();
    }
}
