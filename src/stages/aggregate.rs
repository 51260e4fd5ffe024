//! Windowed count / sum / min / max and quantile sketches of a numeric
//! field, per group, in panes of event time.
//!
//! Each accepted event lands in the pane of its event time (or arrival
//! time). A pane takes events until `lateness` after its end (by the
//! arrival clock); a later event, or one more than `lateness` ahead of the
//! clock, is counted as out of time and dropped. Events out of order within
//! the lateness land in their own pane. Panes older than the longest window
//! a query may ask for (plus the lateness) are dropped.
//!
//! State is kept per node (over the shards it serves), not per shard: a
//! sketch per shard would multiply the memory of every group's panes by the
//! shard count (32). Nodes merge with each other: count, sum, min and max
//! exactly, sketches without loss.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};

use serde_json::{Value, json};

use crate::config::AggregateSettings;
use crate::engine::event::Seen;
use crate::engine::input::Format;
use crate::route::expr::{Condition, Input};
use crate::stages::fields::{self, Field, Found, Wanted};
use crate::stages::sketch::Sketch;
use crate::stages::topk::TopK;

/// What a pane holds.
#[derive(Debug, Clone)]
pub struct Summary {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub sketch: Sketch,
    /// The items with the largest totals of the value (`top(k)`); empty
    /// without an `item` field.
    pub top: TopK,
    /// Changed since the last checkpoint (see [`super::replica`]).
    changed: bool,
}

/// Equal when they hold the same: whether a checkpoint has seen them does
/// not count.
impl PartialEq for Summary {
    fn eq(&self, other: &Self) -> bool {
        (self.count, self.sum, self.min, self.max) == (other.count, other.sum, other.min, other.max)
            && self.sketch == other.sketch
            && self.top.top(usize::MAX) == other.top.top(usize::MAX)
            && self.top.weight() == other.top.weight()
    }
}

impl Summary {
    pub fn new(alpha: f64) -> Self {
        Self {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sketch: Sketch::new(alpha),
            top: TopK::default(),
            changed: false,
        }
    }

    fn add(&mut self, x: f64, item: Option<(&str, usize)>) {
        if let Some((item, counters)) = item {
            if self.top.capacity() == 0 {
                self.top = TopK::new(counters);
            }
            self.top.add(item, x);
        }
        self.changed = true;
        self.count += 1;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        self.sketch.add(x);
    }

    /// Adds everything `other` holds.
    pub fn merge(&mut self, other: &Summary) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sketch.merge(&other.sketch);
        self.top.merge(&other.top);
    }

    /// For the partial results nodes exchange.
    pub fn to_json(&self) -> Value {
        let finite = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
        let mut v = json!({
            "count": self.count,
            "sum": self.sum,
            "min": finite(self.min),
            "max": finite(self.max),
            "sketch": self.sketch.to_json(),
        });
        if self.top.capacity() > 0 {
            v["top"] = self.top.to_json();
        }
        v
    }

    /// The inverse of [`Self::to_json`]; `None` if malformed.
    pub fn from_json(v: &Value) -> Option<Self> {
        Some(Self {
            count: v["count"].as_u64()?,
            sum: v["sum"].as_f64()?,
            min: v["min"].as_f64().unwrap_or(f64::INFINITY),
            max: v["max"].as_f64().unwrap_or(f64::NEG_INFINITY),
            sketch: Sketch::from_json(&v["sketch"])?,
            top: match v.get("top") {
                Some(top) => TopK::from_json(top)?,
                None => TopK::default(),
            },
            changed: false,
        })
    }
}

/// Parts a pane's groups are split into when published (see
/// [`super::replica`]), so that one message stays well under a server's
/// payload limit.
pub const PARTS: u32 = 16;

/// The part of `group`: FNV-1a of its name, the same on every node and
/// build.
pub fn part_of(group: &str) -> u32 {
    let hash = group.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash % PARTS
}

/// Panes per block: a block caches the merge of its panes, so that a
/// query over an hour of 1 s panes merges about 60 blocks and the panes at
/// its two ends instead of 3 600 panes.
pub const BLOCK: u64 = 64;

