//! The medians an aggregate publishes against an exact computation: 10⁶
//! generated events from simulated nodes (uniform, skewed, negative,
//! bimodal, mixed-sign and zero-heavy values), arriving out of order, some
//! late and some twice; duplicates go through the real deduplicator as in
//! the sidecar. Over 2 000 emissions per category (every 0.5 s of a
//! 1 000 s run, a 5 s window each) the published median must be within the
//! stated bound (relative accuracy α = 1 %) of the exact lower median, and
//! count, min and max must be exact. The largest relative error seen is
//! printed.

use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use eventsieve::config::AggregateConfig;
use eventsieve::config::AggregateSettings;
use eventsieve::engine::{Deduplicator, EngineConfig};
use eventsieve::stages::Aggregate;

/// xorshift64*: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

const CATEGORIES: [&str; 6] = ["uniform", "skewed", "negative", "bimodal", "mixed", "zeros"];

fn value(category: usize, rng: &mut Rng) -> f64 {
    match category {
        0 => rng.unit() * 100.0,
        1 => (rng.normal() * 2.0).exp(),
        2 => -1.0 - rng.unit() * 999.0,
        3 if rng.unit() < 0.5 => 10.0 + rng.normal(),
        3 => 1000.0 + rng.normal() * 50.0,
        4 => rng.normal() * 50.0,
        _ if rng.unit() < 0.6 => 0.0,
        _ => rng.unit() * 10.0,
    }
}

/// One accepted, on-time event: when it happened, when it arrived, its value.
#[derive(Clone, Copy)]
struct Seen {
    time_ms: u64,
    arrival_ms: u64,
    value: f64,
}

#[test]
fn published_medians_are_within_the_bound_of_the_exact_ones() {
    let settings = AggregateConfig {
        group: "category".into(),
        value: "value".into(),
        time: "ts".into(),
        time_unit: "ms".into(),
        pane: "500ms".into(),
        max_window: "60s".into(),
        emit_every: "500ms".into(),
        ..AggregateConfig::default()
    }
    .validate(0)
    .unwrap();
    let shards = 8;
    let agg = Aggregate::new(settings.clone());
    let dedup = Deduplicator::new(EngineConfig {
        window_ms: 3_600_000,
        shards,
        segments_per_shard: 16,
        ..EngineConfig::default()
    });
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let start_ms: u64 = 1_700_000_000_000;
    let events = 1_000_000u64;
    let per_ms = 1; // 1 000 events per simulated second over 1 000 s
    let mut exact: Vec<Vec<Seen>> = vec![Vec::new(); CATEGORIES.len()];
    let (mut late, mut repeats) = (0u64, 0u64);
    let mut sent: Vec<Bytes> = Vec::new();
    let mut emissions = 0u64;
    let mut worst: f64 = 0.0;
    let mut next_emit = start_ms + 500;
    for i in 0..events {
        let arrival = start_ms + i / per_ms;
        // Emit for every half second passed, before what arrives after it.
        while next_emit <= arrival {
            emissions += emit(&agg, &settings, next_emit, &mut exact, &mut worst);
            next_emit += 500;
        }
        // 5 % repeats of an event sent lately: the deduplicator drops them.
        let event = if !sent.is_empty() && rng.unit() < 0.05 {
            repeats += 1;
            sent[(rng.next() % sent.len() as u64) as usize].clone()
        } else {
            let category = (rng.next() % CATEGORIES.len() as u64) as usize;
            let is_late = rng.unit() < 0.01;
            // Up to 3 s out of order; 1 % are 20–30 s late.
            let delay = if is_late {
                20_000 + rng.next() % 10_000
            } else {
                rng.next() % 3000
            };
            let time_ms = arrival.saturating_sub(delay);
            let v = value(category, &mut rng);
            let e = Bytes::from(format!(
                r#"{{"event_id":"n{}e{i}","category":"{}","value":{v:?},"ts":{time_ms}}}"#,
                i % 97,
                CATEGORIES[category]
            ));
            if is_late {
                late += 1;
            } else {
                exact[category].push(Seen {
                    time_ms,
                    arrival_ms: arrival,
                    value: v,
                });
            }
            if sent.len() < 4096 {
                sent.push(e.clone());
            } else {
                let k = (rng.next() % 4096) as usize;
                sent[k] = e.clone();
            }
            e
        };
        let keyed = dedup.key(&event).expect("valid event");
        if dedup.check_and_insert(&keyed, arrival).is_new() {
            agg.observe(std::iter::once(&event[..]), arrival);
        }
    }
    assert!(repeats > 40_000);
    assert_eq!(
        agg.counters.out_of_time.load(Relaxed),
        late,
        "every late event and only those dropped"
    );
    assert_eq!(agg.counters.skipped.load(Relaxed), 0);
    eprintln!(
        "{events} events, {repeats} repeats dropped by the deduplicator, {late} late; {emissions} (category, emission) medians; \
         largest relative error {:.5} % (bound {} %)",
        worst * 100.0,
        settings.alpha * 100.0
    );
    assert!(emissions >= 1000 * CATEGORIES.len() as u64);
    assert!(worst <= settings.alpha + 1e-12, "largest relative error {worst}");
}

