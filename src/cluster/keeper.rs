//! The [`Keeper`]: this node's leases, and the shards it moves in and out.
//!
//! It runs one round every third of `lease_ttl`:
//!
//! 1. writes its heartbeat, renews every lease it holds; a renewal that fails gives the shard up
//!    at once (503 until its subscription is fenced, then forwarded), well
//!    before the lease can expire and another node take it;
//! 2. catches up a shard whose journal append was refused (another node
//!    appended: it replays the tail, or gives the shard up if its lease is
//!    gone too);
//! 3. counts the live nodes (heartbeats not expired), and notes the pane
//!    claims of the same listing (the aggregates' pane log reads them);
//! 4. hands over the shards it holds beyond its fair share
//!    (`ceil(shards / live nodes)`): fence the shard's subscriptions, answer
//!    and commit what they routed here, stop appending, release the lease
//!    with the journal sequence it stopped at;
//! 5. takes free shards up to its fair share: acquire the lease, subscribe
//!    (requests get 503 meanwhile), replay the shard's journal into an
//!    empty table, serve.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::engine::unix_ms;
use crate::journal::stream::{self, StreamJournal};
use crate::observe::metrics::Metrics;
use crate::pipeline::ShardState;
use crate::shared::Shared;
use crate::transport::{Kind, Serving};

use super::lease::{Holder, Lease, Leases};
use super::membership::Membership;

/// A shard this node holds the lease of.
struct HeldShard {
    lease: Lease,
    /// The lease's revision in the bucket, for the next renewal.
    revision: u64,
    /// Until when appends of the shard are allowed: the start of the last
    /// successful renewal plus two thirds of the TTL.
    valid_until: Instant,
    /// The shard's subscriptions (events and sub-batches).
    subs: Vec<Serving>,
    /// Its journal is replayed and it answers.
    ready: bool,
    /// The last renewal failed without the lease being taken (JetStream
    /// unavailable): the shard answers 503 until a renewal succeeds, or
    /// the lease is given up once it may have expired.
    suspended: bool,
}

/// What a takeover task hands back.
struct Taken {
    shard: u32,
    /// The epoch of the lease it was started for.
    epoch: u64,
    /// The shard restored, or why it could not be.
    result: Result<Restored, String>,
    /// When the lease was acquired.
    started: Instant,
}

/// A shard whose table a takeover rebuilt, subscribed and ready to serve.
struct Restored {
    subs: Vec<Serving>,
    /// The last journal sequence applied.
    last: u64,
    /// Ids restored from the local copy, and from the journal beyond it.
    from_copy: usize,
    from_journal: usize,
}

/// Holds this node's leases and moves shards in and out.
pub struct Keeper {
    ctx: Arc<Shared>,
    leases: Leases,
    journal: StreamJournal,
    node: String,
    ttl: Duration,
    held: BTreeMap<u32, HeldShard>,
    takeovers: JoinSet<Taken>,
    /// Shards with a takeover task running: not acquired again until it
    /// ends, so that two replays never fill one table.
    taking: std::collections::BTreeSet<u32>,
    /// The shard and epoch of each takeover task, to know which one a
    /// panicked task was for.
    takeover_ids: std::collections::HashMap<tokio::task::Id, (u32, u64)>,
    started: Instant,
    /// When the last heartbeat was written, and the verdicts then.
    last_beat: (Instant, u64),
    /// Where this node runs, for its heartbeat: host, pid, addresses.
    about: serde_json::Value,
    membership: Arc<Membership>,
    /// Run at shutdown, once the shards are handed over and with a fresh
    /// heartbeat, before the heartbeat is removed.
    on_stop: Option<OnStop>,
}

/// What a [`Keeper`] runs at shutdown before its heartbeat goes (see
/// [`Keeper::on_stop`]).
pub type OnStop = Box<dyn FnOnce() -> futures_util::future::BoxFuture<'static, ()> + Send>;

impl Keeper {
    pub fn new(
        ctx: Arc<Shared>,
        leases: Leases,
        journal: StreamJournal,
        node: String,
        ttl: Duration,
    ) -> Self {
        Self {
            ctx,
            leases,
            journal,
            node,
            ttl,
            held: BTreeMap::new(),
            takeovers: JoinSet::new(),
            taking: std::collections::BTreeSet::new(),
            takeover_ids: std::collections::HashMap::new(),
            started: Instant::now(),
            last_beat: (Instant::now(), 0),
            about: serde_json::Value::Null,
            membership: Arc::new(Membership::new(ttl)),
            on_stop: None,
        }
    }

