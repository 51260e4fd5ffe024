//! The composition root: opens the journal, builds the pipeline, starts the
//! NATS transport, the writer and the background tasks, and stops them in
//! order.
//!
//! Start: connect → subscribe (owned shards answer 503 while recovering) →
//! rebuild the tables from the journal → start the writer → become
//! discoverable → serve.
//!
//! Stop (SIGINT/SIGTERM, bounded by `shutdown_timeout`): fence every
//! subscription and answer what was routed here → the writer commits what
//! is queued and flushes → final flush to NATS. If answering takes longer
//! than the timeout (NATS unreachable), the subscriptions are dropped, the
//! writer still commits, and the stop is an error. A second signal exits at
//! once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::{Keeper, Leases, Membership, Positions, StreamJournal};
use crate::config::{Durability, Output, Settings};
use crate::control::{self, Window};
use crate::engine::{Deduplicator, unix_ms};
use crate::journal::writer::{self, WriterConfig, WriterError};
use crate::journal::{Journal, JournalError, JournalErrorKind, LmdbStore, StoreMeta};
use crate::observe::metrics::Metrics;
use crate::pipeline::{Ownership, Pipeline, ShardState};
use crate::stages::Stages;
use crate::stages::replica::PaneLog;
use crate::transport::budget::Budget;
use crate::transport::http::Gateway;
use crate::transport::nats::jetstream::JetStreamOutput;
use crate::transport::nats::{self, Context, NatsError, Republish, Subjects, Transport, subscription};

/// How often expired ids are deleted from the journal and tables swept.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

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
    pipeline: Arc<Pipeline<Republish>>,
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
    };
    let store = tokio::task::spawn_blocking(move || LmdbStore::open(&dir, meta, fsync))
        .await
        .map_err(|e| ServiceError::Panicked(e.to_string()))?
        .map_err(ServiceError::Journal)?;
    Ok(Box::new(store))
}