/// One group's panes by index (event time / pane), and the merges of
/// whole blocks of them asked for since their panes last changed.
#[derive(Default)]
struct Panes {
    by_index: BTreeMap<u64, Summary>,
    /// Block index (pane / [`BLOCK`]) → the merge of its panes. Dropped
    /// when one of its panes changes.
    blocks: BTreeMap<u64, Summary>,
}

impl Panes {
    /// The pane `pane`, made if absent; its block's merge is dropped.
    fn pane_mut(&mut self, pane: u64, alpha: f64) -> &mut Summary {
        if self
            .blocks
            .last_key_value()
            .is_some_and(|(&last, _)| last >= pane / BLOCK)
        {
            self.blocks.remove(&(pane / BLOCK));
        }
        self.by_index.entry(pane).or_insert_with(|| Summary::new(alpha))
    }

    /// Adds `x` to pane `pane`, and to the counters of `item` (with the
    /// number of counters a pane keeps) for `top(k)`.
    fn add(&mut self, pane: u64, x: f64, item: Option<(&str, usize)>, alpha: f64) {
        // Most events fall in the newest pane, whose block is not cached
        // (a query caches whole blocks only, and the newest one is rarely
        // whole before it is written to again).
        if let Some(mut last) = self.by_index.last_entry()
            && *last.key() == pane
            && self
                .blocks
                .last_key_value()
                .is_none_or(|(&b, _)| b < pane / BLOCK)
        {
            last.get_mut().add(x, item);
            return;
        }
        self.pane_mut(pane, alpha).add(x, item);
    }

    /// Panes `[first, end)` merged into `out`: whole blocks from their
    /// cached merge (made now if absent), the rest pane by pane.
    fn merge_into(&mut self, first: u64, end: u64, alpha: f64, out: &mut Summary) {
        let mut i = first;
        while i < end {
            // Over the gaps: to the block of the next pane there is.
            match self.by_index.range(i..end).next() {
                Some((&next, _)) => i = i.max(next - next % BLOCK),
                None => break,
            }
            let block = i / BLOCK;
            let block_end = (block + 1) * BLOCK;
            if i.is_multiple_of(BLOCK) && block_end <= end {
                let by_index = &self.by_index;
                let merged = self.blocks.entry(block).or_insert_with(|| {
                    let mut m = Summary::new(alpha);
                    for (_, pane) in by_index.range(i..block_end) {
                        m.merge(pane);
                    }
                    m
                });
                out.merge(merged);
                i = block_end;
                continue;
            }
            let stop = block_end.min(end);
            for (_, pane) in self.by_index.range(i..stop) {
                out.merge(pane);
            }
            i = stop;
        }
    }

    /// Drops the panes before `oldest`, and the blocks they were in.
    fn evict(&mut self, oldest: u64) {
        self.by_index = self.by_index.split_off(&oldest);
        self.blocks = self.blocks.split_off(&oldest.div_ceil(BLOCK));
    }
}

/// The panes of each group (foldhash: looked up for every event).
type Groups = HashMap<String, Panes, foldhash::fast::RandomState>;

/// Events an aggregate took, and why it left others out.
#[derive(Debug, Default)]
pub struct AggregateCounters {
    pub added: AtomicU64,
    /// Later than the lateness allows, or too far ahead of the clock.
    pub out_of_time: AtomicU64,
    /// No group text, no numeric value, or no numeric time.
    pub skipped: AtomicU64,
    /// Not matched by `when`.
    pub filtered: AtomicU64,
}

/// One aggregate's state: the panes of every group, over the shards this
/// node serves.
pub struct Aggregate {
    pub settings: AggregateSettings,
    groups: Mutex<Groups>,
    pub counters: AggregateCounters,
    format: Format,
    /// `when`, and the fields its compiled form reads.
    when: Option<(Condition, Vec<String>)>,
}

impl Aggregate {
    /// An aggregate over JSON events.
    ///
    /// # Panics
    ///
    /// If its `when` is not a usable condition (tests only).
    pub fn new(settings: AggregateSettings) -> Self {
        Self::with_format(settings, Format::Json).expect("a usable condition")
    }

