//! Start, in order: connect → read the window in force → open the journal
//! → build the pipeline (stages, output) → subscribe (owned shards answer
//! 503 while recovering) → rebuild the tables → start the writer → the
//! cluster keeper, the control plane, the aggregate queries → become
//! discoverable → serve.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::stop::Parts;
use super::{Running, ServiceError, replicated};
use crate::config::{Durability, OutputKind, Settings, Tier};
use crate::control::{self, Window};
use crate::engine::Deduplicator;
use crate::journal::sealed::{FilterBits, Sealed};
use crate::journal::writer::{self, WriterConfig};
use crate::journal::{Journal, JournalError, JournalErrorKind, JournalReader};
use crate::nats::ordered::OrderedRequests;
use crate::nats::{self, NatsError, Subjects};
use crate::observe::metrics::Metrics;
use crate::output::jetstream::unbound_subject;
use crate::output::{CoreNats, PublishBeforeCommit, Sink};
use crate::pipeline::{Ownership, Pipeline, ShardState, upkeep};
use crate::route::{KeyReader, Router};
use crate::shared::{Budget, Shared};
use crate::stages::Stages;
use crate::stages::snapshot::{SNAPSHOT_EVERY, Snapshot};
use crate::transport::{Transport, discovery, http, subscription};

/// How often expired ids are deleted from the journal.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

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
        replicated::placement(window.bucket(), &settings).await?;
        let stream = replicated::journal(&client, &settings, &metrics).await?;
        settings.owned = Vec::new();
        (Some(Box::new(stream.clone()) as Box<dyn Journal>), Some(stream))
    } else {
        (journal, None)
    };
    let writer = journal
        .is_some()
        .then(|| writer::channel(settings.config.max_pending, metrics.clone()));
    let stages =
        Arc::new(Stages::new(&settings.aggregates, &settings.format).map_err(ServiceError::Aggregates)?);
    let snapshot = snapshot(&settings, &stages);
    if !stages.is_empty() {
        metrics.add_render(stages.clone());
    }
    let router = Arc::new(router(&settings)?);
    metrics.add_render(router.clone());
    // With output = "jetstream": the output stream, and every subject the
    // rules send to bound to a stream.
    let (first, streams) = match settings.config.output {
        OutputKind::Core => (None, None),
        OutputKind::Jetstream => {
            let name = &settings.config.output_stream;
            let first = PublishBeforeCommit::open(client.clone(), name, &subjects, shards, router.clone())
                .await?
                .with_republish(republish(&settings));
            let js = async_nats::jetstream::new(client.clone());
            if let Some(why) = unbound_subject(&js, &router.current()).await {
                return Err(ServiceError::Routing(why));
            }
            (Some(first), Some(js))
        }
    };
    // The rules kept in the bucket route from the first request on.
    let rules_bucket = window.bucket().cloned();
    if let Some(store) = &rules_bucket {
        control::rules::load(&router, store, streams.as_ref()).await;
    }
    // So does the protobuf schema kept there (after the rules, which it
    // is checked against).
    let schema = control::schema::SchemaControl::new(&settings, router.clone());
    if let Some(schema) = &schema {
        metrics.add_render(schema.clone());
        if let Some(store) = &rules_bucket {
            control::schema::load(schema, store).await;
        }
    }
    let pipeline = pipeline(
        &settings,
        (&client, &subjects),
        writer.as_ref().map(|(w, _)| w.clone()),
        (&stages, first),
        (&metrics, &router),
    );
    let ctx = Arc::new(Shared {
        pipeline: pipeline.clone(),
        budget: Budget::new(settings.config.max_inflight_bytes, metrics.clone()),
        client: client.clone(),
        subjects: subjects.clone(),
        metrics: metrics.clone(),
        router,
        forwards: OrderedRequests::start(client.clone()).await?,
    });

    // Subscribe first, so that requests during recovery get 503, not silence.
    let kinds = subscription::kinds(&settings.owned, shards);
    let transport = Transport::start(ctx.clone(), &kinds).await?;
    // HTTP too, so that /ready says 503 during recovery.
    let started = Instant::now();
    let http = gateway(&settings, &ctx, started).await?;

    let tier = match settings.config.tier {
        Tier::Tiered => {
            let reader = journal.as_ref().and_then(|j| j.reader());
            Some(open_tier(&settings, reader, pipeline.dedup(), &metrics).await?)
        }
        Tier::Memory => None,
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
    let mut background = Vec::new();
    // Replicated: what a takeover replays from before the cut is sealed.
    let stream = match (stream, &tier) {
        (Some(stream), Some((sealed, _))) => Some(stream.with_sealed(sealed.clone())),
        (stream, _) => stream,
    };
    if let Some((sealed, reader)) = tier {
        let hot_bytes = usize::try_from(settings.config.hot_bytes).unwrap_or(usize::MAX);
        let merging = upkeep::merge_loop(pipeline.dedup().clone(), sealed.clone());
        let sealing = upkeep::seal_loop(pipeline.dedup().clone(), sealed, reader, hot_bytes);
        background.push(tokio::spawn(sealing));
        background.push(tokio::spawn(merging));
    }
    let (keeper, members) = match stream {
        Some(stream) => {
            background.push(tokio::spawn(stream.clone().keep_window(window.shared())));
            let cluster = replicated::keeper(&settings, &ctx, stream, &stages).await?;
            background.extend(cluster.tasks);
            (Some(cluster.keeper), Some(cluster.membership))
        }
        None => (None, None),
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
    background.push(tokio::spawn(window.clone().watch(ctx.clone())));
    if let (Some(store), Some(schema)) = (&rules_bucket, schema) {
        background.push(tokio::spawn(control::schema::watch(schema, store.clone())));
    }
    if let Some(store) = rules_bucket {
        background.push(tokio::spawn(control::rules::watch(
            ctx.router.clone(),
            store,
            streams,
        )));
    }
    if !stages.is_empty() {
        let served = crate::stages::query::serve(ctx.clone(), stages.clone(), node.clone(), members)
            .await
            .map_err(|e| NatsError::Subscribe(format!("{}.agg.*: {e}", subjects.prefix())))?;
        background.extend(served);
    }
    if let Some(snapshot) = &snapshot {
        background.push(tokio::spawn(snapshot.clone().every(SNAPSHOT_EVERY)));
    }
    // Discoverable only once every owned shard answers.
    let owned = settings.owned.clone();
    let discovery = discovery::spawn(
        client.clone(),
        &subjects,
        node,
        owned,
        !stages.is_empty(),
        metrics.clone(),
    )
    .await
    .map_err(|e| NatsError::Subscribe(format!("$SRV: {e}")))?;
    background.push(discovery);
    background.extend(metrics_endpoint(&settings, &pipeline, &metrics, started).await?);
    background.extend(upkeep(&settings, &pipeline, &window, &metrics));
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
        background,
        snapshot,
        client,
        pipeline: pipeline.clone(),
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

/// The verdict path: the tables, ownership of the configured shards
/// (recovering), the writer, the aggregates as a stage, the output (and
/// `first`, the JetStream output that takes events before their commit).
fn pipeline(
    settings: &Settings,
    (client, subjects): (&async_nats::Client, &Subjects),
    writer: Option<writer::Writer>,
    (stages, first): (&Arc<Stages>, Option<PublishBeforeCommit>),
    (metrics, router): (&Arc<Metrics>, &Arc<Router>),
) -> Arc<Pipeline<Sink>> {
    let shards = settings.config.shards;
    let ownership = Ownership::new(shards);
    for &s in &settings.owned {
        ownership.set(s, ShardState::Recovering);
    }
    // The batch path reads the fields of the aggregates, of the routing
    // rules in force at start and of the reorder buffer with each line's
    // key, in one pass.
    let mut engine = settings.engine();
    let rules = router.current();
    let ordering = settings.ordering.iter().flat_map(|o| [&o.session, &o.by]);
    for field in rules.fields().iter().chain(ordering) {
        if !engine.capture.contains(field) {
            engine.capture.push(field.clone());
        }
    }
    let sink = match settings.config.output {
        OutputKind::Core => Sink::Core(Box::new(
            CoreNats::new(
                client.clone(),
                subjects,
                shards,
                settings.config.batch_output,
                metrics.clone(),
                (router.clone(), engine.capture.clone()),
            )
            .with_republish(republish(settings)),
        )),
        OutputKind::Jetstream => Sink::BeforeCommit,
    };
    let dedup = Deduplicator::new(engine);
    let mut pipeline = Pipeline::new(dedup, ownership, writer, sink, metrics.clone());
    if !stages.is_empty() {
        pipeline = pipeline.with_stage(stages.clone());
    }
    if let Some(first) = first {
        pipeline = pipeline.with_publish_first(Arc::new(first));
    }
    if let Some(ordering) = &settings.ordering {
        pipeline = pipeline.with_ordering(ordering.clone());
    }
    if let Some(counters) = pipeline.reorder_counters() {
        metrics.add_render(counters);
    }
    Arc::new(pipeline)
}

/// The routing rules of the configuration, checked (the KV key `rules`
/// replaces them once read: see `control::rules`).
fn router(settings: &Settings) -> Result<Router, ServiceError> {
    let engine = settings.engine();
    let key = KeyReader {
        spec: engine.key,
        limits: engine.limits,
        format: engine.format,
    };
    let config = &settings.config;
    Router::new(&config.routing, &config.output_subject, config.shards, key).map_err(ServiceError::Routing)
}

/// Aggregates survive a restart through a snapshot in the data dir (read
/// here); with `replicated`, through the pane log in JetStream (see
/// `stages::replica`), which outlives the node.
fn snapshot(settings: &Settings, stages: &Arc<Stages>) -> Option<Snapshot> {
    if stages.is_empty() || settings.config.durability != Durability::Local {
        return None;
    }
    let path = settings.config.data_dir.join(crate::stages::SNAPSHOT_FILE);
    let panes = stages.load(&path);
    tracing::info!(message = "Aggregates restored.", panes, path = %path.display());
    Some(Snapshot {
        stages: stages.clone(),
        path,
    })
}

/// The HTTP gateway on `http_addr`, if set: its stop signal and task.
async fn gateway(
    settings: &Settings,
    ctx: &Arc<Shared>,
    started: Instant,
) -> Result<Option<(watch::Sender<bool>, JoinHandle<()>)>, ServiceError> {
    let Some(addr) = settings.http_addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(ServiceError::Http)?;
    let (stop, stopped) = watch::channel(false);
    let gateway = http::Gateway::new(ctx.clone(), settings.config.http_metrics, started);
    let limits = http::ConnectionLimits {
        header_timeout: Duration::from_millis(settings.http_header_timeout_ms),
        max_connections: http::connections(settings.config.http_max_connections),
    };
    let task = tokio::spawn(http::serve(listener, gateway, limits, stopped));
    Ok(Some((stop, task)))
}

/// The Prometheus endpoint on `metrics_addr`, if set.
async fn metrics_endpoint(
    settings: &Settings,
    pipeline: &Arc<Pipeline<Sink>>,
    metrics: &Arc<Metrics>,
    started: Instant,
) -> Result<Option<JoinHandle<()>>, ServiceError> {
    let Some(addr) = settings.metrics_addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(ServiceError::Metrics)?;
    let (dedup, metrics) = (pipeline.dedup().clone(), metrics.clone());
    Ok(Some(tokio::spawn(crate::observe::metrics::serve(
        listener,
        move || metrics.render(&dedup, started),
    ))))
}

/// The tables' sweeper, and their memory budget if `max_table_bytes` is set.
fn upkeep(
    settings: &Settings,
    pipeline: &Arc<Pipeline<Sink>>,
    window: &Window,
    metrics: &Arc<Metrics>,
) -> Vec<JoinHandle<()>> {
    let dedup = pipeline.dedup();
    let mut tasks = vec![tokio::spawn(upkeep::sweep_loop(dedup.clone()))];
    if settings.config.max_table_bytes > 0 {
        let max = usize::try_from(settings.config.max_table_bytes).unwrap_or(usize::MAX);
        let budget = upkeep::budget_loop(dedup.clone(), max, window.shared(), metrics.clone());
        tasks.push(tokio::spawn(budget));
    }
    if settings.ordering.is_some() {
        let pipeline = pipeline.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let next = pipeline.release_due().await;
                tokio::time::sleep(next).await;
            }
        }));
    }
    tasks
}