/// The local copy of the replicated journal whose stream is `stream` (its
/// [`StreamJournal::identity`]). A store that cannot be opened (damaged,
/// or of another format or shard count), or that copied another stream of
/// the same name, is moved aside and a new one made: the journal has
/// everything this node needs.
async fn open_local_copy(settings: &Settings, stream: String) -> Result<LmdbStore, ServiceError> {
    const STREAM_KEY: &str = "journal_stream";
    let dir = settings.config.data_dir.clone();
    let fsync = settings.config.fsync;
    let meta = StoreMeta {
        shards: settings.config.shards,
        window_ms: settings.window_ms,
    };
    tokio::task::spawn_blocking(move || {
        let problem = match LmdbStore::open(&dir, meta, fsync) {
            Ok(mut store) => match store.meta(STREAM_KEY)? {
                Some(seen) if seen != stream => {
                    drop(store);
                    format!("it copied another journal stream of that name (created {seen} ns, this one {stream} ns)")
                }
                _ => {
                    store.set_meta(STREAM_KEY, &stream)?;
                    return Ok(store);
                }
            },
            Err(e) => e.to_string(),
        };
        let aside = crate::journal::lmdb::move_aside(&dir).map_err(|m| {
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
        let mut store = LmdbStore::open(&dir, meta, fsync)?;
        store.set_meta(STREAM_KEY, &stream)?;
        Ok(store)
    })
    .await
    .map_err(|e| ServiceError::Panicked(e.to_string()))?
    .map_err(ServiceError::Journal)
}

/// Connects, recovers the owned shards from `journal` (none: nothing is
/// durable), subscribes, and returns once requests are being answered.
///
/// # Errors
///
/// A [`ServiceError`] if NATS, the journal or the metrics address fail.
pub async fn start_with(
    mut settings: Settings,
    journal: Option<Box<dyn Journal>>,
) -> Result<Running, ServiceError> {
    let metrics = Arc::new(Metrics::default());
    let client = nats::options::connect(&settings.config.nats, metrics.clone()).await?;
    // A window set at run time holds across restarts: read it before the
    // tables are built and rebuilt.
    let window = Arc::new(Window::open(&client, &settings, metrics.clone()).await);
    settings.window_ms = window.ms();
    let shards = settings.config.shards;
    let subjects = Subjects::new(&settings.config.subject_prefix, &settings.config.output_subject);
    // Replicated: the journal is the stream, and shards come with leases.
    let (journal, stream) = if settings.config.durability == Durability::Replicated {
        let positions = Arc::new(Positions::new(shards));
        let stream = StreamJournal::open(client.clone(), &settings, positions, metrics.clone())
            .await
            .map_err(NatsError::Connect)?;
        // The copy must be of this stream, not of an earlier one of its name.
        let copy = open_local_copy(&settings, stream.identity()).await?;
        let stream = stream.with_copy(copy);
        settings.owned = Vec::new();
        (Some(Box::new(stream.clone()) as Box<dyn Journal>), Some(stream))
    } else {
        (journal, None)
    };
    let ownership = Ownership::new(shards);
    for &s in &settings.owned {
        ownership.set(s, ShardState::Recovering);
    }
    let writer = journal
        .is_some()
        .then(|| writer::channel(settings.config.max_pending, metrics.clone()));
    let core = settings.config.output == Output::Core;
    let stages = Arc::new(Stages::new(&settings.aggregates));
    let mut republish = Republish::new(
        client.clone(),
        &subjects,
        shards,
        settings.config.batch_output,
        core,
        metrics.clone(),
    );
    // Aggregates survive a restart through a snapshot in the data dir;
    // with `replicated`, through the pane log in JetStream (see
    // `stages::replica`), which outlives the node.
    let snapshot = (!stages.is_empty() && settings.config.durability == Durability::Local).then(|| {
        let path = settings.config.data_dir.join(crate::stages::SNAPSHOT_FILE);
        let panes = stages.load(&path);
        tracing::info!(message = "Aggregates restored.", panes, path = %path.display());
        Snapshot {
            stages: stages.clone(),
            path,
        }
    });
    if !stages.is_empty() {
        republish = republish.with_stages(stages.clone());
        let _ = metrics.extra.set(stages.clone());
    }
    let mut pipeline = Pipeline::new(
        Deduplicator::new(settings.engine()),
        ownership,
        writer.as_ref().map(|(w, _)| w.clone()),
        republish,
        metrics.clone(),
    );
    if !core {
        let stream = &settings.config.output_stream;
        let output = JetStreamOutput::open(client.clone(), stream, &subjects, shards).await?;
        pipeline = pipeline.with_ahead(Arc::new(output));
    }
    let pipeline = Arc::new(pipeline);
    let ctx = Arc::new(Context {
        pipeline: pipeline.clone(),
        budget: Budget::new(settings.config.max_inflight_bytes, metrics.clone()),
        client: client.clone(),
        subjects: subjects.clone(),
        metrics: metrics.clone(),
    });

    // Subscribe first, so that requests during recovery get 503, not silence.
    let kinds = subscription::kinds(&settings.owned, shards);
    let transport = Transport::start(ctx.clone(), &kinds).await?;
    // HTTP too, so that /ready says 503 during recovery.
    let started = Instant::now();
    let http = match settings.http_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(ServiceError::Http)?;
            let (stop, stopped) = watch::channel(false);
            let gateway = Gateway::new(ctx.clone(), settings.config.http_metrics, started);
            let limits = crate::transport::http::Limits {
                header_timeout: Duration::from_millis(settings.http_header_timeout_ms),
                max_connections: http_connections(settings.config.http_max_connections),
            };
            let task = tokio::spawn(crate::transport::http::serve(listener, gateway, limits, stopped));
            Some((stop, task))
        }
        None => None,
    };

    let writer = match (journal, writer) {
        (Some(journal), Some((handle, inbox))) => {
            let journal = recover(&pipeline, journal, settings.owned.clone()).await?;
            let config = WriterConfig {
                commit_interval: Duration::from_millis(settings.commit_interval_ms),
                expire_every: EXPIRE_EVERY,
                window_ms: window.shared(),
            };
            Some((handle, writer::spawn(inbox, journal, config, metrics.clone())))
        }
        _ => {
            for &s in &settings.owned {
                pipeline.ownership().set(s, ShardState::Ready);
            }
            None
        }
    };
    let node = settings.node_id.clone();
    let mut stage_tasks = Vec::new();
    if let Some(stream) = &stream {
        stage_tasks.push(tokio::spawn(stream.clone().keep_window(window.shared())));
    }
    let mut members = None;
    let keeper = match stream {
        Some(stream) => {
            let bucket = &settings.config.kv_bucket;
            let kv =
                crate::transport::nats::kv::open_bucket(&client, bucket, settings.config.cluster.replicas)
                    .await
                    .map_err(NatsError::Connect)?;
            let ttl = Duration::from_millis(settings.lease_ttl_ms);
            let leases = Leases::open(client.clone(), kv, bucket, ttl)
                .await
                .map_err(NatsError::Connect)?;
            let (stop, stopped) = watch::channel(false);
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let about = serde_json::json!({
                "host": host.trim(),
                "pid": std::process::id(),
                "metrics_addr": settings.metrics_addr.map(|a| a.to_string()),
                "http_addr": settings.http_addr.map(|a| a.to_string()),
            });
            let membership = Arc::new(Membership::new(ttl));
            let mut keeper = Keeper::new(ctx.clone(), leases.clone(), stream, node.clone(), ttl)
                .with_about(about)
                .with_membership(membership.clone());
            if !stages.is_empty() {
                let cluster = &settings.config.cluster;
                let log = PaneLog::open(
                    client.clone(),
                    cluster,
                    subjects.prefix(),
                    leases,
                    stages.clone(),
                    membership.clone(),
                    node.clone(),
                )
                .await
                .map_err(NatsError::Connect)?;
                let panes = log.start().await.map_err(NatsError::Connect)?;
                tracing::info!(message = "Aggregates restored from the pane log.", panes, stream = %cluster.panes_stream);
                let log = Arc::new(log);
                stage_tasks.push(tokio::spawn(log.clone().run()));
                keeper = keeper.with_panes(log);
            }
            members = Some(membership);
            Some((stop, tokio::spawn(keeper.run(stopped))))
        }
        None => None,
    };
    let (stop_control, control_stopped) = watch::channel(false);
    let control = control::serve(
        ctx.clone(),
        window.clone(),
        node.clone(),
        started,
        control_stopped,
    )
    .await
    .map_err(|e| NatsError::Subscribe(format!("{}: {e}", subjects.window())))?;
    let watch = tokio::spawn(window.clone().watch(ctx.clone()));
    if !stages.is_empty() {
        let served = crate::stages::query::serve(ctx.clone(), stages.clone(), node.clone(), members)
            .await
            .map_err(|e| NatsError::Subscribe(format!("{}.agg.*: {e}", subjects.prefix())))?;
        stage_tasks.extend(served);
    }
    if let Some(snapshot) = &snapshot {
        stage_tasks.push(tokio::spawn(snapshot.clone().every(SNAPSHOT_EVERY)));
    }
    // Discoverable only once every owned shard answers.
    let discovery = nats::discovery::spawn(
        client.clone(),
        &subjects,
        node,
        settings.owned.clone(),
        !stages.is_empty(),
        metrics.clone(),
    )
    .await
    .map_err(|e| NatsError::Subscribe(format!("$SRV: {e}")))?;
    let metrics_task = match settings.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(ServiceError::Metrics)?;
            let (pipeline, metrics) = (pipeline.clone(), metrics.clone());
            Some(tokio::spawn(crate::observe::metrics::serve(
                listener,
                move || metrics.render(pipeline.dedup(), started),
            )))
        }
        None => None,
    };
    let sweeper = tokio::spawn(sweep_loop(pipeline.clone()));
    let budget = (settings.config.max_table_bytes > 0).then(|| {
        let max = usize::try_from(settings.config.max_table_bytes).unwrap_or(usize::MAX);
        tokio::spawn(budget_loop(
            pipeline.clone(),
            max,
            window.shared(),
            metrics.clone(),
        ))
    });
    tracing::info!(
        message = "Serving.",
        shards,
        owned = settings.owned.len(),
        durability = ?settings.config.durability,
        window_ms = settings.window_ms,
        prefix = %subjects.prefix(),
    );

    // Every subscription is at the server before the service says it is up.
    nats::registered(&client).await?;
    let (stop, stop_rx) = watch::channel(false);
    let parts = Parts {
        transport,
        keeper,
        http,
        writer,
        control: (stop_control, control),
        background: [Some(discovery), Some(watch), metrics_task, Some(sweeper), budget]
            .into_iter()
            .flatten()
            .chain(stage_tasks)
            .collect(),
        snapshot,
        client,
        timeout: Duration::from_millis(settings.shutdown_timeout_ms),
    };
    let task = tokio::spawn(parts.serve_until(stop_rx, metrics.clone()));
    Ok(Running {
        stop,
        task,
        metrics,
        pipeline,
    })
}