    /// Shares what the keeper learns of the cluster through `membership`.
    pub fn with_membership(mut self, membership: Arc<Membership>) -> Self {
        self.membership = membership;
        self
    }

    /// Runs `on_stop` at shutdown, after the shards are handed over and
    /// while this node still counts as live (its heartbeat written just
    /// before): the aggregates checkpoint their panes there, so that the
    /// node adopting them finds them whole.
    pub fn on_stop(mut self, on_stop: OnStop) -> Self {
        self.on_stop = Some(on_stop);
        self
    }

    /// Writes the heartbeat; records when, if it was written.
    async fn beat(&mut self) {
        let beat = self.heartbeat().await;
        let started = Instant::now();
        if self.leases.heartbeat(&self.node, &beat).await.is_ok() {
            self.membership.beat_at(started);
        }
    }

    /// Adds `about` (where the node runs: host, pid, addresses) to every
    /// heartbeat.
    pub fn with_about(mut self, about: serde_json::Value) -> Self {
        self.about = about;
        self
    }

    fn metrics(&self) -> &Metrics {
        &self.ctx.metrics
    }

    fn shards(&self) -> u32 {
        self.ctx.pipeline.ownership().shards()
    }

    /// Runs rounds until `stop` changes; then hands every shard over and
    /// removes the heartbeat.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        // Announce first and give nodes starting together a moment to see
        // each other, so the first round already takes a fair share.
        self.beat().await;
        tokio::time::sleep(self.ttl / 6).await;
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.round().await,
                Some(done) = self.takeovers.join_next_with_id(), if !self.takeovers.is_empty() => {
                    self.joined(done).await;
                }
                _ = stop.changed() => break,
            }
        }
        self.stop().await;
    }

    /// Heartbeat, renew, catch up, hand over, take.
    async fn round(&mut self) {
        // The heartbeat first: it then expires a moment before the leases
        // of a node that died, so the others count it gone when its
        // shards come free.
        self.beat().await;
        self.renew().await;
        self.catch_up().await;
        let live = match self.leases.keys("").await {
            Ok(keys) => {
                let with = |prefix: &str| -> Vec<String> {
                    keys.iter()
                        .filter_map(|k| k.strip_prefix(prefix))
                        .map(str::to_owned)
                        .collect()
                };
                let nodes = with("node.");
                let live = nodes.len().max(1) as u32;
                self.membership.listed(nodes, with("panes."));
                live
            }
            Err(e) => {
                tracing::warn!(message = "Cannot list the live nodes; keeping the shards as they are.", error = %e);
                return;
            }
        };
        let fair = self.shards().div_ceil(live) as usize;
        let ready: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| h.ready)
            .map(|(s, _)| *s)
            .collect();
        let extra = self.held.len().saturating_sub(fair).min(ready.len());
        if extra > 0 {
            let give: Vec<u32> = ready.iter().rev().take(extra).copied().collect();
            tracing::info!(message = "Handing shards over to even out the load.", shards = ?give, live_nodes = live, fair_share = fair);
            self.hand_over(&give).await;
        } else if self.held.len() < fair {
            self.take(fair - self.held.len()).await;
        }
        self.metrics().leases_held.store(self.held.len() as u64, Relaxed);
    }

    /// Renews every lease at once. A lease someone else wrote is given up
    /// at once; one that could not be written (JetStream unavailable)
    /// suspends its shard (503) until a renewal succeeds, and is given up
    /// once it may have expired.
    async fn renew(&mut self) {
        let started = Instant::now();
        let renewals = self.held.iter().map(|(&shard, held)| {
            let leases = self.leases.clone();
            let mut lease = held.lease.clone();
            lease.journal_seq = self.journal.positions().last(shard).unwrap_or(lease.journal_seq);
            let revision = held.revision;
            async move {
                let mut result = leases.renew(shard, &lease, revision).await;
                if let Err(e) = &result
                    && stream::wrong_sequence(e)
                    && let Ok(Holder::Held { lease: now, revision }) = leases.holder(shard).await
                    && now.owner == lease.owner
                    && now.epoch == lease.epoch
                {
                    // Our own renewal whose acknowledgement was lost.
                    result = leases.renew(shard, &lease, revision).await;
                }
                (shard, result, lease)
            }
        });
        let results = futures_util::future::join_all(renewals).await;
        let valid_until = started + self.ttl * 2 / 3;
        let ctx = self.ctx.clone();
        let ownership = ctx.pipeline.ownership();
        for (shard, result, lease) in results {
            let held = self.held.get_mut(&shard).expect("renewed shards are held");
            match result {
                Ok(revision) => {
                    held.revision = revision;
                    held.lease = lease;
                    held.valid_until = valid_until;
                    self.journal.positions().extend(shard, valid_until);
                    if held.suspended {
                        held.suspended = false;
                        if held.ready {
                            ownership.set(shard, ShardState::Ready);
                            tracing::info!(message = "Lease renewed again; serving the shard.", shard);
                        }
                    }
                }
                Err(e) if !stream::wrong_sequence(&e) && Instant::now() < held.valid_until + self.ttl / 3 => {
                    if !held.suspended {
                        tracing::warn!(message = "Lease renewal failed; the shard answers 503 until a renewal succeeds.", shard, error = %e);
                        held.suspended = true;
                        ownership.set(shard, ShardState::Recovering);
                    }
                }
                Err(e) => {
                    Metrics::inc(&self.metrics().leases_lost);
                    tracing::warn!(message = "Lease lost; the shard is given up.", shard, error = %e);
                    self.lose(shard).await;
                }
            }
        }
    }

    /// Replays the tail of shards whose append was refused.
    async fn catch_up(&mut self) {
        let fenced: Vec<u32> = self
            .held
            .iter()
            .filter(|(s, h)| h.ready && !h.suspended && self.journal.positions().is_fenced(**s))
            .map(|(s, _)| *s)
            .collect();
        for shard in fenced {
            let ownership = self.ctx.pipeline.ownership();
            ownership.set(shard, ShardState::Recovering);
            let after = self.journal.positions().last(shard).unwrap_or(0);
            match self.journal.replay(shard, after, self.ctx.pipeline.dedup()).await {
                Ok((last, ids)) => {
                    let until = self.held[&shard].valid_until;
                    self.journal.positions().hold(shard, last, until);
                    ownership.set(shard, ShardState::Ready);
                    tracing::warn!(
                        message = "Another node appended to this shard's journal; caught up.",
                        shard,
                        from = after,
                        to = last,
                        ids
                    );
                }
                Err(e) => {
                    tracing::error!(message = "Cannot catch up on the shard's journal; giving it up.", shard, error = %e);
                    self.hand_over(&[shard]).await;
                }
            }
        }
    }

    /// Acquires up to `wanted` free shards and starts their takeovers.
    async fn take(&mut self, mut wanted: usize) {
        let shards = self.shards();
        // Nodes start their search at different shards, so that they
        // rarely race for the same one.
        let offset = crate::engine::shard::fnv1a32(self.node.as_bytes()) % shards;
        for i in 0..shards {
            if wanted == 0 {
                break;
            }
            let shard = (offset + i) % shards;
            if self.held.contains_key(&shard) || self.taking.contains(&shard) {
                continue;
            }
            let (revision, journal_seq) = match self.leases.holder(shard).await {
                Ok(Holder::Free { revision }) => (revision, 0),
                Ok(Holder::Held { .. }) => continue,
                Err(e) => {
                    tracing::warn!(message = "Cannot read a shard's lease.", shard, error = %e);
                    return;
                }
            };
            let started = Instant::now();
            match self
                .leases
                .acquire(shard, &self.node, revision, journal_seq)
                .await
            {
                Ok(Some((lease, revision))) => {
                    tracing::info!(
                        message = "Lease acquired; replaying the shard's journal.",
                        shard,
                        epoch = lease.epoch
                    );
                    self.held.insert(
                        shard,
                        HeldShard {
                            lease,
                            revision,
                            valid_until: started + self.ttl * 2 / 3,
                            subs: Vec::new(),
                            ready: false,
                            suspended: false,
                        },
                    );
                    wanted -= 1;
                    self.taking.insert(shard);
                    let epoch = self.held[&shard].lease.epoch;
                    self.takeovers.spawn(takeover(
                        self.ctx.clone(),
                        self.journal.clone(),
                        shard,
                        epoch,
                        started,
                    ));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(message = "Cannot acquire a shard's lease.", shard, error = %e);
                    return;
                }
            }
        }
    }

    /// A takeover task ended; one that panicked counts as failed.
    async fn joined(&mut self, done: Result<(tokio::task::Id, Taken), tokio::task::JoinError>) {
        let (id, taken) = match done {
            Ok((id, taken)) => (id, taken),
            Err(e) => {
                let Some((shard, epoch)) = self.takeover_ids.remove(&e.id()) else {
                    return;
                };
                let taken = Taken {
                    shard,
                    epoch,
                    result: Err(format!("the takeover task failed: {e}")),
                    started: Instant::now(),
                };
                (e.id(), taken)
            }
        };
        self.takeover_ids.remove(&id);
        self.taken(taken).await;
    }

    /// A takeover ended: serve the shard, or let it go.
    async fn taken(&mut self, taken: Taken) {
        let Taken {
            shard,
            epoch,
            result,
            started,
        } = taken;
        self.taking.remove(&shard);
        let ownership = self.ctx.pipeline.ownership();
        // The lease it was started for, not one acquired again since.
        let held = self.held.get_mut(&shard).filter(|h| h.lease.epoch == epoch);
        match (result, held) {
            (
                Ok(Restored {
                    subs,
                    last,
                    from_copy,
                    from_journal,
                }),
                Some(held),
            ) => {
                held.subs = subs;
                held.ready = true;
                self.journal.positions().hold(shard, last, held.valid_until);
                if !held.suspended {
                    ownership.set(shard, ShardState::Ready);
                }
                let ms = started.elapsed().as_millis() as u64;
                Metrics::inc(&self.metrics().takeovers);
                self.metrics().takeover_ms.fetch_add(ms, Relaxed);
                self.metrics()
                    .restored_from_copy
                    .fetch_add(from_copy as u64, Relaxed);
                self.metrics()
                    .restored_from_journal
                    .fetch_add(from_journal as u64, Relaxed);
                tracing::info!(
                    message = "Shard taken over.",
                    shard,
                    from_copy,
                    from_journal,
                    journal_seq = last,
                    elapsed_ms = ms
                );
            }
            (Ok(Restored { subs, .. }), None) => {
                // The lease was lost while replaying.
                drain(subs).await;
                ownership.set(shard, ShardState::Elsewhere);
                self.ctx.pipeline.dedup().clear(shard);
            }
            (Err(e), held) => {
                tracing::error!(message = "Takeover failed; releasing the lease.", shard, error = %e);
                if held.is_some()
                    && let Some(held) = self.held.remove(&shard)
                {
                    let _ = self
                        .leases
                        .release(shard, &held.lease, held.revision, held.lease.journal_seq)
                        .await;
                }
                ownership.set(shard, ShardState::Elsewhere);
                self.ctx.pipeline.dedup().clear(shard);
            }
        }
    }

    /// The lease is gone: refuse at once, then stop listening.
    async fn lose(&mut self, shard: u32) {
        let Some(held) = self.held.remove(&shard) else {
            return;
        };
        let ownership = self.ctx.pipeline.ownership();
        ownership.set(shard, ShardState::Recovering);
        self.journal.positions().release(shard);
        drain(held.subs).await;
        ownership.set(shard, ShardState::Elsewhere);
        self.ctx.pipeline.dedup().clear(shard);
    }

    /// Gives `shards` to whoever takes them next: fence, answer and commit
    /// what was routed here, stop appending, release with the sequence.
    async fn hand_over(&mut self, shards: &[u32]) {
        let mut leaving = Vec::new();
        for shard in shards {
            if let Some(mut held) = self.held.remove(shard) {
                leaving.push((*shard, std::mem::take(&mut held.subs), held));
            }
        }
        futures_util::future::join_all(leaving.iter_mut().map(|(_, subs, _)| drain(std::mem::take(subs))))
            .await;
        // What they accepted reaches the output before the next owner's.
        for (shard, _, _) in &leaving {
            self.ctx.pipeline.drained(*shard).await;
        }
        let ownership = self.ctx.pipeline.ownership();
        let releases = leaving.iter().map(|(shard, _, held)| {
            let last = self
                .journal
                .positions()
                .release(*shard)
                .unwrap_or(held.lease.journal_seq);
            ownership.set(*shard, ShardState::Elsewhere);
            let leases = self.leases.clone();
            async move {
                (
                    *shard,
                    leases.release(*shard, &held.lease, held.revision, last).await,
                )
            }
        });
        for (shard, result) in futures_util::future::join_all(releases).await {
            Metrics::inc(&self.metrics().handovers);
            self.ctx.pipeline.dedup().clear(shard);
            if let Err(e) = result {
                tracing::warn!(message = "Releasing a lease failed; it expires by itself.", shard, error = %e);
            }
        }
    }

    /// Shutdown: every shard handed over, the heartbeat removed.
    async fn stop(mut self) {
        // Takeovers in progress end first; their shards are handed over too.
        while let Some(done) = self.takeovers.join_next_with_id().await {
            self.joined(done).await;
        }
        let shards: Vec<u32> = self.held.keys().copied().collect();
        self.hand_over(&shards).await;
        if let Some(on_stop) = self.on_stop.take() {
            self.beat().await;
            on_stop().await;
        }
        self.leases.leave(&self.node).await;
        self.metrics().leases_held.store(0, Relaxed);
        tracing::info!(message = "Shards handed over.", shards = shards.len());
    }

    /// This node's `node.<id>` value.
    ///
    /// The table figures come from the metrics' census (one walk per
    /// [`crate::observe::metrics::CENSUS_EVERY`] at most, off the runtime),
    /// not from a walk every round.
    async fn heartbeat(&mut self) -> serde_json::Value {
        let ctx = self.ctx.clone();
        let census = tokio::task::spawn_blocking(move || ctx.metrics.census.get(ctx.pipeline.dedup()))
            .await
            .unwrap_or_default();
        let m = &self.ctx.metrics;
        let verdicts = m.accepted.load(Relaxed) + m.duplicates.load(Relaxed);
        let (at, before) = std::mem::replace(&mut self.last_beat, (Instant::now(), verdicts));
        let per_s = (verdicts - before) as f64 / at.elapsed().as_secs_f64().max(1e-3);
        let (ids, bytes) = (census.live, census.bytes);
        let mut beat = serde_json::json!({
            "node": self.node,
            "heartbeat": unix_ms(),
            "uptime_s": self.started.elapsed().as_secs(),
            "shards": self.held.keys().collect::<Vec<_>>(),
            "ready": self.held.iter().filter(|(_, h)| h.ready).map(|(s, _)| s).collect::<Vec<_>>(),
            "verdicts": verdicts,
            "verdicts_per_s": per_s.round(),
            "ids": ids,
            "table_bytes": bytes,
            "bytes_per_id": (bytes as f64 / ids.max(1) as f64 * 10.0).round() / 10.0,
        });
        if let (Some(beat), Some(about)) = (beat.as_object_mut(), self.about.as_object()) {
            beat.extend(about.clone());
        }
        beat
    }
}

