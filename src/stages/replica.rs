//! Aggregates that outlive their node (`durability = "replicated"`): each
//! node publishes the panes that changed every [`CHECKPOINT_EVERY`] to the
//! stream `cluster.panes_stream`, on
//! `<prefix>.panes.<node>.<aggregate hash>.<pane>.<part>` (one message per
//! subject kept: the whole pane of every group of the part, `part` of
//! [`super::aggregate::PARTS`]). The KV key `panes.<node>` says who holds
//! a node's panes: `"own"`, or another node `"adopting"`/`"adopted"`,
//! written on the revision read.
//!
//! - Start: claim our subjects, merge what they hold.
//! - Every [`ADOPT_EVERY`]: adopt the panes of nodes without a heartbeat
//!   (claim, read, purge, mark adopted, then merge and publish in full).
//! - Publish only with a fresh heartbeat; a node that finds its panes
//!   adopted drops its own and claims its subjects again.
//!
//! Why this order loses at most one checkpoint's updates and never counts
//! a pane twice: README, "Aggregates across nodes".

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::cluster::{Leases, Membership};
use crate::config::ClusterConfig;
use crate::engine::unix_ms;
use crate::journal::stream::wrong_sequence;
use crate::stages::{Aggregate, Stages, Summary};

/// How often changed panes are published: at most this much of a dead
/// node's updates is lost.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How often a node looks for panes of nodes gone.
pub const ADOPT_EVERY: Duration = Duration::from_secs(1);
/// An `"adopting"` claim older than this is of an adopter that died.
const ADOPTING_STALE_MS: u64 = 30_000;
/// Longest a read of the stream waits for its next message.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The subject token of an aggregate: FNV-1a of its name in hex (names
/// need not be subject tokens).
fn token(name: &str) -> String {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

fn claim_key(node: &str) -> String {
    format!("panes.{node}")
}

/// A claim on a node's subjects, as read.
struct Claim {
    by: String,
    state: String,
    at_ms: u64,
    revision: u64,
}

/// What became of a gone node's panes.
enum Adopted {
    /// This node adopted them: how many panes.
    Now(usize),
    /// They are adopted (or there were none).
    Already,
    /// Not yet: another node is adopting them, or this one cannot now.
    Pending,
}

/// What the pane log did, for the metrics.
#[derive(Debug, Default)]
pub struct PaneLogCounters {
    /// Pane parts published.
    pub published: AtomicU64,
    /// Nodes gone whose panes this node adopted.
    pub adoptions: AtomicU64,
    /// Times this node found its own panes adopted and dropped them.
    pub dropped: AtomicU64,
    /// Pane parts too large to publish.
    pub too_large: AtomicU64,
}

/// Publishes this node's panes and adopts those of nodes gone.
pub struct PaneLog {
    stream: stream::Stream,
    js: jetstream::Context,
    leases: Leases,
    stages: Arc<Stages>,
    membership: Arc<Membership>,
    node: String,
    /// `<prefix>.panes`
    root: String,
    /// One checkpoint at a time, so that an older version of a pane is
    /// never published after a newer one.
    publishing: tokio::sync::Mutex<Checkpoints>,
}

/// What the checkpoints remember between runs.
struct Checkpoints {
    /// When the last successful checkpoint started.
    since_ms: u64,
    /// Publish every pane next time (after an adoption).
    all: bool,
    /// The last checkpoint is done (shutdown): nothing more is published,
    /// since the heartbeat goes next and others may adopt the panes.
    closed: bool,
}

impl PaneLog {
    /// Opens (or creates) the stream `cluster.panes_stream` over `<prefix>.panes.>` keeping
    /// one message per subject for the longest window any aggregate keeps.
    ///
    /// # Errors
    ///
    /// If the stream cannot be created or read.
    pub async fn open(
        client: async_nats::Client,
        cluster: &ClusterConfig,
        prefix: &str,
        leases: Leases,
        stages: Arc<Stages>,
        membership: Arc<Membership>,
        node: String,
    ) -> Result<Self, String> {
        let (name, replicas) = (&cluster.panes_stream, cluster.replicas);
        let root = format!("{prefix}.panes");
        let keep_ms = stages
            .aggregates
            .iter()
            .map(|a| {
                let s = &a.settings;
                s.max_window_ms + s.lateness_ms + 2 * s.pane_ms
            })
            .max()
            .unwrap_or(0);
        let js = jetstream::new(client);
        let config = stream::Config {
            name: name.to_owned(),
            subjects: vec![format!("{root}.>")],
            max_messages_per_subject: 1,
            max_age: Duration::from_millis(keep_ms) + Duration::from_secs(600),
            num_replicas: replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let stream = js
            .create_or_update_stream(config)
            .await
            .map_err(|e| format!("stream {name}: {e}"))?;
        let stream = js
            .get_stream(&stream.config.name)
            .await
            .map_err(|e| format!("stream {name}: {e}"))?;
        Ok(Self {
            stream,
            js,
            leases,
            stages,
            membership,
            node,
            root,
            publishing: tokio::sync::Mutex::new(Checkpoints {
                since_ms: unix_ms(),
                all: false,
                closed: false,
            }),
        })
    }

    async fn claim(&self, node: &str) -> Result<Option<Claim>, String> {
        let Some((value, revision)) = self.leases.read(&claim_key(node)).await? else {
            return Ok(None);
        };
        let v: Value = serde_json::from_slice(&value).unwrap_or_default();
        Ok(Some(Claim {
            by: v["by"].as_str().unwrap_or_default().to_owned(),
            state: v["state"].as_str().unwrap_or_default().to_owned(),
            at_ms: v["at"].as_u64().unwrap_or(0),
            revision,
        }))
    }

    /// Writes the claim on `node`'s subjects, on `revision` (`None`: the
    /// key must not exist); returns the new revision, or `None` if another
    /// node wrote first.
    async fn write_claim(
        &self,
        node: &str,
        state: &str,
        revision: Option<u64>,
    ) -> Result<Option<u64>, String> {
        let value = json!({ "by": self.node, "state": state, "at": unix_ms() })
            .to_string()
            .into();
        match self
            .leases
            .write_lasting(&claim_key(node), value, revision.unwrap_or(0))
            .await
        {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if wrong_sequence(&e) => Ok(None),
            Err(e) => Err(format!("claim on the panes of {node}: {e}")),
        }
    }

    /// Claims this node's own subjects and merges what they hold; returns
    /// the panes restored.
    ///
    /// # Errors
    ///
    /// If the bucket or the stream cannot be read.
    pub async fn start(&self) -> Result<usize, String> {
        loop {
            let claim = self.claim(&self.node).await?;
            if let Some(c) = &claim
                && c.state == "adopting"
                && c.by != self.node
                && unix_ms().saturating_sub(c.at_ms) < ADOPTING_STALE_MS
            {
                tracing::info!(message = "Waiting for the node adopting this node's panes.", adopter = %c.by);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            if self
                .write_claim(&self.node, "own", claim.map(|c| c.revision))
                .await?
                .is_some()
            {
                break;
            }
        }
        let read = self.read(&self.node).await?;
        let mut panes = 0;
        for (agg, pane, group, summary) in &read {
            agg.absorb(group, *pane, summary, false);
            panes += 1;
        }
        Ok(panes)
    }

    /// Reads every pane `node` published: `(aggregate, pane, group,
    /// summary)`. Messages of aggregates this node does not have, or of
    /// another pane size or accuracy, are left out with a warning.
    async fn read(&self, node: &str) -> Result<Vec<(Arc<Aggregate>, u64, String, Summary)>, String> {
        let filter = format!("{}.{node}.>", self.root);
        let fail = |e: &dyn std::fmt::Display| format!("panes of {node}: {e}");
        let mut info = self
            .stream
            .info_with_subjects(&filter)
            .await
            .map_err(|e| fail(&e))?;
        let mut expected = 0u64;
        while let Some(subject) = info.next().await {
            expected += subject.map_err(|e| fail(&e))?.1 as u64;
        }
        let mut out = Vec::new();
        if expected == 0 {
            return Ok(out);
        }
        let by_token: HashMap<String, Arc<Aggregate>> = self
            .stages
            .aggregates
            .iter()
            .map(|a| (token(&a.settings.name), a.clone()))
            .collect();
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.clone(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(&e))?;
        let mut messages = consumer.messages().await.map_err(|e| fail(&e))?;
        let mut seen = 0;
        while seen < expected {
            let message = match tokio::time::timeout(READ_TIMEOUT, messages.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(e))) => return Err(fail(&e)),
                Ok(None) | Err(_) => return Err(fail(&"the read stopped before the last message")),
            };
            seen += 1;
            if message.info().is_ok_and(|i| i.pending == 0) {
                seen = expected;
            }
            // <root>.<node>.<aggregate>.<pane>.<part>
            let tail = message.subject.as_str()[filter.len() - 1..].to_owned();
            let mut tokens = tail.split('.');
            let (Some(agg), Some(pane)) = (tokens.next(), tokens.next().and_then(|p| p.parse().ok())) else {
                continue;
            };
            let Some(agg) = by_token.get(agg) else {
                tracing::warn!(message = "Leaving out published panes of an aggregate not configured here.", subject = %message.subject);
                continue;
            };
            let Ok(body) = serde_json::from_slice::<Value>(&message.payload) else {
                continue;
            };
            let s = &agg.settings;
            if body["pane_ms"].as_u64() != Some(s.pane_ms) || body["alpha"].as_f64() != Some(s.alpha) {
                tracing::warn!(message = "Leaving out published panes of another pane size or accuracy.", subject = %message.subject);
                continue;
            }
            let Some(groups) = body["groups"].as_object() else {
                continue;
            };
            for (group, summary) in groups {
                if let Some(summary) = Summary::from_json(summary) {
                    out.push((agg.clone(), pane, group.clone(), summary));
                }
            }
        }
        Ok(out)
    }

    /// Publishes the panes that changed since the last checkpoint (all of
    /// them after an adoption); first checks that this node still holds
    /// its claim and its heartbeat is fresh.
    pub async fn checkpoint(&self) {
        let mut state = self.publishing.lock().await;
        self.checkpoint_locked(&mut state).await;
    }

    /// The last checkpoint, at shutdown: after it nothing is published.
    pub async fn close(&self) {
        let mut state = self.publishing.lock().await;
        self.checkpoint_locked(&mut state).await;
        state.closed = true;
    }

    async fn checkpoint_locked(&self, state: &mut Checkpoints) {
        if state.closed || !self.membership.fresh() {
            return;
        }
        match self.claim(&self.node).await {
            Ok(Some(c)) if c.by == self.node => self.membership.panes_confirmed(),
            Ok(_) => {
                tracing::warn!(
                    message = "This node's panes were adopted by another (it was taken for gone): dropping them and claiming its subjects again."
                );
                for agg in &self.stages.aggregates {
                    agg.clear();
                }
                self.stages.replica.dropped.fetch_add(1, Relaxed);
                match self.start().await {
                    Ok(_) => self.membership.panes_confirmed(),
                    Err(e) => tracing::warn!(message = "Cannot claim this node's panes again.", error = %e),
                }
                state.since_ms = unix_ms();
                return;
            }
            Err(e) => {
                tracing::warn!(message = "Cannot read this node's claim; not publishing panes this time.", error = %e);
                return;
            }
        }
        let started = unix_ms();
        let max_payload = self.js.client().server_info().max_payload;
        let mut acks = Vec::new();
        for agg in &self.stages.aggregates {
            let s = &agg.settings;
            let from = state.since_ms.saturating_sub(s.lateness_ms + 2 * s.pane_ms) / s.pane_ms;
            for ((pane, part), groups) in agg.changed(state.all, from) {
                let groups: serde_json::Map<String, Value> =
                    groups.into_iter().map(|(g, s)| (g, s.to_json())).collect();
                let body = json!({ "pane_ms": s.pane_ms, "alpha": s.alpha, "groups": groups }).to_string();
                if body.len() >= max_payload {
                    self.stages.replica.too_large.fetch_add(1, Relaxed);
                    tracing::error!(message = "A pane's part is larger than the server's max_payload; not published.", aggregate = %s.name, pane, part, bytes = body.len(), max_payload);
                    continue;
                }
                let subject = format!("{}.{}.{}.{pane}.{part}", self.root, self.node, token(&s.name));
                match self.js.publish(subject, body.into()).await {
                    Ok(ack) => acks.push(ack),
                    Err(e) => {
                        tracing::warn!(message = "Cannot publish panes; they are published in full next time.", error = %e);
                        state.all = true;
                        return;
                    }
                }
            }
        }
        let published = acks.len() as u64;
        for ack in
            futures_util::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await
        {
            if let Err(e) = ack {
                tracing::warn!(message = "Panes not acknowledged; they are published in full next time.", error = %e);
                state.all = true;
                return;
            }
        }
        self.stages.replica.published.fetch_add(published, Relaxed);
        state.since_ms = started;
        state.all = false;
    }

    /// Adopts the panes of every node that holds its own (its claim says
    /// `"own"`, or an adopter died while `"adopting"`) and has no
    /// heartbeat. The claims come from the keeper's listing of the bucket
    /// each round; only a gone node's claim is read.
    pub async fn adopt(&self) {
        // The keeper's last listing of the bucket: the live nodes and the
        // claims.
        let Some((live, claimed)) = self.membership.listing() else {
            return;
        };
        let (mut orphans, mut resolved) = (Vec::new(), Vec::new());
        for node in claimed {
            if node == self.node || live.contains(&node) {
                continue;
            }
            match self.adopt_one(&node).await {
                Ok(Adopted::Now(panes)) => {
                    self.stages.replica.adoptions.fetch_add(1, Relaxed);
                    tracing::info!(message = "Adopted the panes of a node gone.", node = %node, panes);
                    resolved.push(node);
                }
                Ok(Adopted::Already) => resolved.push(node),
                Ok(Adopted::Pending) => orphans.push(node),
                Err(e) => {
                    tracing::warn!(message = "Cannot adopt the panes of a node gone.", node = %node, error = %e);
                    orphans.push(node);
                }
            }
        }
        self.membership.set_orphans(orphans, &resolved);
    }

    /// Claims, reads, purges and merges `node`'s panes.
    async fn adopt_one(&self, node: &str) -> Result<Adopted, String> {
        // Held throughout: a node shutting down adopts nothing.
        let mut state = self.publishing.lock().await;
        if state.closed || !self.membership.fresh() {
            return Ok(Adopted::Pending);
        }
        let claim = self.claim(node).await?;
        let Some(c) = &claim else {
            return Ok(Adopted::Already);
        };
        if c.state == "adopted" {
            return Ok(Adopted::Already);
        }
        if c.state == "adopting" && unix_ms().saturating_sub(c.at_ms) < ADOPTING_STALE_MS {
            return Ok(Adopted::Pending);
        }
        // A node claims its panes at start, a moment before its first
        // heartbeat: one that claimed within two TTLs may be starting, and
        // one with a heartbeat in the bucket now is live, whatever the
        // list of the last round said.
        let ttl_ms = u64::try_from(self.membership.ttl().as_millis()).unwrap_or(u64::MAX);
        if c.state == "own" && unix_ms().saturating_sub(c.at_ms) < 2 * ttl_ms {
            return Ok(Adopted::Pending);
        }
        if self
            .leases
            .read(&crate::cluster::lease::node_key(node))
            .await?
            .is_some()
        {
            return Ok(Adopted::Pending);
        }
        let Some(revision) = self
            .write_claim(node, "adopting", claim.map(|c| c.revision))
            .await?
        else {
            return Ok(Adopted::Pending);
        };
        let read = self.read(node).await?;
        self.stream
            .purge()
            .filter(format!("{}.{node}.>", self.root))
            .await
            .map_err(|e| format!("purging the panes of {node}: {e}"))?;
        if self.write_claim(node, "adopted", Some(revision)).await?.is_none() {
            // Someone took the claim meanwhile (this node was stalled past
            // ADOPTING_STALE_MS): they have the panes.
            return Ok(Adopted::Already);
        }
        for (agg, pane, group, summary) in &read {
            agg.absorb(group, *pane, summary, true);
        }
        state.all = true;
        Ok(Adopted::Now(read.len()))
    }

    /// Checkpoints every [`CHECKPOINT_EVERY`] and adopts every
    /// [`ADOPT_EVERY`], until aborted.
    pub async fn run(self: Arc<Self>) {
        let mut checkpoints = tokio::time::interval(CHECKPOINT_EVERY);
        let mut adoptions = tokio::time::interval(ADOPT_EVERY);
        for tick in [&mut checkpoints, &mut adoptions] {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = checkpoints.tick() => self.checkpoint().await,
                _ = adoptions.tick() => self.adopt().await,
            }
        }
    }
}
