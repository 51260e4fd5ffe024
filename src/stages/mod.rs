//! Stages over the deduplicated stream, fed by the pipeline's accepted
//! hook per shard: windowed aggregates and quantile sketches
//! ([`aggregate`]), answered and merged across nodes over NATS
//! ([`query`]).

pub mod aggregate;
pub mod fields;
pub mod query;
pub mod sketch;

use std::sync::Arc;

use crate::engine::unix_ms;
use crate::pipeline::Accepted;

pub use aggregate::{Aggregate, AggregateSettings, Summary};

/// Every configured stage.
#[derive(Default)]
pub struct Stages {
    pub aggregates: Vec<Arc<Aggregate>>,
}

impl Stages {
    pub fn new(settings: &[AggregateSettings], shards: u32) -> Self {
        Self {
            aggregates: settings
                .iter()
                .map(|s| Arc::new(Aggregate::new(s.clone(), shards)))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.aggregates.is_empty()
    }

    /// Feeds the accepted `events` of `shard` to every stage.
    pub fn observe(&self, shard: u32, events: &Accepted<'_>) {
        if self.aggregates.is_empty() {
            return;
        }
        let now = unix_ms();
        for agg in &self.aggregates {
            agg.observe(shard, events.events(), now);
        }
    }

    /// Drops what no query can reach any more.
    pub fn evict(&self) {
        let now = unix_ms();
        for agg in &self.aggregates {
            agg.evict(now);
        }
    }

    /// The aggregate a query names: by `"aggregate"`, else the one whose
    /// group field the query carries.
    pub fn find(&self, query: &serde_json::Value) -> Result<&Arc<Aggregate>, String> {
        if let Some(name) = query.get("aggregate") {
            let name = name.as_str().ok_or("\"aggregate\" must be a name")?;
            return self
                .aggregates
                .iter()
                .find(|a| a.settings.name == name)
                .ok_or_else(|| format!("no aggregate named {name:?}"));
        }
        let mut found = self
            .aggregates
            .iter()
            .filter(|a| query.get(&a.settings.group).is_some());
        match (found.next(), found.next()) {
            (Some(a), None) => Ok(a),
            (None, _) => Err(format!(
                "the query names no aggregate: give one of the group fields ({}) or \"aggregate\"",
                self.aggregates
                    .iter()
                    .map(|a| a.settings.group.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            (Some(_), Some(_)) => Err("several aggregates group by that field: add \"aggregate\"".into()),
        }
    }
}