/// Subscribes to a shard's subjects (503 while recovering), rebuilds its
/// emptied table from the local copy and the journal beyond it.
async fn takeover(
    ctx: Arc<Shared>,
    journal: StreamJournal,
    shard: u32,
    epoch: u64,
    started: Instant,
) -> Taken {
    let result = restore(&ctx, &journal, shard).await;
    Taken {
        shard,
        epoch,
        result,
        started,
    }
}

async fn restore(ctx: &Arc<Shared>, journal: &StreamJournal, shard: u32) -> Result<Restored, String> {
    let ownership = ctx.pipeline.ownership();
    ownership.set(shard, ShardState::Recovering);
    let mut subs = Vec::new();
    for kind in Kind::of_shard(shard) {
        match Serving::start(ctx, kind).await {
            Ok(s) => subs.push(s),
            Err(e) => {
                drain(subs).await;
                return Err(e.to_string());
            }
        }
    }
    ctx.pipeline.dedup().clear(shard);
    match journal.restore(shard, ctx.pipeline.dedup()).await {
        Ok((last, from_copy, from_journal)) => Ok(Restored {
            subs,
            last,
            from_copy,
            from_journal,
        }),
        Err(e) => {
            drain(subs).await;
            Err(e.to_string())
        }
    }
}

async fn drain(subs: Vec<Serving>) {
    futures_util::future::join_all(subs.into_iter().map(Serving::drain)).await;
}