    /// An aggregate over events read as `format`.
    ///
    /// # Errors
    ///
    /// Its `when` is not a usable condition.
    pub fn with_format(settings: AggregateSettings, format: Format) -> Result<Self, String> {
        let when = match settings.when.trim() {
            "" => None,
            source => {
                let mut fields = Vec::new();
                let condition = Condition::parse(source, &mut fields)
                    .map_err(|e| format!("aggregate {:?} when: {e}", settings.name))?;
                Some((condition, fields))
            }
        };
        Ok(Self {
            when,
            settings,
            format,
            groups: Mutex::default(),
            counters: AggregateCounters::default(),
        })
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, Groups> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wanted(&self) -> Wanted<'_> {
        let s = &self.settings;
        Wanted {
            group: &s.group,
            value: &s.value,
            time: &s.time,
            item: &s.item,
        }
    }

    /// Adds the accepted `events`, arrived at `now_ms`.
    pub fn observe<'a>(&self, events: impl Iterator<Item = &'a [u8]>, now_ms: u64) {
        let wanted = self.wanted();
        let format = &self.format;
        let events = events.filter(|e| self.takes(e));
        self.add_found(events.map(|e| fields::read(format, e, wanted)), now_ms);
    }

    /// Whether `event` is one `when` takes (all are without one).
    fn takes(&self, event: &[u8]) -> bool {
        let Some((condition, fields)) = &self.when else {
            return true;
        };
        let mut seen = vec![Seen::Missing; fields.len()];
        let taken = self.format.capture(event, fields, &mut seen)
            && condition
                .eval(&Input {
                    event,
                    key: "",
                    shard: 0,
                    subject: "",
                    seen: &seen,
                    format: &self.format,
                })
                .unwrap_or(false);
        if !taken {
            self.counters.filtered.fetch_add(1, Relaxed);
        }
        taken
    }

    /// Adds accepted `events` whose fields were read with their keys:
    /// each with its [`Seen`] fields, in the order of `names` (see
    /// [`crate::config::captured_fields`]).
    pub fn observe_seen<'a>(
        &self,
        events: impl Iterator<Item = (&'a [u8], &'a [Seen])>,
        names: &[String],
        now_ms: u64,
    ) {
        let s = &self.settings;
        let at = |name: &str| names.iter().position(|n| n == name);
        let (Some(g), Some(v)) = (at(&s.group), at(&s.value)) else {
            return self.observe(events.map(|(e, _)| e), now_ms);
        };
        let t = at(&s.time).unwrap_or(0);
        let i = at(&s.item).unwrap_or(0);
        let wanted = self.wanted();
        let format = &self.format;
        let found = events
            .filter(|(event, _)| self.takes(event))
            .map(move |(event, seen)| Some(fields::found(format, event, seen, [g, v, t, i], wanted)));
        self.add_found(found, now_ms);
    }

    /// Adds the events whose fields are `found` (`None`: not an object).
    fn add_found<'a>(&self, found: impl Iterator<Item = Option<Found<'a>>>, now_ms: u64) {
        let s = &self.settings;
        let (mut late, mut skipped) = (0, 0);
        // Read outside the lock; the group names stay borrowed.
        let mut read = Vec::with_capacity(found.size_hint().0);
        for found in found {
            let Some(found) = found else {
                skipped += 1;
                continue;
            };
            let time_ms = match (s.time.is_empty(), &found.time) {
                (true, _) => Some(now_ms),
                (false, Field::Found(t)) if t.is_finite() && *t >= 0.0 => {
                    Some((t * s.time_unit_ms as f64) as u64)
                }
                _ => None,
            };
            let (Field::Found(group), Field::Found(value), Some(t)) = (found.group, found.value, time_ms)
            else {
                skipped += 1;
                continue;
            };
            if !value.is_finite() {
                skipped += 1;
                continue;
            }
            let pane = t / s.pane_ms;
            if (pane + 1) * s.pane_ms + s.lateness_ms <= now_ms || t > now_ms + s.lateness_ms {
                late += 1;
                continue;
            }
            let item = match found.item {
                Field::Found(item) if s.top_counters > 0 => Some(item),
                _ => None,
            };
            read.push((group, value, pane, item));
        }
        let added = read.len() as u64;
        if !read.is_empty() {
            let mut groups = self.groups();
            for (group, value, pane, item) in read {
                // Looked up borrowed; a new group's name is copied once.
                let panes = match groups.get_mut(group.as_ref()) {
                    Some(panes) => panes,
                    None => groups.entry(group.into_owned()).or_default(),
                };
                let item = item.as_deref().map(|i| (i, s.top_counters));
                panes.add(pane, value, item, s.alpha);
            }
        }
        let c = &self.counters;
        for (counter, n) in [(&c.added, added), (&c.out_of_time, late), (&c.skipped, skipped)] {
            if n > 0 {
                counter.fetch_add(n, Relaxed);
            }
        }
    }

    /// Drops panes that no query can reach any more.
    pub fn evict(&self, now_ms: u64) {
        let s = &self.settings;
        let oldest = now_ms.saturating_sub(s.max_window_ms + s.lateness_ms + s.pane_ms) / s.pane_ms;
        self.groups().retain(|_, panes| {
            panes.evict(oldest);
            !panes.by_index.is_empty()
        });
    }

    /// The panes `[start_ms, end_ms)` (aligned to panes) of `group`, merged.
    pub fn summary(&self, group: &str, start_ms: u64, end_ms: u64) -> Summary {
        let p = self.settings.pane_ms;
        let mut out = Summary::new(self.settings.alpha);
        if let Some(panes) = self.groups().get_mut(group) {
            panes.merge_into(start_ms / p, end_ms.div_ceil(p), self.settings.alpha, &mut out);
        }
        out
    }

    /// Every group with a pane in `[start_ms, end_ms)`, each with an empty
    /// summary: the names alone, without merging anything.
    pub fn groups_in(&self, start_ms: u64, end_ms: u64) -> HashMap<String, Summary> {
        let p = self.settings.pane_ms;
        let range = start_ms / p..end_ms.div_ceil(p);
        self.groups()
            .iter()
            .filter(|(_, panes)| panes.by_index.range(range.clone()).next().is_some())
            .map(|(group, _)| (group.clone(), Summary::new(self.settings.alpha)))
            .collect()
    }

    /// Every group with panes in `[start_ms, end_ms)`, merged per group.
    pub fn summaries(&self, start_ms: u64, end_ms: u64) -> HashMap<String, Summary> {
        let p = self.settings.pane_ms;
        let mut out = HashMap::new();
        for (group, panes) in self.groups().iter_mut() {
            let mut merged = Summary::new(self.settings.alpha);
            panes.merge_into(start_ms / p, end_ms.div_ceil(p), self.settings.alpha, &mut merged);
            if merged.count > 0 {
                out.insert(group.clone(), merged);
            }
        }
        out
    }

    /// Every pane, for a snapshot:
    /// `{"pane_ms", "alpha", "groups": {"<group>": {"<pane>": summary}}}`.
    pub fn snapshot(&self) -> Value {
        // A block of one group's panes at a time under the lock, so that
        // queries and new events wait for [`BLOCK`] panes at most.
        let names: Vec<String> = self.groups().keys().cloned().collect();
        let mut groups = serde_json::Map::new();
        for name in names {
            let mut out = serde_json::Map::new();
            let mut from = 0;
            loop {
                let held = self.groups();
                let Some(panes) = held.get(&name) else { break };
                let chunk: Vec<(String, Value)> = panes
                    .by_index
                    .range(from..)
                    .take(BLOCK as usize)
                    .map(|(p, s)| (p.to_string(), s.to_json()))
                    .collect();
                let Some(last) = panes.by_index.range(from..).nth(chunk.len().saturating_sub(1)) else {
                    break;
                };
                from = *last.0 + 1;
                drop(held);
                let full = chunk.len() == BLOCK as usize;
                out.extend(chunk);
                if !full {
                    break;
                }
            }
            groups.insert(name, Value::Object(out));
        }
        json!({ "pane_ms": self.settings.pane_ms, "alpha": self.settings.alpha, "groups": groups })
    }

    /// Puts back the panes of a [`Self::snapshot`] in place of what it
    /// held; returns how many panes.
    ///
    /// # Errors
    ///
    /// If it was taken with another pane size or accuracy, or is malformed.
    pub fn restore(&self, snapshot: &Value) -> Result<usize, String> {
        let s = &self.settings;
        if snapshot["pane_ms"].as_u64() != Some(s.pane_ms) || snapshot["alpha"].as_f64() != Some(s.alpha) {
            return Err("taken with another pane or accuracy".into());
        }
        let mut state = Groups::default();
        let mut count = 0;
        for (group, panes) in snapshot["groups"].as_object().ok_or("no groups")? {
            let mut out = Panes::default();
            for (pane, summary) in panes.as_object().ok_or("bad panes")? {
                let pane: u64 = pane.parse().map_err(|_| "bad pane")?;
                out.by_index
                    .insert(pane, Summary::from_json(summary).ok_or("bad summary")?);
            }
            count += out.by_index.len();
            state.insert(group.clone(), out);
        }
        *self.groups() = state;
        Ok(count)
    }

    /// The panes of every group that changed since the last call (every
    /// pane when `all`), with their change marks cleared, as whole parts:
    /// `(pane, part) → [(group, summary)]` with every group of the part
    /// that has the pane, changed or not, so that a part's message
    /// replaces the one before it. Only panes from `from_pane` on are
    /// looked at unless `all` (older ones no longer take events).
    pub fn changed(&self, all: bool, from_pane: u64) -> BTreeMap<(u64, u32), Vec<(String, Summary)>> {
        let from = if all { 0 } else { from_pane };
        // One group at a time under the lock, as for snapshots.
        let names: Vec<String> = self.groups().keys().cloned().collect();
        let mut touched = std::collections::BTreeSet::new();
        for name in &names {
            let mut held = self.groups();
            let Some(panes) = held.get_mut(name) else { continue };
            let part = part_of(name);
            for (&pane, summary) in panes.by_index.range_mut(from..) {
                if std::mem::take(&mut summary.changed) || all {
                    touched.insert((pane, part));
                }
            }
        }
        let mut out: BTreeMap<(u64, u32), Vec<(String, Summary)>> = BTreeMap::new();
        if touched.is_empty() {
            return out;
        }
        for name in names {
            let part = part_of(&name);
            let held = self.groups();
            let Some(panes) = held.get(&name) else { continue };
            for &(pane, _) in touched.iter().filter(|(_, p)| *p == part) {
                if let Some(summary) = panes.by_index.get(&pane) {
                    out.entry((pane, part))
                        .or_default()
                        .push((name.clone(), summary.clone()));
                }
            }
        }
        out
    }

    /// Adds `summary` to `group`'s pane `pane`; marked changed when `mark`
    /// (it is to be published again).
    pub fn absorb(&self, group: &str, pane: u64, summary: &Summary, mark: bool) {
        let mut groups = self.groups();
        let panes = match groups.get_mut(group) {
            Some(panes) => panes,
            None => groups.entry(group.to_owned()).or_default(),
        };
        let held = panes.pane_mut(pane, self.settings.alpha);
        held.merge(summary);
        held.changed |= mark;
    }

    /// Drops every pane.
    pub fn clear(&self) {
        self.groups().clear();
    }

    /// Bytes the panes take (and the blocks' cached merges): the summaries, their sketches' buckets and the
    /// maps' nodes (estimated at two words per entry).
    pub fn memory_bytes(&self) -> usize {
        let pane =
            std::mem::size_of::<Summary>() + std::mem::size_of::<u64>() + 2 * std::mem::size_of::<usize>();
        self.groups()
            .iter()
            .map(|(g, panes)| {
                g.len()
                    + panes
                        .by_index
                        .values()
                        .chain(panes.blocks.values())
                        .map(|s| pane + s.sketch.heap_bytes() + s.top.heap_bytes())
                        .sum::<usize>()
            })
            .sum()
    }

    /// Panes held, over every group (for memory figures).
    pub fn panes(&self) -> usize {
        self.groups().values().map(|p| p.by_index.len()).sum()
    }

    /// The pane-aligned bounds of "the last `window_ms`" at `now_ms`: up to
    /// the end of the current pane.
    pub fn last(&self, window_ms: u64, now_ms: u64) -> (u64, u64) {
        let p = self.settings.pane_ms;
        let end = (now_ms / p + 1) * p;
        (end.saturating_sub(window_ms.div_ceil(p) * p), end)
    }

    /// `[start_ms, end_ms)` widened to whole panes.
    pub fn aligned(&self, start_ms: u64, end_ms: u64) -> (u64, u64) {
        let p = self.settings.pane_ms;
        (start_ms / p * p, end_ms.div_ceil(p) * p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults: 1 s panes, 1 h, 5 s lateness, 1 %.
    fn settings() -> AggregateSettings {
        crate::config::AggregateConfig {
            group: "metric_name".into(),
            value: "metric_value".into(),
            time: "timestamp".into(),
            ..Default::default()
        }
        .validate(0)
        .unwrap()
    }

    fn event(group: &str, value: f64, t: u64) -> Vec<u8> {
        Vec::from(format!(
            r#"{{"event_id":"e{t}","metric_name":"{group}","metric_value":{value},"timestamp":{t}}}"#
        ))
    }

    #[test]
    fn fields_read_with_the_key_count_as_the_stage_reading_them_itself() {
        use crate::engine::{Deduplicator, EngineConfig, batch, batch::Route};
        let settings = settings();
        let names = crate::config::captured_fields(std::slice::from_ref(&settings));
        let dedup = Deduplicator::new(EngineConfig {
            capture: names.clone(),
            ..EngineConfig::default()
        });
        let now = 1_000_000_000u64;
        let t = now / 1000;
        let lines = [
            format!(r#"{{"event_id":"a1","metric_name":"temp","metric_value":10,"timestamp":{t}}}"#),
            format!(r#"{{"timestamp":{t},"metric_value":-2.5e1,"event_id":"a2","metric_name":"temp"}}"#),
            format!(r#"{{"event_id":"a3","metric_name":"t\u00e9mp","metric_value":1,"timestamp":{t}}}"#),
            format!(r#"{{"event_id":"a4","metric_name":"temp","metric_value":"7","timestamp":{t}}}"#),
            format!(r#"{{"event_id":"a5","metric_name":["x"],"metric_value":7,"timestamp":{t}}}"#),
            format!(r#"{{"event_id":"a6","metric_value":7,"timestamp":{t}}}"#),
            format!(
                r#"{{"event_id":"a7","metric_name":"hum","metric_value":3,"metric_value":4,"timestamp":{t}}}"#
            ),
            format!(r#"{{"event_id":"a8","metric_name":"hum","metric_value":1e400,"timestamp":{t}}}"#),
            format!(
                r#"{{"event_id":"a9","nested":{{"metric_name":"no"}},"metric_name":"hum","metric_value":5,"timestamp":{}}}"#,
                t - 60
            ),
            format!(r#"{{"event_id":"b1","metric_name":"hum","metric_value":6,"timestamp":"{t}"}}"#),
        ];
        let body = lines.join("\n");
        let d = batch::decide(&dedup, body.as_bytes(), now, false, |_| Route::Here);
        assert_eq!(d.seen.len(), lines.len() * names.len(), "read with the keys");
        let (with_keys, by_itself) = (Aggregate::new(settings.clone()), Aggregate::new(settings));
        let per_line = names.len();
        with_keys.observe_seen(
            d.lines
                .iter()
                .zip(d.seen.chunks_exact(per_line))
                .map(|(r, seen)| (&body.as_bytes()[r.clone()], seen)),
            &names,
            now,
        );
        by_itself.observe(d.lines.iter().map(|r| &body.as_bytes()[r.clone()]), now);
        for group in ["temp", "t\u{e9}mp", "hum"] {
            let (a, b) = (
                with_keys.summary(group, 0, u64::MAX / 2),
                by_itself.summary(group, 0, u64::MAX / 2),
            );
            assert!(a.count > 0, "{group}");
            assert_eq!(a, b, "{group}");
        }
        let counts = |a: &Aggregate| {
            let c = &a.counters;
            (
                c.added.load(Relaxed),
                c.out_of_time.load(Relaxed),
                c.skipped.load(Relaxed),
            )
        };
        assert_eq!(counts(&with_keys), counts(&by_itself));
        assert_eq!(counts(&with_keys), (4, 1, 5));
    }

    /// The panes `[first, end)` merged one by one, without the blocks.
    fn naive(panes: &Panes, first: u64, end: u64) -> Summary {
        let mut out = Summary::new(0.01);
        for (_, pane) in panes.by_index.range(first..end) {
            out.merge(pane);
        }
        out
    }

    #[test]
    fn merges_through_cached_blocks_equal_pane_by_pane_merges_after_any_change() {
        let mut panes = Panes::default();
        let mut x = 0x9e37_79b9_u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for pane in 0..1000 {
            for _ in 0..3 {
                panes.add(pane, (next() % 1000) as f64 - 200.0, None, 0.01);
            }
        }
        for round in 0..300 {
            let first = next() % 1100;
            let end = first + next() % 700;
            let mut got = Summary::new(0.01);
            panes.merge_into(first, end, 0.01, &mut got);
            assert_eq!(got, naive(&panes, first, end), "round {round}: {first}..{end}");
            // Changes anywhere, in cached blocks too: a late event, the
            // newest pane, panes merged in from another node, eviction.
            match round % 4 {
                0 => panes.add(next() % 1000, 7.0, None, 0.01),
                1 => panes.add(999, -3.5, None, 0.01),
                2 => {
                    let mut other = Summary::new(0.01);
                    other.add(123.0, None);
                    panes.pane_mut(next() % 1000, 0.01).merge(&other);
                }
                _ => panes.evict(round / 4),
            }
        }
        assert!(!panes.blocks.is_empty(), "blocks were cached");
    }

    #[test]
    fn a_snapshot_taken_a_block_at_a_time_holds_every_pane() {
        let mut settings = settings();
        settings.lateness_ms = 3_600_000;
        let agg = Aggregate::new(settings.clone());
        let now = 1_000_000_000;
        let events: Vec<Vec<u8>> = (0..300)
            .map(|i| {
                event(
                    if i % 2 == 0 { "a" } else { "b" },
                    f64::from(i),
                    now / 1000 - u64::from(i as u32),
                )
            })
            .collect();
        agg.observe(events.iter().map(Vec::as_slice), now);
        let again = Aggregate::new(settings);
        assert_eq!(again.restore(&agg.snapshot()), Ok(300));
        for group in ["a", "b"] {
            assert_eq!(
                again.summary(group, 0, u64::MAX / 2),
                agg.summary(group, 0, u64::MAX / 2)
            );
        }
    }

    #[test]
    fn panes_by_event_time_lateness_snapshot_and_eviction() {
        let agg = Aggregate::new(settings());
        let now = 1_000_000_000; // ms
        let t = now / 1000;
        let observe = |events: &[Vec<u8>]| agg.observe(events.iter().map(Vec::as_slice), now);
        observe(&[event("temp", 10.0, t), event("temp", 40.0, t - 3)]);
        observe(&[event("temp", 25.0, t - 1), event("hum", 1.0, t)]);
        // 20 s old with 5 s lateness: dropped; not a number: skipped.
        observe(&[event("temp", 99.0, t - 20)]);
        observe(&[br#"{"metric_name":"temp","metric_value":"x","timestamp":1}"#.to_vec()]);
        assert_eq!(agg.counters.out_of_time.load(Relaxed), 1);
        assert_eq!(agg.counters.skipped.load(Relaxed), 1);

        let (start, end) = agg.last(60_000, now);
        assert_eq!((start, end), (now + 1000 - 60_000, now + 1000));
        let s = agg.summary("temp", start, end);
        assert_eq!((s.count, s.sum, s.min, s.max), (3, 75.0, 10.0, 40.0));
        // Only the last 2 s of panes.
        let (start, end) = agg.last(2000, now);
        assert_eq!(agg.summary("temp", start, end).count, 2);
        assert_eq!(agg.summary("nothing", start, end).count, 0);
        let all = agg.summaries(0, u64::MAX / 2);
        assert_eq!(all.len(), 2);
        // A snapshot puts back what was there.
        let again = Aggregate::new(settings());
        assert_eq!(again.restore(&agg.snapshot()), Ok(4));
        assert_eq!(
            again.summary("temp", 0, u64::MAX / 2),
            agg.summary("temp", 0, u64::MAX / 2)
        );
        // Eviction keeps what a query can reach.
        agg.evict(now);
        assert_eq!(agg.panes(), 4);
        agg.evict(now + 3_700_000);
        assert_eq!(agg.panes(), 0);
    }
}
