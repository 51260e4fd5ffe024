//! Stages over the deduplicated stream, fed by the pipeline's accepted
//! hook: windowed aggregates and quantile sketches
//! ([`aggregate`]), answered and merged across nodes over NATS
//! ([`query`]).

pub mod aggregate;
pub mod emit;
pub mod fields;
pub mod query;
pub mod replica;
pub mod sketch;
pub mod snapshot;
pub mod topk;

use std::sync::Arc;

use crate::config::{AggregateSettings, captured_fields};
use crate::engine::input::Format;
use crate::engine::unix_ms;
use crate::pipeline::{Accepted, Stage};

pub use aggregate::{Aggregate, Summary};

impl crate::observe::metrics::Render for Stages {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        use std::sync::atomic::Ordering::Relaxed;
        if self.aggregates.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "# HELP eventsieve_aggregate_events_total Accepted events per aggregate: added to a pane, out of time (later than the lateness allows, or ahead of the clock), skipped (no group text, numeric value or numeric time), or filtered (its `when` did not match).\n# TYPE eventsieve_aggregate_events_total counter"
        );
        for a in &self.aggregates {
            let c = &a.counters;
            for (outcome, n) in [
                ("added", &c.added),
                ("out_of_time", &c.out_of_time),
                ("skipped", &c.skipped),
                ("filtered", &c.filtered),
            ] {
                let _ = writeln!(
                    out,
                    "eventsieve_aggregate_events_total{{aggregate=\"{}\",outcome=\"{outcome}\"}} {}",
                    a.settings.name,
                    n.load(Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP eventsieve_aggregate_panes Panes held per aggregate (every group and shard).\n# TYPE eventsieve_aggregate_panes gauge"
        );
        for a in &self.aggregates {
            let _ = writeln!(
                out,
                "eventsieve_aggregate_panes{{aggregate=\"{}\"}} {}",
                a.settings.name,
                a.panes()
            );
        }
        let r = &self.replica;
        let _ = writeln!(
            out,
            "# HELP eventsieve_aggregate_pane_log_total What the pane log did (durability replicated): pane parts published, nodes gone whose panes were adopted, times this node found its own adopted and dropped them, parts too large to publish.\n# TYPE eventsieve_aggregate_pane_log_total counter"
        );
        for (what, n) in [
            ("published", &r.published),
            ("adopted", &r.adoptions),
            ("dropped", &r.dropped),
            ("too_large", &r.too_large),
        ] {
            let _ = writeln!(
                out,
                "eventsieve_aggregate_pane_log_total{{event=\"{what}\"}} {}",
                n.load(Relaxed)
            );
        }
    }
}

impl Stage for Stages {
    fn accepted(&self, _shard: u32, events: &Accepted<'_>) {
        self.observe(events);
    }
}

/// Version of the snapshot file's layout.
const SNAPSHOT_VERSION: u64 = 2;

/// The snapshot file of the aggregates, in `data_dir`.
pub const SNAPSHOT_FILE: &str = "aggregates.json";

/// Every configured stage.
#[derive(Default)]
pub struct Stages {
    pub aggregates: Vec<Arc<Aggregate>>,
    /// The fields the batch path reads for them (see [`captured_fields`]).
    captured: Vec<String>,
    /// What the pane log did (durability `replicated`).
    pub replica: replica::PaneLogCounters,
}

impl Stages {
    /// The aggregates of `settings`, over events read as `format`.
    ///
    /// # Errors
    ///
    /// An aggregate's `when` that is not a usable condition.
    pub fn new(settings: &[AggregateSettings], format: &Format) -> Result<Self, String> {
        Ok(Self {
            aggregates: settings
                .iter()
                .map(|s| Aggregate::with_format(s.clone(), format.clone()).map(Arc::new))
                .collect::<Result<_, _>>()?,
            captured: captured_fields(settings),
            replica: replica::PaneLogCounters::default(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.aggregates.is_empty()
    }

    /// Feeds accepted `events` to every stage.
    pub fn observe(&self, events: &Accepted<'_>) {
        let events = *events;
        if self.aggregates.is_empty() {
            return;
        }
        let now = unix_ms();
        for agg in &self.aggregates {
            match events {
                Accepted::Lines { body, lines, seen } if !seen.is_empty() => {
                    let per_line = seen.len() / lines.len().max(1);
                    let events = lines
                        .iter()
                        .zip(seen.chunks_exact(per_line))
                        .map(|(r, seen)| (&body[r.clone()], seen));
                    agg.observe_seen(events, &self.captured, now);
                }
                _ => agg.observe(events.slices(), now),
            }
        }
    }

    /// Writes every pane to `path` (atomically: a temporary file renamed
    /// over it).
    ///
    /// # Errors
    ///
    /// If the file cannot be written.
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        let all: serde_json::Map<String, serde_json::Value> = self
            .aggregates
            .iter()
            .map(|a| (a.settings.name.clone(), a.snapshot()))
            .collect();
        let text = serde_json::json!({ "version": SNAPSHOT_VERSION, "aggregates": all }).to_string();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, path)
    }

    /// Puts back what [`Self::save`] wrote to `path`, if it exists; an
    /// aggregate whose settings changed starts empty (with a warning).
    /// Returns the panes restored.
    pub fn load(&self, path: &std::path::Path) -> usize {
        let Ok(text) = std::fs::read(path) else { return 0 };
        let snapshot: serde_json::Value = match serde_json::from_slice(&text) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(message = "Ignoring an unreadable aggregate snapshot.", path = %path.display(), error = %e);
                return 0;
            }
        };
        if snapshot["version"].as_u64() != Some(SNAPSHOT_VERSION) {
            tracing::warn!(message = "Ignoring an aggregate snapshot of another version.", path = %path.display());
            return 0;
        }
        let mut panes = 0;
        for a in &self.aggregates {
            let Some(taken) = snapshot["aggregates"].get(&a.settings.name) else {
                continue;
            };
            match a.restore(taken) {
                Ok(n) => panes += n,
                Err(e) => {
                    tracing::warn!(message = "Aggregate starts empty: its snapshot does not fit.", aggregate = %a.settings.name, error = %e)
                }
            }
        }
        panes
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
    /// The aggregate named `name`, if any.
    pub fn named(&self, name: &str) -> Option<&Arc<Aggregate>> {
        self.aggregates.iter().find(|a| a.settings.name == name)
    }

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
