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
//! | [`jetstream`] | `output = "jetstream"`: new events into a stream, acknowledged before the commit |
//! | [`kv`] | the KV bucket the sidecars share: opened or created, per-key TTL |

pub mod discovery;
pub mod fence;
pub mod forward;
pub mod jetstream;
pub mod kv;
pub mod options;
pub mod subjects;
pub mod subscription;

use std::sync::Arc;

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::BatchOutput;
use crate::engine::batch;
use crate::observe::metrics::Metrics;
use crate::pipeline::{Accepted, Hook, Pipeline};
use crate::stages::Stages;
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

/// Returns once the server has processed every subscription this client
/// made before the call. `Client::flush` only writes the socket; a message
/// the client sends itself and gets back has passed the server after them
/// (a server handles one connection's protocol in order).
///
/// # Errors
///
/// If the message does not come back within 10 s.
pub async fn registered(client: &Client) -> Result<(), NatsError> {
    use futures_util::StreamExt;
    let inbox = client.new_inbox();
    let mut echo = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| NatsError::Subscribe(e.to_string()))?;
    client
        .publish(inbox, Bytes::new())
        .await
        .map_err(|e| NatsError::Connect(e.to_string()))?;
    match tokio::time::timeout(std::time::Duration::from_secs(10), echo.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err(NatsError::Connect(
            "the server did not confirm the subscriptions within 10 s".into(),
        )),
    }
}

/// The header of a batch's per-shard output message: how many events
/// (lines) it holds.
pub const COUNT_HEADER: &str = "Eventsieve-Count";

/// Room left for the headers of a per-shard message under the server's
/// `max_payload`.
const HEADER_ROOM: usize = 64;

/// The pipeline hook that republishes accepted events on their shard's
/// output subject: a single-event request's event as its own message; a
/// batch's new events of one shard as one message (its lines joined by
/// `\n`, with [`COUNT_HEADER`]), or one message each with
/// [`BatchOutput::PerEvent`]. Core NATS: at most once.
pub struct Republish {
    client: Client,
    /// The output subject of each shard.
    output: Box<[Subject]>,
    batch_output: BatchOutput,
    /// False when new events go to a JetStream stream before their commit
    /// instead ([`jetstream::JetStreamOutput`]).
    core: bool,
    /// The largest message the server takes, as it said when connecting.
    max_payload: usize,
    metrics: Arc<Metrics>,
    /// Aggregates fed with each accepted event before it is republished.
    stages: Option<Arc<Stages>>,
}

impl Republish {
    pub fn new(
        client: Client,
        subjects: &Subjects,
        shards: u32,
        batch_output: BatchOutput,
        core: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        let max_payload = client.server_info().max_payload;
        Self {
            client,
            output: (0..shards).map(|s| subjects.output(s)).collect(),
            batch_output,
            core,
            max_payload,
            metrics,
            stages: None,
        }
    }

    /// Feeds `stages` with every accepted event too.
    pub fn with_stages(mut self, stages: Arc<Stages>) -> Self {
        self.stages = Some(stages);
        self
    }

    async fn publish(&self, subject: &Subject, headers: Option<HeaderMap>, payload: Bytes) {
        let subject = subject.clone();
        let sent = match headers {
            Some(headers) => self.client.publish_with_headers(subject, headers, payload).await,
            None => self.client.publish(subject, payload).await,
        };
        if sent.is_err() {
            Metrics::inc(&self.metrics.publish_errors);
        }
    }
}

impl Hook for Republish {
    async fn accepted(&self, shard: u32, events: Accepted<'_>) {
        if let Some(stages) = &self.stages {
            stages.observe(&events);
        }
        if !self.core {
            return;
        }
        let subject = &self.output[shard as usize];
        match (events, self.batch_output) {
            (Accepted::Lines { body, lines, .. }, BatchOutput::PerShard) => {
                let limit = self.max_payload.saturating_sub(HEADER_ROOM);
                for (payload, count) in batch::join(body, lines, limit) {
                    // A line too long for a header beside it goes bare: a
                    // message without the header is one event.
                    let headers = (payload.len() <= limit).then(|| {
                        const NAME: HeaderName = HeaderName::from_static(COUNT_HEADER);
                        let mut headers = HeaderMap::new();
                        headers.insert(NAME, HeaderValue::from(count));
                        headers
                    });
                    self.publish(subject, headers, payload.into()).await;
                }
            }
            (events, _) => {
                for event in events.events() {
                    self.publish(subject, None, event).await;
                }
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

/// Subscribes to `kind`'s subject (in its queue group, if any).
async fn subscribe(ctx: &Arc<Context>, kind: Kind) -> Result<(subscription::Served, Subject), NatsError> {
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
    pub async fn start(ctx: &Arc<Context>, kind: Kind) -> Result<Self, NatsError> {
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
    pub async fn start(ctx: Arc<Context>, kinds: &[Kind]) -> Result<Self, NatsError> {
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
