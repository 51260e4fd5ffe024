//! `top(k)`: the items with the largest total of a non-negative weight,
//! by the Space-Saving summary (Metwally, Agrawal, El Abbadi 2005), in
//! its weighted and mergeable form (Agarwal et al., "Mergeable
//! Summaries", 2012).
//!
//! A summary keeps at most `m` counters, each an item with an estimated
//! total and the most that estimate may exceed the true total (`error`).
//! A weight for a monitored item adds to its counter; a new item takes a
//! free counter, or replaces the smallest one, inheriting its total as
//! both start and error. Two summaries merge by adding counters item by
//! item (an item a full summary lacks counts that summary's smallest
//! counter, as error too) and keeping the `m` largest.
//!
//! **The bound.** With `W` the total weight the summary has seen (over
//! every pane and node merged), every item's estimate is at least its true
//! total and at most `W / m` above it (its `error` says how much, for
//! that item); every item whose true total exceeds `W / m` is kept. So the
//! reported top `k` holds every item above `W / m`, each total within
//! `W / m`, in order up to that margin. `m` is ten times the largest `k`
//! an aggregate emits.

use std::collections::HashMap;

use serde_json::{Value, json};

/// One counter: an item's estimated total and how much it may overcount.
#[derive(Debug, Clone, PartialEq)]
pub struct Counter {
    pub item: Box<str>,
    pub total: f64,
    pub error: f64,
}

/// A Space-Saving summary of at most `capacity` counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopK {
    capacity: usize,
    counters: Vec<Counter>,
    /// Where each item's counter is.
    at: HashMap<Box<str>, usize, foldhash::fast::RandomState>,
    /// The weight seen: `W` of the bound.
    weight: f64,
}

