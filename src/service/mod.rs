//! The composition root: starts every part in order and stops them in
//! order.
//!
//! | module | role |
//! |---|---|
//! | [`start`](mod@start) | connect, open the journal, build the pipeline, subscribe, recover, serve |
//! | [`replicated`] | `durability = "replicated"`: the journal stream and its local copy, the lease keeper |
//! | [`stop`] | fence, answer, commit, flush, within `shutdown_timeout` |

pub mod replicated;
pub mod start;
pub mod stop;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Durability, Settings};
use crate::engine::Deduplicator;
use crate::journal::writer::WriterError;
use crate::journal::{Journal, JournalError, LmdbStore, StoreMeta};
use crate::nats::NatsError;
use crate::observe::metrics::Metrics;
use crate::output::Sink;
use crate::pipeline::Pipeline;

pub use start::start_with;

/// Why the service stopped or could not start.
#[derive(Debug)]
pub enum ServiceError {
    /// NATS could not be reached, or a subscription could not be made.
    Nats(NatsError),
    /// The journal could not be opened or read.
    Journal(JournalError),
    /// The metrics address could not be bound.
    Metrics(std::io::Error),
    /// The HTTP gateway's address could not be bound.
    Http(std::io::Error),
    /// The commit writer failed; what it had not committed got 503.
    Writer(WriterError),
    /// Requests in flight could not be answered within `shutdown_timeout`
    /// (pending ids were committed).
    ShutdownTimedOut(Duration),
    /// A second signal ended the shutdown early.
    Interrupted,
    /// A task of the service panicked.
    Panicked(String),
    /// The configured routing rules cannot be used.
    Routing(String),
    /// An aggregate's `when` cannot be used.
    Aggregates(String),
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Nats(e) => e.fmt(f),
            Self::Journal(e) => write!(f, "store: {e}"),
            Self::Metrics(e) => write!(f, "cannot serve metrics: {e}"),
            Self::Http(e) => write!(f, "cannot serve the HTTP gateway (http_addr): {e}"),
            Self::Writer(e) => e.fmt(f),
            Self::ShutdownTimedOut(t) => write!(
                f,
                "could not fence the subscriptions and answer requests in flight within shutdown_timeout \
                 ({} ms; is NATS reachable?); ids already accepted were committed",
                t.as_millis()
            ),
            Self::Interrupted => f.write_str("shutdown interrupted by a second signal"),
            Self::Panicked(e) => write!(f, "a service task panicked: {e}"),
            Self::Routing(e) => write!(f, "routing rules: {e}"),
            Self::Aggregates(e) => write!(f, "aggregates: {e}"),
        }
    }
}

impl std::error::Error for ServiceError {}

impl From<NatsError> for ServiceError {
    fn from(e: NatsError) -> Self {
        Self::Nats(e)
    }
}

/// A running service: stop it with [`Running::shutdown`].
pub struct Running {
    stop: watch::Sender<bool>,
    /// Ends when the service has stopped: on [`Running::shutdown`], or by
    /// itself when the writer fails.
    task: JoinHandle<Result<(), ServiceError>>,
    metrics: Arc<Metrics>,
    pipeline: Arc<Pipeline<Sink>>,
}

impl Running {
    /// Stops taking requests, answers those in flight, commits, closes.
    ///
    /// # Errors
    ///
    /// What stopped the service: the writer's failure, a shutdown that
    /// timed out, or a panicked task.
    pub async fn shutdown(self) -> Result<(), ServiceError> {
        let _ = self.stop.send(true);
        joined(self.task.await)
    }

    /// The tables, to inspect them.
    pub fn dedup(&self) -> &Deduplicator {
        self.pipeline.dedup()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

fn joined(result: Result<Result<(), ServiceError>, tokio::task::JoinError>) -> Result<(), ServiceError> {
    result.unwrap_or_else(|e| Err(ServiceError::Panicked(e.to_string())))
}

/// Runs the service until `shutdown` completes (or the service fails), then
/// stops it; `interrupt` completing during the stop ends it at once.
///
/// # Errors
///
/// A [`ServiceError`] if it cannot start, fails, or does not stop cleanly.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
    interrupt: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let mut running = start(settings).await?;
    tokio::select! {
        () = shutdown => {}
        result = &mut running.task => {
            tracing::error!(message = "The service stopped by itself.");
            return joined(result);
        }
    }
    tracing::info!(message = "Shutting down: fencing subscriptions, answering requests in flight.");
    tokio::select! {
        result = running.shutdown() => result,
        () = interrupt => {
            tracing::warn!(message = "Second signal: exiting without finishing the shutdown.");
            Err(ServiceError::Interrupted)
        }
    }
}

/// Starts with the journal `durability` asks for.
///
/// # Errors
///
/// A [`ServiceError`] if NATS, the store or the metrics address fail.
pub async fn start(settings: Settings) -> Result<Running, ServiceError> {
    let journal = match settings.config.durability {
        // The replicated journal needs the connection: made in `start_with`.
        Durability::Memory | Durability::Replicated => None,
        Durability::Local => Some(open_store(&settings).await?),
    };
    start_with(settings, journal).await
}

async fn open_store(settings: &Settings) -> Result<Box<dyn Journal>, ServiceError> {
    let dir = settings.config.data_dir.clone();
    let fsync = settings.config.fsync;
    let meta = StoreMeta {
        shards: settings.config.shards,
        window_ms: settings.window_ms,
        shard_key: settings.config.shard_key.clone(),
    };
    let store = tokio::task::spawn_blocking(move || LmdbStore::open(&dir, meta, fsync))
        .await
        .map_err(|e| ServiceError::Panicked(e.to_string()))?
        .map_err(ServiceError::Journal)?;
    Ok(Box::new(store))
}