/// Checks every category's median at `now_ms` against the exact one;
/// returns how many medians were checked and keeps the largest error.
fn emit(
    agg: &Aggregate,
    s: &AggregateSettings,
    now_ms: u64,
    exact: &mut [Vec<Seen>],
    worst: &mut f64,
) -> u64 {
    let (start, end) = agg.last(s.emit_window_ms, now_ms);
    let published = agg.summaries(start, end);
    let mut checked = 0;
    for (c, seen) in exact.iter_mut().enumerate() {
        // Events too old for any later window are no longer needed.
        seen.retain(|e| e.time_ms + 10_000 >= start);
        let mut values: Vec<f64> = seen
            .iter()
            .filter(|e| e.time_ms >= start && e.time_ms < end && e.arrival_ms <= now_ms)
            .map(|e| e.value)
            .collect();
        let Some(summary) = published.get(CATEGORIES[c]) else {
            assert!(values.is_empty(), "{} missing at {now_ms}", CATEGORIES[c]);
            continue;
        };
        values.sort_by(f64::total_cmp);
        assert_eq!(summary.count, values.len() as u64, "count of {}", CATEGORIES[c]);
        assert_eq!(summary.min, values[0]);
        assert_eq!(summary.max, values[values.len() - 1]);
        let want = values[(values.len() - 1) / 2];
        let got = summary.sketch.quantile(0.5).unwrap();
        let error = if want == 0.0 {
            assert_eq!(got, 0.0, "{} median of zeros", CATEGORIES[c]);
            0.0
        } else {
            (got - want).abs() / want.abs()
        };
        *worst = worst.max(error);
        checked += 1;
    }
    checked
}

/// One accepted event on time, for the exact recomputation.
struct Sale {
    time_ms: u64,
    arrival_ms: u64,
    category: usize,
    item: u32,
    amount: u64,
}