/// The sealed tier of `tier = "tiered"` in `sealed_dir`, and the journal's
/// reader it is built from: damaged generations rebuilt, the ids
/// forgotten since they were sealed read from the journal; put behind the
/// tables, which then hold only the ids since its cut.
async fn open_tier(
    settings: &Settings,
    reader: Option<Box<dyn JournalReader>>,
    dedup: &Arc<Deduplicator>,
    metrics: &Arc<Metrics>,
) -> Result<(Arc<Sealed>, Arc<dyn JournalReader>), ServiceError> {
    let reader: Arc<dyn JournalReader> = reader.map(Arc::from).ok_or_else(|| {
        ServiceError::Journal(JournalError::new(
            JournalErrorKind::Open,
            "tier = \"tiered\" needs the LMDB store (durability = \"local\") or the journal's local copy (\"replicated\")",
        ))
    })?;
    let dir = match settings.config.sealed_dir.as_str() {
        "" => settings.config.data_dir.join("sealed"),
        dir => dir.into(),
    };
    let opening = reader.clone();
    let bits = FilterBits::from_bits(settings.config.sealed_filter_bits).unwrap_or_default();
    let summary_shards = settings.config.sealed_summary.then_some(settings.config.shards);
    let horizon = crate::engine::unix_ms().saturating_sub(settings.window_ms);
    let sealed = tokio::task::spawn_blocking(move || {
        let sealed = match summary_shards {
            Some(shards) => Sealed::open_summarized(&dir, shards),
            None => Sealed::open(&dir),
        };
        let sealed = sealed.map_err(|e| e.to_string())?.with_filter(bits);
        upkeep::rebuild_damaged(&sealed, opening.as_ref(), horizon)?;
        opening
            .forgotten(&mut |shard, fp, at| sealed.forget(shard, fp, at))
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(Arc::new(sealed))
    })
    .await
    .map_err(|e| ServiceError::Panicked(e.to_string()))?
    .map_err(|why| {
        ServiceError::Journal(JournalError::new(
            JournalErrorKind::Open,
            format!("sealed tier: {why}"),
        ))
    })?;
    tracing::info!(
        message = "Opened the sealed tier.",
        dir = %sealed.dir().display(),
        generations = sealed.generations().len(),
        ids = sealed.ids(),
        memory_bytes = sealed.memory_bytes(),
        disk_bytes = sealed.disk_bytes(),
        cut_ms = sealed.cut_ms(),
    );
    dedup.set_older(sealed.clone());
    dedup.sealed_before(sealed.cut_ms());
    metrics.add_render(sealed.clone());
    Ok((sealed, reader))
}

/// Rebuilds the owned shards' tables from the journal, off the runtime.
async fn recover(
    pipeline: &Arc<Pipeline<Sink>>,
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

/// What accepted events go out as.
fn republish(settings: &Settings) -> crate::output::Republish {
    crate::output::Republish {
        input: settings.format.clone(),
        json: settings.output_json,
    }
}