/// Rebuilds the owned shards' tables from the journal, off the runtime.
async fn recover(
    pipeline: &Arc<Pipeline<Republish>>,
    journal: Box<dyn Journal>,
    owned: Vec<u32>,
) -> Result<Box<dyn Journal>, ServiceError> {
    let pipeline = pipeline.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let ids = pipeline.recover(journal.as_ref(), &owned)?;
        tracing::info!(
            message = "Recovered tables from the journal.",
            ids,
            elapsed_ms = started.elapsed().as_millis() as u64,
            journal = %journal.location(),
        );
        Ok(journal)
    })
    .await
    .map_err(|e| ServiceError::Panicked(e.to_string()))?
    .map_err(ServiceError::Journal)
}

/// Everything that runs once the service is up, and how it stops.
struct Parts {
    transport: Transport,
    /// The lease keeper (durability `replicated`): its stop signal and task;
    /// it hands every shard over when told to stop.
    keeper: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    /// The HTTP gateway: its stop signal and task.
    http: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    /// The writer's handle and task; `None` for durability `memory`.
    writer: Option<(writer::Writer, JoinHandle<Result<(), WriterError>>)>,
    /// The window and status responder: its stop signal and task (fenced
    /// at stop, like the request subscriptions).
    control: (watch::Sender<bool>, JoinHandle<()>),
    /// Discovery, metrics endpoint, sweeper: aborted at stop.
    background: Vec<JoinHandle<()>>,
    /// Where the aggregates are saved at stop.
    snapshot: Option<Snapshot>,
    client: async_nats::Client,
    timeout: Duration,
}