/// The moving averages and `top(10)` an aggregate emits against exact
/// recomputation: 10⁶ sales of 10⁴ products (a few sell often) in five
/// categories, up to 3 s out of order, 1 % too late (40–50 s, beyond the
/// 5 s lateness), 5 % sent twice through the real deduplicator. Every 5 s
/// of a 1 000 s run, over the last 60 s: count, sum and so the mean exact
/// (whole amounts: their float sums are exact in any order), and each of
/// the top 10 within the Space-Saving bound of its true total, never
/// under it, with every product above the bound kept and every product
/// whose true total beats the tenth reported one reported.
#[test]
fn moving_averages_are_exact_and_top_items_within_their_bound() {
    let settings = AggregateConfig {
        group: "category".into(),
        value: "amount".into(),
        time: "ts".into(),
        time_unit: "ms".into(),
        item: "product".into(),
        pane: "1s".into(),
        max_window: "5m".into(),
        emit: vec![eventsieve::config::EmitConfig {
            stat: "top(10)".into(),
            window: "60s".into(),
            every: "5s".into(),
            subject: "stats.top.{group}".into(),
        }],
        ..AggregateConfig::default()
    }
    .validate(0)
    .unwrap();
    assert_eq!(settings.top_counters, 100);
    let agg = Aggregate::new(settings.clone());
    let dedup = Deduplicator::new(EngineConfig {
        window_ms: 3_600_000,
        shards: 8,
        segments_per_shard: 16,
        ..EngineConfig::default()
    });
    let categories = 5;
    let mut rng = Rng(0x5eed_0000_7070_0002);
    let start_ms: u64 = 1_700_000_000_000;
    let events = 1_000_000u64;
    let mut exact: Vec<Sale> = Vec::new();
    let mut sent: Vec<Bytes> = Vec::new();
    let (mut late, mut repeats, mut checked, mut worst_error) = (0u64, 0u64, 0u64, 0.0f64);
    let mut next_emit = start_ms + 5000;
    for i in 0..events {
        let arrival = start_ms + i;
        while next_emit <= arrival {
            let (start, end) = agg.last(60_000, next_emit);
            let published = agg.summaries(start, end);
            exact.retain(|s| s.time_ms + 70_000 >= start);
            for c in 0..categories {
                let group = format!("c{c}");
                let sales: Vec<&Sale> = exact
                    .iter()
                    .filter(|s| {
                        s.category == c && s.time_ms >= start && s.time_ms < end && s.arrival_ms <= next_emit
                    })
                    .collect();
                let Some(summary) = published.get(&group) else {
                    assert!(sales.is_empty(), "{group} missing");
                    continue;
                };
                let sum: u64 = sales.iter().map(|s| s.amount).sum();
                assert_eq!(summary.count, sales.len() as u64, "count of {group}");
                assert_eq!(summary.sum, sum as f64, "sum of {group}: the mean is exact");
                let mut totals = std::collections::HashMap::new();
                for s in &sales {
                    *totals.entry(format!("p{}", s.item)).or_insert(0u64) += s.amount;
                }
                let top = &summary.top;
                assert_eq!(top.weight(), sum as f64);
                let bound = top.bound();
                let reported = top.top(10);
                for counter in &reported {
                    let truth = totals.get(&*counter.item).copied().unwrap_or(0) as f64;
                    assert!(counter.total >= truth, "{counter:?} under {truth}");
                    assert!(counter.total - truth <= counter.error && counter.error <= bound + 1e-9);
                    worst_error = worst_error.max((counter.total - truth) / bound.max(1e-9));
                }
                let kept: std::collections::HashSet<String> = top
                    .top(usize::MAX)
                    .into_iter()
                    .map(|c| c.item.to_string())
                    .collect();
                let tenth = reported.last().map_or(0.0, |c| c.total);
                for (item, &t) in &totals {
                    if t as f64 > bound {
                        assert!(
                            kept.contains(item),
                            "{item} ({t}) above the bound {bound} not kept"
                        );
                    }
                    if t as f64 > tenth {
                        assert!(
                            reported.iter().any(|c| *c.item == **item),
                            "{item} ({t}) beats the tenth ({tenth})"
                        );
                    }
                }
                checked += 1;
            }
            next_emit += 5000;
        }
        let event = if !sent.is_empty() && rng.unit() < 0.05 {
            repeats += 1;
            sent[(rng.next() % sent.len() as u64) as usize].clone()
        } else {
            let category = (rng.next() % categories as u64) as usize;
            let is_late = rng.unit() < 0.01;
            let delay = if is_late {
                40_000 + rng.next() % 10_000
            } else {
                rng.next() % 3000
            };
            let time_ms = arrival.saturating_sub(delay);
            let item = (10_000f64.powf(rng.unit()) as u32).min(9_999);
            let amount = 1 + rng.next() % 300;
            let e = Bytes::from(format!(
                r#"{{"event_id":"s{i}","category":"c{category}","product":"p{item}","amount":{amount},"ts":{time_ms}}}"#
            ));
            if is_late {
                late += 1;
            } else {
                exact.push(Sale {
                    time_ms,
                    arrival_ms: arrival,
                    category,
                    item,
                    amount,
                });
            }
            if sent.len() < 4096 {
                sent.push(e.clone());
            } else {
                let k = (rng.next() % 4096) as usize;
                sent[k] = e.clone();
            }
            e
        };
        let keyed = dedup.key(&event).expect("valid event");
        if dedup.check_and_insert(&keyed, arrival).is_new() {
            agg.observe(std::iter::once(&event[..]), arrival);
        }
    }
    assert!(repeats > 40_000);
    assert_eq!(
        agg.counters.out_of_time.load(Relaxed),
        late,
        "every late sale and only those dropped"
    );
    eprintln!(
        "{events} sales, {repeats} repeats dropped, {late} late; {checked} (category, emission) checks; \
         largest overcount of a top-10 product {:.3} of the bound W/m",
        worst_error
    );
    assert!(checked >= 190 * categories as u64);
}
