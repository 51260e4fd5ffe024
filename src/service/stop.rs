//! Stop (SIGINT/SIGTERM, bounded by `shutdown_timeout`): fence every
//! subscription and answer what was routed here → every shard's lane
//! delivers what was accepted (in order) → the writer commits what
//! is queued and flushes → the aggregates' snapshot → final flush to NATS.
//! If answering takes longer than the timeout (NATS unreachable), the
//! subscriptions are dropped, the writer still commits, and the stop is an
//! error. A second signal exits at once (see [`super::run`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ServiceError;
use crate::journal::writer::{self, WriterError};
use crate::observe::metrics::Metrics;
use crate::output::Sink;
use crate::pipeline::Pipeline;
use crate::stages::snapshot::Snapshot;
use crate::transport::Transport;

/// Everything that runs once the service is up, and how it stops.
pub(super) struct Parts {
    pub transport: Transport,
    /// The lease keeper (durability `replicated`): its stop signal and task;
    /// it hands every shard over when told to stop.
    pub keeper: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    /// The HTTP gateway: its stop signal and task.
    pub http: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    /// The writer's handle and task; `None` for durability `memory`.
    pub writer: Option<(writer::Writer, JoinHandle<Result<(), WriterError>>)>,
    /// The window and status responder: its stop signal and task (fenced
    /// at stop, like the request subscriptions).
    pub control: (watch::Sender<bool>, JoinHandle<()>),
    /// Discovery, metrics endpoint, upkeep, window watch, queries:
    /// aborted at stop.
    pub background: Vec<JoinHandle<()>>,
    /// Where the aggregates are saved at stop.
    pub snapshot: Option<Snapshot>,
    pub client: async_nats::Client,
    /// Its lanes deliver what was accepted before the final flush.
    pub pipeline: Arc<Pipeline<Sink>>,
    pub timeout: Duration,
}

impl Parts {
    /// Serves until `stop` changes or the writer ends by itself, then stops.
    pub async fn serve_until(
        mut self,
        mut stop: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> Result<(), ServiceError> {
        let failed = match &mut self.writer {
            Some((_, task)) => tokio::select! {
                _ = stop.changed() => None,
                result = task => Some(match result {
                    Ok(Ok(())) => ServiceError::Panicked("the commit writer ended early".into()),
                    Ok(Err(e)) => ServiceError::Writer(e),
                    Err(e) => ServiceError::Panicked(e.to_string()),
                }),
            },
            None => {
                let _ = stop.changed().await;
                None
            }
        };
        if let Some(e) = &failed {
            tracing::error!(message = "Stopping: the commit writer failed.", error = %e);
            self.writer = None;
        }
        let result = self.stop().await;
        tracing::info!(message = "Stopped.", answered = metrics.answered());
        match failed {
            Some(e) => Err(e),
            None => result,
        }
    }

    async fn stop(mut self) -> Result<(), ServiceError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        // HTTP stops taking connections and answers what it holds, while
        // the NATS subscriptions are fenced.
        let http = async {
            if let Some((stop, task)) = &mut self.http {
                let _ = stop.send(true);
                let _ = task.await;
            }
        };
        // The keeper fences its shards' subscriptions and releases their
        // leases while the writer still commits what they took.
        let keeper = async {
            if let Some((stop, task)) = &mut self.keeper {
                let _ = stop.send(true);
                let _ = task.await;
            }
        };
        let control = async {
            let _ = self.control.0.send(true);
            let _ = (&mut self.control.1).await;
        };
        let answered = tokio::time::timeout_at(deadline, async {
            tokio::join!(self.transport.drain(), http, keeper, control)
        })
        .await
        .is_ok();
        if !answered {
            tracing::error!(
                message = "Requests in flight not answered within shutdown_timeout; dropping them.",
                timeout_ms = self.timeout.as_millis() as u64,
            );
            self.transport.abort();
            if let Some((_, task)) = &self.http {
                task.abort();
            }
            if let Some((_, task)) = &self.keeper {
                task.abort();
            }
            self.control.1.abort();
        }
        // Every accepted event through the stages and the output, in order.
        if answered
            && tokio::time::timeout_at(deadline, self.pipeline.all_drained())
                .await
                .is_err()
        {
            tracing::warn!(message = "Accepted events not all delivered within shutdown_timeout.");
        }
        // Ended, not only told to end: their subscriptions are dropped (and
        // unsubscribed by the final flush) before the stop returns.
        for task in &self.background {
            task.abort();
        }
        for task in self.background.drain(..) {
            let _ = task.await;
        }
        // The writer needs no server: it commits what was queued either way.
        let mut result = if answered {
            Ok(())
        } else {
            Err(ServiceError::ShutdownTimedOut(self.timeout))
        };
        if let Some((handle, task)) = self.writer.take() {
            handle.stop().await;
            drop(handle);
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(ServiceError::Writer(e)),
                Err(e) => result = Err(ServiceError::Panicked(e.to_string())),
            }
        }
        if let Some(snapshot) = self.snapshot.take() {
            snapshot.save().await;
        }
        if answered {
            let flush = tokio::time::timeout_at(deadline, self.client.flush()).await;
            if !matches!(flush, Ok(Ok(()))) {
                tracing::warn!(message = "Final flush to NATS did not complete.");
            }
        }
        result
    }
}
