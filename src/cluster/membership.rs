//! What the keeper learns of the other nodes: when this node's heartbeat
//! was last written, the live nodes and the pane claims of the last
//! listing. The aggregates read it to know whose panes a query lacks and
//! whether their own may be counted.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// One listing of the bucket: when, its live nodes, its pane claims.
struct Listing {
    at: Instant,
    nodes: Vec<String>,
    claims: Vec<String>,
}

/// `mutex` locked, whether or not a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the keeper knows of the cluster, for the aggregates: when this
/// node's heartbeat was last written, and which nodes were live then.
pub struct Membership {
    ttl: Duration,
    /// When the last successful heartbeat write started.
    beat: Mutex<Option<Instant>>,
    /// The live nodes and the pane claims (`panes.<node>` keys) at the
    /// last round, and when they were listed.
    nodes: Mutex<Option<Listing>>,
    /// Nodes gone whose aggregate panes no live node has adopted yet, as
    /// the last look at the claims found them.
    orphans: Mutex<Vec<String>>,
    /// Nodes seen live whose panes are not known to be adopted: one that
    /// leaves the live list counts as an orphan at once, before the next
    /// look at the claims.
    seen_live: Mutex<BTreeSet<String>>,
    /// The heartbeat lapsed since this node's panes were last found its
    /// own: another node may have adopted them, so queries leave them out
    /// until a checkpoint has read the claim again.
    suspect: AtomicBool,
}

impl Membership {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            beat: Mutex::new(None),
            nodes: Mutex::new(None),
            orphans: Mutex::new(Vec::new()),
            seen_live: Mutex::new(BTreeSet::new()),
            suspect: AtomicBool::new(false),
        }
    }

    /// Whether queries may count this node's panes: its heartbeat is fresh
    /// and has not lapsed since a checkpoint last found the panes its own
    /// (a node woken after being taken for gone may have had them adopted;
    /// counting them then would count their events twice).
    pub fn panes_trusted(&self) -> bool {
        self.fresh() && !self.suspect.load(Ordering::Acquire)
    }

    /// A checkpoint found the panes this node's own, with a fresh heartbeat.
    pub fn panes_confirmed(&self) {
        self.suspect.store(false, Ordering::Release);
    }

    /// The lease TTL: a node's heartbeat lasts this long.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Nodes gone whose panes are not adopted yet (queries lack them):
    /// those the last look at the claims found, and those seen live that
    /// are live no more.
    pub fn orphans(&self) -> Vec<String> {
        let mut out = lock(&self.orphans).clone();
        if let Some(live) = self.live() {
            let seen = lock(&self.seen_live);
            let gone: Vec<String> = seen
                .iter()
                .filter(|n| !live.contains(n) && !out.contains(n))
                .cloned()
                .collect();
            out.extend(gone);
        }
        out
    }

    /// What a look at the claims found: nodes gone with panes not adopted
    /// yet (`pending`), and nodes whose panes are adopted (`resolved`).
    pub fn set_orphans(&self, pending: Vec<String>, resolved: &[String]) {
        let mut seen = lock(&self.seen_live);
        for node in resolved {
            seen.remove(node);
        }
        *lock(&self.orphans) = pending;
    }

    /// The heartbeat was written within two thirds of the TTL: no other
    /// node can count this one gone (the rule the journal's appends follow).
    pub fn fresh(&self) -> bool {
        let beat = *lock(&self.beat);
        beat.is_some_and(|at| at.elapsed() < self.ttl * 2 / 3)
    }

    /// The live nodes, if listed within the TTL.
    pub fn live(&self) -> Option<Vec<String>> {
        self.listing().map(|(nodes, _)| nodes)
    }

    /// The live nodes and the nodes with a pane claim, if listed within
    /// the TTL (one listing of the bucket serves the keeper and the pane
    /// log).
    pub fn listing(&self) -> Option<(Vec<String>, Vec<String>)> {
        let nodes = lock(&self.nodes);
        nodes
            .as_ref()
            .filter(|l| l.at.elapsed() < self.ttl)
            .map(|l| (l.nodes.clone(), l.claims.clone()))
    }

    pub(super) fn beat_at(&self, at: Instant) {
        let mut beat = lock(&self.beat);
        if beat.is_some_and(|last| at.saturating_duration_since(last) >= self.ttl * 2 / 3) {
            self.suspect.store(true, Ordering::Release);
        }
        *beat = Some(at);
    }

    pub(super) fn listed(&self, nodes: Vec<String>, claims: Vec<String>) {
        lock(&self.seen_live).extend(nodes.iter().cloned());
        *lock(&self.nodes) = Some(Listing {
            at: Instant::now(),
            nodes,
            claims,
        });
    }
}