impl Parts {
    /// Serves until `stop` changes or the writer ends by itself, then stops.
    async fn serve_until(
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

/// How often the aggregates are saved (and so, at most, how much of their
/// updates a crash loses).
const SNAPSHOT_EVERY: Duration = Duration::from_secs(10);

/// The aggregates' snapshot file.
#[derive(Clone)]
struct Snapshot {
    stages: Arc<Stages>,
    path: std::path::PathBuf,
}

impl Snapshot {
    /// Saves off the runtime; a failure is logged (the aggregates go on).
    async fn save(&self) {
        let this = self.clone();
        let saved = tokio::task::spawn_blocking(move || this.stages.save(&this.path)).await;
        if let Ok(Err(e)) | Err(e) = saved.map_err(std::io::Error::other) {
            tracing::warn!(message = "Cannot save the aggregates.", path = %self.path.display(), error = %e);
        }
    }

    async fn every(self, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.save().await;
        }
    }
}

/// How often the tables' size is held against `max_table_bytes`.
const BUDGET_EVERY: Duration = Duration::from_millis(250);
/// The window is not halved below this.
const MIN_WINDOW_MS: u64 = 1000;

/// Keeps the tables under `max_bytes`: while they are over it the window in
/// force is halved (the oldest ids go first) and the dead entries are
/// reclaimed; once they are under half of it the window is set back to
/// the window set (`window_ms`, which may change at run time), which the tables let grow only as far as the ids they still
/// hold reach, so no verdict claims an id they dropped.
async fn budget_loop(
    pipeline: Arc<Pipeline<Republish>>,
    max_bytes: usize,
    window_ms: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(BUDGET_EVERY);
    loop {
        tick.tick().await;
        let p = pipeline.clone();
        let window_ms = window_ms.load(Relaxed);
        let step = tokio::task::spawn_blocking(move || {
            let dedup = p.dedup();
            let now = unix_ms();
            let bytes = dedup.memory_bytes();
            let in_force = dedup.window_in_force(now);
            if bytes > max_bytes && in_force > MIN_WINDOW_MS {
                let to = (in_force / 2).max(MIN_WINDOW_MS);
                dedup.set_window(to, now);
                dedup.sweep(now, dedup.config().segments_per_shard);
                Some((in_force, to, bytes, dedup.memory_bytes()))
            } else {
                if bytes < max_bytes / 2 && dedup.window_ms() < window_ms {
                    dedup.set_window(window_ms, now);
                }
                None
            }
        })
        .await;
        if let Ok(Some((from, to, before, after))) = step {
            Metrics::inc(&metrics.window_shrinks);
            tracing::warn!(
                message = "Tables over max_table_bytes: halved the window in force (oldest ids go first).",
                from_ms = from,
                to_ms = to,
                table_bytes_before = before,
                table_bytes_after = after,
                max_table_bytes = max_bytes,
            );
        }
    }
}

/// Reclaims expired table entries a few segments at a time.
async fn sweep_loop(pipeline: Arc<Pipeline<Republish>>) {
    let mut tick = tokio::time::interval(EXPIRE_EVERY);
    loop {
        tick.tick().await;
        pipeline.dedup().sweep(unix_ms(), 64);
    }
}

/// File descriptors kept for everything but HTTP connections: NATS, the
/// store, the metrics endpoint, the store check, logs.
const FILES_RESERVED: u64 = 128;

/// Raises the soft open-files limit to the hard one (each HTTP connection
/// costs a descriptor) and logs both; the soft limit in force after.
fn raise_open_files() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return None;
        }
        let before = limit.rlim_cur;
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            // SAFETY: setrlimit reads one `rlimit` we own; raising the soft
            // limit up to the hard one needs no privilege.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        tracing::info!(
            message = "Open-files limit.",
            soft_before = before,
            soft = limit.rlim_cur,
            hard = limit.rlim_max
        );
        Some(limit.rlim_cur)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// The HTTP connections to serve at once: `configured`, lowered to fit the
/// open-files limit with room for the rest of the process.
fn http_connections(configured: usize) -> usize {
    let Some(files) = raise_open_files() else {
        return configured;
    };
    let fits = files.saturating_sub(FILES_RESERVED).max(1) as usize;
    if configured > fits {
        tracing::warn!(
            message = "http_max_connections lowered to fit the open-files limit.",
            configured,
            serving = fits,
            open_files = files
        );
    }
    configured.min(fits)
}