impl TopK {
    /// An empty summary of `capacity` counters (0: keeps nothing).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The weight seen.
    pub fn weight(&self) -> f64 {
        self.weight
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    /// Bytes on the heap: the counters, the index, and the item names
    /// (twice: in both).
    pub fn heap_bytes(&self) -> usize {
        let names: usize = self.counters.iter().map(|c| c.item.len()).sum();
        self.counters.capacity() * std::mem::size_of::<Counter>()
            + self.at.capacity() * (std::mem::size_of::<(Box<str>, usize)>() + 1)
            + 2 * names
    }

    /// The most an estimate may exceed the true total: `W / m`.
    pub fn bound(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        self.weight / self.capacity as f64
    }

    /// Adds `weight` (finite, not negative) to `item`.
    pub fn add(&mut self, item: &str, weight: f64) {
        if self.capacity == 0 || !(weight >= 0.0 && weight.is_finite()) {
            return;
        }
        self.weight += weight;
        if let Some(&i) = self.at.get(item) {
            self.counters[i].total += weight;
            return;
        }
        if self.counters.len() < self.capacity {
            self.at.insert(item.into(), self.counters.len());
            self.counters.push(Counter {
                item: item.into(),
                total: weight,
                error: 0.0,
            });
            return;
        }
        let i = self.smallest();
        let old = std::mem::replace(
            &mut self.counters[i],
            Counter {
                item: item.into(),
                total: 0.0,
                error: 0.0,
            },
        );
        self.at.remove(&old.item);
        self.at.insert(item.into(), i);
        let c = &mut self.counters[i];
        c.total = old.total + weight;
        c.error = old.total;
    }

    fn smallest(&self) -> usize {
        let mut min = 0;
        for (i, c) in self.counters.iter().enumerate() {
            if c.total < self.counters[min].total {
                min = i;
            }
        }
        min
    }

    /// The smallest counter's total when full (what an item it lacks may
    /// have had), else 0.
    fn floor(&self) -> f64 {
        if self.counters.is_empty() || self.counters.len() < self.capacity {
            0.0
        } else {
            self.counters
                .iter()
                .map(|c| c.total)
                .fold(f64::INFINITY, f64::min)
        }
    }

    /// Adds everything `other` counted.
    pub fn merge(&mut self, other: &TopK) {
        if other.weight == 0.0 && other.counters.is_empty() {
            return;
        }
        if self.weight == 0.0 && self.counters.is_empty() && other.capacity >= self.capacity {
            // Into an empty summary (a fresh merge target): a copy.
            *self = other.clone();
            return;
        }
        let capacity = self.capacity.max(other.capacity);
        let (mine, theirs) = (self.floor(), other.floor());
        let mut all: HashMap<&str, Counter, foldhash::fast::RandomState> = HashMap::default();
        for c in &self.counters {
            all.insert(
                &c.item,
                Counter {
                    item: c.item.clone(),
                    total: c.total + theirs,
                    error: c.error + theirs,
                },
            );
        }
        for c in &other.counters {
            match all.get_mut(&*c.item) {
                Some(m) => {
                    // Both had it: neither floor applies.
                    m.total += c.total - theirs;
                    m.error += c.error - theirs;
                }
                None => {
                    all.insert(
                        &c.item,
                        Counter {
                            item: c.item.clone(),
                            total: c.total + mine,
                            error: c.error + mine,
                        },
                    );
                }
            }
        }
        let mut counters: Vec<Counter> = all.into_values().collect();
        counters.sort_by(|a, b| b.total.total_cmp(&a.total).then_with(|| a.item.cmp(&b.item)));
        counters.truncate(capacity);
        self.weight += other.weight;
        self.capacity = capacity;
        self.at = counters
            .iter()
            .enumerate()
            .map(|(i, c)| (c.item.clone(), i))
            .collect();
        self.counters = counters;
    }

    /// The `k` largest estimates, largest first (ties by item).
    pub fn top(&self, k: usize) -> Vec<Counter> {
        let mut all = self.counters.clone();
        all.sort_by(|a, b| b.total.total_cmp(&a.total).then_with(|| a.item.cmp(&b.item)));
        all.truncate(k);
        all
    }

    /// For the partial results nodes exchange and the snapshots.
    pub fn to_json(&self) -> Value {
        let items: Vec<Value> = self
            .counters
            .iter()
            .map(|c| json!([&*c.item, c.total, c.error]))
            .collect();
        json!({ "m": self.capacity, "w": self.weight, "c": items })
    }

    /// The inverse of [`Self::to_json`]; `None` if malformed.
    pub fn from_json(v: &Value) -> Option<Self> {
        let mut top = TopK::new(usize::try_from(v["m"].as_u64()?).ok()?);
        top.weight = v["w"].as_f64()?;
        for c in v["c"].as_array()? {
            let item: Box<str> = c[0].as_str()?.into();
            top.at.insert(item.clone(), top.counters.len());
            top.counters.push(Counter {
                item,
                total: c[1].as_f64()?,
                error: c[2].as_f64()?,
            });
        }
        (top.counters.len() <= top.capacity.max(1)).then_some(top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A skewed stream: item i has weight about 1/i (Zipf), over `n` items.
    fn stream(seed: u64, n: u64, len: usize) -> Vec<(String, f64)> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x % 1_000_000) as f64 / 1_000_000.0;
                let item = ((n as f64).powf(u) as u64).min(n - 1);
                (format!("p{item}"), 1.0 + (x >> 40) as f64 % 5.0)
            })
            .collect()
    }

    fn exact(events: &[(String, f64)]) -> HashMap<String, f64> {
        let mut totals = HashMap::new();
        for (item, w) in events {
            *totals.entry(item.clone()).or_insert(0.0) += w;
        }
        totals
    }

    /// The bound holds for one summary, and for merges of many (panes and
    /// nodes) in any grouping.
    #[test]
    fn estimates_stay_within_the_bound_alone_and_merged() {
        for seed in 1..20 {
            let events = stream(seed, 10_000, 20_000);
            let truth = exact(&events);
            let m = 100;
            let mut whole = TopK::new(m);
            let mut parts: Vec<TopK> = (0..7).map(|_| TopK::new(m)).collect();
            for (i, (item, w)) in events.iter().enumerate() {
                whole.add(item, *w);
                parts[i % 7].add(item, *w);
            }
            let mut merged = TopK::new(m);
            for p in &parts {
                merged.merge(p);
            }
            let w: f64 = events.iter().map(|(_, w)| w).sum();
            for s in [&whole, &merged] {
                assert!((s.weight() - w).abs() < 1e-6);
                let bound = s.bound();
                for c in &s.counters {
                    let t = truth.get(&*c.item).copied().unwrap_or(0.0);
                    assert!(c.total + 1e-9 >= t, "never under: {c:?} true {t}");
                    assert!(c.total - t <= c.error + 1e-9, "within its error: {c:?} true {t}");
                    assert!(c.error <= bound + 1e-9, "error {} over W/m {bound}", c.error);
                }
                // Every item above W/m is kept.
                for (item, t) in &truth {
                    if *t > bound {
                        assert!(
                            s.at.contains_key(item.as_str()),
                            "{item} ({t}) above {bound} lost"
                        );
                    }
                }
                // The reported top 10 are the true top 10 up to the bound.
                let mut true_order: Vec<(&String, &f64)> = truth.iter().collect();
                true_order.sort_by(|a, b| b.1.total_cmp(a.1));
                let tenth = *true_order[9].1;
                for c in s.top(10) {
                    assert!(
                        truth[&*c.item] >= tenth - 2.0 * bound,
                        "{c:?} is not near the top 10"
                    );
                }
            }
        }
    }

    #[test]
    fn small_streams_are_exact_and_json_round_trips() {
        let mut t = TopK::new(4);
        for (item, w) in [
            ("a", 3.0),
            ("b", 1.0),
            ("a", 2.0),
            ("c", 4.0),
            ("x", -1.0),
            ("y", f64::NAN),
        ] {
            t.add(item, w);
        }
        let top = t.top(2);
        assert_eq!((&*top[0].item, top[0].total, top[0].error), ("a", 5.0, 0.0));
        assert_eq!((&*top[1].item, top[1].total), ("c", 4.0));
        assert_eq!(t.weight(), 10.0, "negative and NaN weights are not counted");
        assert_eq!(TopK::from_json(&t.to_json()), Some(t.clone()));
        let mut empty = TopK::new(4);
        empty.merge(&t);
        assert_eq!(empty.top(3), t.top(3));
        // Into a summary that kept nothing (a fresh merge target).
        let mut fresh = TopK::default();
        fresh.merge(&t);
        fresh.merge(&TopK::default());
        assert_eq!(
            (fresh.top(3), fresh.capacity(), fresh.weight()),
            (t.top(3), 4, 10.0)
        );
        assert!(TopK::new(0).is_empty());
    }
}
