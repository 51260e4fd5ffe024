//! The NATS transport: subscriptions by kind, replies, forwarding to other
//! sidecars, republish of accepted events, shutdown fences and `$SRV`
//! discovery.
//!
//! | module | role |
//! |---|---|
//! | [`options`] | connection options from `[nats]`, and connecting |
//! | [`subjects`] | every subject, built in one place |
//! | [`subscription`] | one task per subscription; its [`Kind`] decides how messages are handled |
//! | [`forward`] | events and sub-batches of shards owned elsewhere |
//! | [`fence`] | unsubscribing without dropping a routed request |
//! | [`discovery`] | `$SRV.PING/INFO/STATS` for `nats micro` |

pub mod discovery;
pub mod fence;
pub mod forward;
pub mod options;
pub mod subjects;
pub mod subscription;

use std::sync::Arc;

use async_nats::{Client, Subject};
use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::observe::metrics::Metrics;
use crate::pipeline::{Hook, Pipeline};
use crate::transport::budget::Budget;

pub use subjects::Subjects;
pub use subscription::Kind;

/// Why the NATS transport could not start.
#[derive(Debug)]
pub enum NatsError {
    /// The server could not be reached or refused the connection.
    Connect(String),
    /// A subscription could not be made.
    Subscribe(String),
}

impl std::fmt::Display for NatsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "cannot connect to NATS: {e}"),
            Self::Subscribe(e) => write!(f, "cannot subscribe: {e}"),
        }
    }
}

impl std::error::Error for NatsError {}

/// The pipeline hook that republishes accepted events, each as its own
/// message on its shard's output subject. Core NATS: at most once.
pub struct Republish {
    client: Client,
    /// The output subject of each shard.
    output: Box<[Subject]>,
    metrics: Arc<Metrics>,
}

impl Republish {
    pub fn new(client: Client, subjects: &Subjects, shards: u32, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            output: (0..shards).map(|s| subjects.output(s)).collect(),
            metrics,
        }
    }
}

impl Hook for Republish {
    async fn accepted(&self, shard: u32, events: &[Bytes]) {
        for event in events {
            if self
                .client
                .publish(self.output[shard as usize].clone(), event.clone())
                .await
                .is_err()
            {
                Metrics::inc(&self.metrics.publish_errors);
            }
        }
    }
}

/// What every subscription task shares.
pub struct Context {
    pub pipeline: Arc<Pipeline<Republish>>,
    /// Bytes of requests held at once.
    pub budget: Budget,
    pub client: Client,
    pub subjects: Subjects,
    pub metrics: Arc<Metrics>,
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
    pub async fn start(ctx: Arc<Context>, kinds: &[Kind]) -> Result<Self, NatsError> {
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for &kind in kinds {
            let (subject, queue, fence_subject) = kind.subjects(&ctx.subjects);
            let sub = match queue {
                Some(q) => ctx.client.queue_subscribe(subject.clone(), q).await,
                None => ctx.client.subscribe(subject.clone()).await,
            }
            .map_err(|e| NatsError::Subscribe(format!("{subject}: {e}")))?;
            let served = subscription::Served {
                ctx: ctx.clone(),
                kind,
                sub,
                received: 0,
            };
            tasks.spawn(subscription::serve(served, fence_subject, stop_rx.clone()));
        }
        ctx.client
            .flush()
            .await
            .map_err(|e| NatsError::Connect(e.to_string()))?;
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
