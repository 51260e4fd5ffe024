//! `[cluster]`: leases, the journal and pane streams of
//! `durability = "replicated"`.

use serde::{Deserialize, Serialize};

/// `[cluster]`: used with `durability = "replicated"` only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's name in the KV bucket (`node.<id>`, lease owners):
    /// letters, digits, `-` and `_`. Default: made up at each start.
    pub node_id: String,
    /// How long a shard's lease lasts without renewal (renewed every
    /// third of it); a dead node's shards are taken over this long after
    /// its last renewal. Whole seconds, at least `1s`. Default `3s`.
    pub lease_ttl: String,
    /// The JetStream stream of the journal, over `<prefix>.journal.*`;
    /// created if absent. Default `EVENTSIEVE_JOURNAL`.
    pub journal_stream: String,
    /// The JetStream stream of the aggregates' panes, over
    /// `<prefix>.panes.>`, so that a node's panes outlive it (see
    /// `stages::replica`); created if absent, used only with
    /// `[[aggregate]]`. Default `EVENTSIEVE_PANES`.
    pub panes_stream: String,
    /// Replicas of the journal and pane streams and of the KV bucket when
    /// this node creates them: 1 on a single server, 3 on a cluster.
    /// Default 1.
    pub replicas: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            lease_ttl: "3s".into(),
            journal_stream: "EVENTSIEVE_JOURNAL".into(),
            panes_stream: "EVENTSIEVE_PANES".into(),
            replicas: 1,
        }
    }
}
