//! What `durability = "replicated"` adds to a start: the journal stream
//! with its local copy, and the lease keeper (with the aggregates' pane
//! log, when there are aggregates).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ServiceError;
use crate::cluster::{Keeper, Leases, Membership};
use crate::config::Settings;
use crate::journal::stream::{self, Positions, StreamJournal};
use crate::journal::{JournalError, JournalErrorKind, StoreMeta};
use crate::nats::NatsError;
use crate::observe::metrics::Metrics;
use crate::shared::Shared;
use crate::stages::Stages;
use crate::stages::replica::PaneLog;

/// The KV key holding how the cluster places ids in shards.
const PLACEMENT_KEY: &str = "placement";

/// Checks that this node places ids in shards as the cluster does
/// (`shards`, `shard_key`, kept in the bucket's key `placement` by the
/// first node): a node configured otherwise would look for ids in the
/// wrong shards, so it does not start.
///
/// # Errors
///
/// The difference, with what to do; or the bucket cannot be read.
pub(super) async fn placement(bucket: Option<&kv::Store>, settings: &Settings) -> Result<(), ServiceError> {
    let Some(kv) = bucket else { return Ok(()) };
    let ours = serde_json::json!({
        "shards": settings.config.shards,
        "shard_key": settings.config.shard_key,
    });
    let unreadable =
        |e: String| ServiceError::Nats(NatsError::Connect(format!("KV key {PLACEMENT_KEY}: {e}")));
    match kv.create(PLACEMENT_KEY, ours.to_string().into()).await {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(unreadable(e.to_string())),
    }
    let Some(theirs) = kv
        .get(PLACEMENT_KEY)
        .await
        .map_err(|e| unreadable(e.to_string()))?
    else {
        return Ok(());
    };
    let theirs: serde_json::Value = serde_json::from_slice(&theirs).unwrap_or_default();
    if theirs == ours {
        return Ok(());
    }
    Err(ServiceError::Journal(JournalError::new(
        JournalErrorKind::Mismatch,
        format!(
            "the cluster places ids by {theirs} (KV key {PLACEMENT_KEY} of bucket {}), this node by {ours}: \
             it would look for ids in the wrong shards. Configure shards and shard_key as the cluster does; \
             to change them, stop every node and start with a new journal stream and bucket (the ids they \
             hold would be accepted again)",
            settings.config.kv_bucket
        ),
    )))
}

/// Opens the journal stream and its local copy in `data_dir` (which must
/// be a copy of this stream, not of an earlier one of its name).
pub(super) async fn journal(
    client: &async_nats::Client,
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<StreamJournal, ServiceError> {
    let positions = Arc::new(Positions::new(settings.config.shards));
    let journal = StreamJournal::open(client.clone(), settings, positions, metrics.clone())
        .await
        .map_err(NatsError::Connect)?;
    let dir = settings.config.data_dir.clone();
    let fsync = settings.config.fsync;
    let meta = StoreMeta {
        shards: settings.config.shards,
        window_ms: settings.window_ms,
        shard_key: settings.config.shard_key.clone(),
    };
    let identity = journal.identity();
    let copy = tokio::task::spawn_blocking(move || stream::local_copy(&dir, meta, fsync, &identity))
        .await
        .map_err(|e| ServiceError::Panicked(e.to_string()))?
        .map_err(ServiceError::Journal)?;
    Ok(journal.with_copy(copy))
}

/// The running keeper and what came with it.
pub(super) struct Cluster {
    /// The keeper's stop signal and task; it hands every shard over when
    /// told to stop.
    pub keeper: (watch::Sender<bool>, JoinHandle<()>),
    /// What the keeper learns of the other nodes, for the aggregate queries.
    pub membership: Arc<Membership>,
    /// The pane log's task, if there are aggregates.
    pub tasks: Vec<JoinHandle<()>>,
}

/// Opens the lease bucket and starts the keeper; with aggregates, restores
/// them from the pane log and checkpoints it when the keeper stops.
pub(super) async fn keeper(
    settings: &Settings,
    ctx: &Arc<Shared>,
    journal: StreamJournal,
    stages: &Arc<Stages>,
) -> Result<Cluster, ServiceError> {
    let client = &ctx.client;
    let bucket = &settings.config.kv_bucket;
    let cluster = &settings.config.cluster;
    let kv = crate::nats::kv::open_bucket(client, bucket, cluster.replicas)
        .await
        .map_err(NatsError::Connect)?;
    let ttl = Duration::from_millis(settings.lease_ttl_ms);
    let leases = Leases::open(client.clone(), kv, bucket, ttl)
        .await
        .map_err(NatsError::Connect)?;
    let node = settings.node_id.clone();
    let membership = Arc::new(Membership::new(ttl));
    let mut keeper = Keeper::new(ctx.clone(), leases.clone(), journal, node.clone(), ttl)
        .with_about(about(settings))
        .with_membership(membership.clone());
    let mut tasks = Vec::new();
    if !stages.is_empty() {
        let prefix = ctx.subjects.prefix();
        let log = PaneLog::open(
            client.clone(),
            cluster,
            prefix,
            leases,
            stages.clone(),
            membership.clone(),
            node,
        )
        .await
        .map_err(NatsError::Connect)?;
        let panes = log.start().await.map_err(NatsError::Connect)?;
        tracing::info!(message = "Aggregates restored from the pane log.", panes, stream = %cluster.panes_stream);
        let log = Arc::new(log);
        tasks.push(tokio::spawn(log.clone().run()));
        // Checkpointed once more before the heartbeat goes, so that the
        // node adopting the panes finds them whole.
        keeper = keeper.on_stop(Box::new(move || Box::pin(async move { log.close().await })));
    }
    let (stop, stopped) = watch::channel(false);
    Ok(Cluster {
        keeper: (stop, tokio::spawn(keeper.run(stopped))),
        membership,
        tasks,
    })
}

/// Where this node runs, for its heartbeat: host, pid, addresses.
fn about(settings: &Settings) -> serde_json::Value {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    serde_json::json!({
        "host": host.trim(),
        "pid": std::process::id(),
        "metrics_addr": settings.metrics_addr.map(|a| a.to_string()),
        "http_addr": settings.http_addr.map(|a| a.to_string()),
    })
}
