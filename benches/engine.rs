//! Criterion benchmarks of the verdict path.
//!
//! - `ingest/<size>`: parse + shard + fingerprint + check-and-insert through
//!   `Deduplicator` for 50 B, 1 KiB and 8 KiB events (half duplicates).
//! - `table/check_and_insert`: the table alone holding 10 M live ids, random
//!   fingerprints, half duplicates.
//!
//! - `batch/lines+key/<n>x200B`: splitting a batch body and keying each line
//!   (the parsing a batch costs before any table work).
//! - `batch/decide/<n>x200B`: [`batch::decide`] on a whole batch (half of
//!   its lines seen before) plus encoding the reply: the sidecar's batch
//!   path without NATS and the store.
//!
//! - `input/...`: validating and keying a ~200-byte e-commerce event, and
//!   reading the three fields rules and aggregates read, in JSON and as
//!   the same content in protobuf (`shop.v1.Event`).
//!
//! `cargo bench --bench engine`

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use eventsieve::engine::batch::{self, Route};
use eventsieve::engine::fingerprint::Fingerprint;
use eventsieve::engine::table::Table;
use eventsieve::{Deduplicator, EngineConfig};

/// An event of about `size` bytes with id `ev<i>`.
fn event(i: u64, size: usize) -> String {
    let head = format!(r#"{{"event_id":"ev{i}","kind":"click","pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

fn fp(i: u64) -> Fingerprint {
    Fingerprint::of(&i.to_le_bytes())
}

fn ingest(c: &mut Criterion) {
    let mut group = c.benchmark_group("ingest");
    for size in [50usize, 1024, 8192] {
        // 4096 distinct events sent twice each per round: half duplicates.
        let events: Vec<String> = (0..4096).flat_map(|i| [event(i, size), event(i, size)]).collect();
        group.throughput(Throughput::Elements(events.len() as u64));
        group.bench_function(format!("{size}B"), |b| {
            b.iter_batched_ref(
                || {
                    Deduplicator::new(EngineConfig {
                        shards: 32,
                        segments_per_shard: 64,
                        ..EngineConfig::default()
                    })
                },
                |dedup| {
                    for e in &events {
                        black_box(dedup.ingest_event(e).unwrap());
                    }
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

const PER_TICK: u64 = 50_000;
const TICKS: u64 = 200;

/// Steady state at 10 M live ids: the window is `TICKS` time units, each
/// unit admits `PER_TICK` fresh ids, and every round advances the clock one
/// unit, so as many ids expire as arrive. A round is `PER_TICK` fresh ids
/// interleaved with `PER_TICK` ids that are alive (duplicates): half new.
struct Steady {
    now: u64,
}

impl Steady {
    fn round(&mut self) -> (Vec<Fingerprint>, u64) {
        let now = self.now;
        self.now += 1;
        // Alive at `now`: ids born in the last TICKS - 1 units.
        let (oldest, next) = ((now - TICKS + 1) * PER_TICK, now * PER_TICK);
        let ids = (0..PER_TICK)
            .flat_map(|k| {
                let dup = oldest + k.wrapping_mul(0x9E37_79B9_7F4A_7C15) % (next - oldest);
                [fp(dup), fp(next + k)]
            })
            .collect();
        (ids, now)
    }
}

fn table(c: &mut Criterion) {
    let mut table = Table::new(TICKS, 2048);
    for i in 0..PER_TICK * TICKS {
        let _ = table.check_and_insert(fp(i), i / PER_TICK);
    }
    let mut steady = Steady { now: TICKS };
    let mut group = c.benchmark_group("table");
    group.throughput(Throughput::Elements(2 * PER_TICK));
    group.sample_size(30);
    group.bench_function("check_and_insert/10M_live", |b| {
        b.iter_batched(
            || steady.round(),
            |(ids, now)| {
                for f in ids {
                    black_box(table.check_and_insert(f, now).is_new());
                }
            },
            BatchSize::LargeInput,
        )
    });
    let mut out = Vec::with_capacity(2 * PER_TICK as usize);
    group.bench_function("check_and_insert_batch/10M_live", |b| {
        b.iter_batched(
            || steady.round(),
            |(ids, now)| {
                out.clear();
                table.check_and_insert_batch(&ids, now, &mut out);
                black_box(&out);
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
    let live = table.live(steady.now - 1);
    let per_id = table.memory_bytes() as f64 / live as f64;
    println!("table after the runs: {live} live ids, {per_id:.2} bytes per live id");
}

fn batches(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch");
    for n in [100usize, 1000] {
        group.throughput(Throughput::Elements(n as u64));
        let body = |round: u64| -> Vec<u8> {
            // Half the lines repeat ids of the previous round.
            let ids = (0..n as u64).map(|k| {
                if k % 2 == 0 {
                    round * n as u64 + k
                } else {
                    (round.max(1) - 1) * n as u64 + k
                }
            });
            ids.map(|i| event(i, 200))
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes()
        };
        let sample = body(1);
        let dedup = Deduplicator::new(EngineConfig::default());
        group.bench_function(format!("lines+key/{n}x200B"), |b| {
            b.iter(|| {
                for range in batch::lines(&sample) {
                    black_box(dedup.key(&sample[range]).unwrap().fingerprint);
                }
            })
        });
        let mut round = 0;
        group.bench_function(format!("decide/{n}x200B"), |b| {
            b.iter_batched(
                || {
                    round += 1;
                    body(round)
                },
                |body| {
                    let d = batch::decide(&dedup, &body, 1_000, false, |_| Route::Here);
                    let mut out = Vec::with_capacity(2 * n);
                    for e in d.entries.iter().flatten() {
                        batch::push(&mut out, e);
                    }
                    black_box((out, d.new.len()))
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// A query over one hour of 1 s panes of one group (what `dedup.agg.query`
/// merges on a node), values spread over three decades; prints the memory
/// of that hour of panes.
fn aggregate_query(c: &mut Criterion) {
    use eventsieve::config::AggregateConfig;
    use eventsieve::stages::Aggregate;
    // The defaults: 1 s panes, 1 h, 1 %.
    let settings = AggregateConfig {
        group: "metric_name".into(),
        value: "metric_value".into(),
        time: "timestamp".into(),
        ..AggregateConfig::default()
    }
    .validate(0)
    .expect("valid aggregate");
    let agg = Aggregate::new(settings);
    let now_s = 1_700_000_000u64;
    let mut i = 0u64;
    for s in (now_s - 3599)..=now_s {
        let events: Vec<Vec<u8>> = (0..200)
            .map(|_| {
                i += 1;
                let value = 1.0 + (i * 7919 % 999) as f64;
                format!(r#"{{"metric_name":"cpu","metric_value":{value},"timestamp":{s}}}"#).into_bytes()
            })
            .collect();
        agg.observe(events.iter().map(Vec::as_slice), s * 1000);
    }
    eprintln!(
        "one group, one hour of 1 s panes ({} panes, 200 values each over 1..1000): {:.1} MiB",
        agg.panes(),
        agg.memory_bytes() as f64 / (1 << 20) as f64
    );
    // top(10) of 10^4 distinct items: one group, an hour of 1 s panes,
    // 200 sales a pane of items drawn with a skew (a few sell often).
    let with_top = AggregateConfig {
        group: "category".into(),
        value: "amount".into(),
        time: "timestamp".into(),
        item: "product_id".into(),
        emit: vec![eventsieve::config::EmitConfig {
            stat: "top(10)".into(),
            subject: "stats.top.{group}".into(),
            ..Default::default()
        }],
        ..AggregateConfig::default()
    }
    .validate(0)
    .expect("valid aggregate");
    let top = Aggregate::new(with_top);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for s in (now_s - 3599)..=now_s {
        let events: Vec<Vec<u8>> = (0..200)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let item = (10_000f64.powf((x % 1_000_000) as f64 / 1_000_000.0) as u64).min(9_999);
                format!(
                    r#"{{"category":"shoes","product_id":"p{item}","amount":{},"timestamp":{s}}}"#,
                    1 + x % 300
                )
                .into_bytes()
            })
            .collect();
        top.observe(events.iter().map(Vec::as_slice), s * 1000);
    }
    eprintln!(
        "one group, one hour of 1 s panes with top(10) (100 counters a pane) over 10^4 items, 200 sales a pane: {:.1} MiB",
        top.memory_bytes() as f64 / (1 << 20) as f64
    );
    // What the stage costs per accepted event: loadgen's events (16
    // metric names, 200 bytes), 1000 a call, as the batch path feeds them.
    let events: Vec<Vec<u8>> = (0..1000u64)
        .map(|k| {
            let mut e = format!(
                r#"{{"event_id":"loadw0n{k}","kind":"load","metric_name":"m{}","metric_value":{},"timestamp":{now_s},"pad":""#,
                k % 16,
                k % 1000
            )
            .into_bytes();
            e.resize(198, b'x');
            e.extend_from_slice(b"\"}");
            e
        })
        .collect();
    let mut group = c.benchmark_group("aggregate observe");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("1000 events of 200 B", |b| {
        b.iter(|| agg.observe(events.iter().map(Vec::as_slice), now_s * 1000))
    });
    group.bench_function("their fields alone (the stage's reader)", |b| {
        let wanted = eventsieve::stages::fields::Wanted {
            group: "metric_name",
            value: "metric_value",
            time: "timestamp",
            item: "",
        };
        b.iter(|| {
            for e in &events {
                black_box(eventsieve::stages::fields::read(
                    &eventsieve::engine::input::Format::Json,
                    e,
                    wanted,
                ));
            }
        })
    });
    group.bench_function("their event_id alone (the key parser)", |b| {
        let limits = eventsieve::engine::event::Limits::default();
        b.iter(|| {
            for e in &events {
                black_box(eventsieve::engine::event::event_id(e, &limits).unwrap());
            }
        })
    });
    // The batch path: the fields read in the key parser's pass.
    let names = eventsieve::config::captured_fields(std::slice::from_ref(&agg.settings));
    let dedup = Deduplicator::new(EngineConfig {
        capture: names.clone(),
        ..EngineConfig::default()
    });
    let mut seen = vec![eventsieve::engine::event::Seen::Missing; events.len() * names.len()];
    group.bench_function("their event_id and the stage's fields (the key parser)", |b| {
        b.iter(|| {
            for (e, seen) in events.iter().zip(seen.chunks_exact_mut(names.len())) {
                black_box(dedup.key_capturing(e, seen).unwrap());
            }
        })
    });
    group.bench_function("1000 events of 200 B, fields read with the key", |b| {
        b.iter(|| {
            agg.observe_seen(
                events
                    .iter()
                    .map(Vec::as_slice)
                    .zip(seen.chunks_exact(names.len())),
                &names,
                now_s * 1000,
            )
        })
    });
    group.finish();
    let (start, end) = agg.last(3_600_000, now_s * 1000);
    c.bench_function("aggregate query: one hour of 1 s panes", |b| {
        b.iter(|| agg.summary("cpu", start, end).count)
    });
    // As it runs: an event lands in the newest pane before each query, so
    // the newest block is merged anew every time.
    let event = format!(r#"{{"metric_name":"cpu","metric_value":5,"timestamp":{now_s}}}"#).into_bytes();
    c.bench_function(
        "aggregate query: one hour of 1 s panes, an event before each",
        |b| {
            b.iter(|| {
                agg.observe(std::iter::once(event.as_slice()), now_s * 1000);
                agg.summary("cpu", start, end).count
            })
        },
    );
    eprintln!(
        "with the blocks' cached merges: {:.1} MiB",
        agg.memory_bytes() as f64 / (1 << 20) as f64
    );
}

criterion_group!(benches, ingest, table, batches, aggregate_query, routing, input);
criterion_main!(benches);

/// Routing rules on 200-byte e-commerce events: 1, 5 and 50 rules (the
/// brief's first, then rules on type, total, country and product that
/// mostly do not match, so every rule is evaluated), compiled.
fn routing(c: &mut Criterion) {
    use eventsieve::config::RoutingSpec;
    use eventsieve::engine::event::Limits;
    use eventsieve::engine::key::KeySpec;
    use eventsieve::route::{KeyReader, Routed, RuleSet};
    let kinds = ["order_placed", "page_view", "add_to_cart", "heartbeat"];
    let events: Vec<Vec<u8>> = (0..1000u64)
        .map(|k| {
            let mut e = format!(
                r#"{{"event_id":"e{k}","type":"{}","total":{},"country":"c{}","product":"p{}","pad":""#,
                kinds[k as usize % 4],
                (k * 7919) % 2000,
                k % 30,
                k % 500
            )
            .into_bytes();
            e.resize(198, b'x');
            e.extend_from_slice(b"\"}");
            e
        })
        .collect();
    let rule = |i: usize| {
        let when = match i % 5 {
            0 => r#"event.type == "order_placed" && event.total > 1000.0"#.to_string(),
            1 => format!(r#"event.country == "x{i}""#),
            2 => format!(r#"event.product in ["q{i}", "r{i}"]"#),
            3 => format!("event.total < -{i}.0"),
            _ => format!(r#"event.type.startsWith("z{i}")"#),
        };
        format!("[[rule]]\nname = \"r{i}\"\nwhen = '{when}'\nto = [\"routed.r{i}\"]\ncontinue = true\n")
    };
    let key = KeyReader {
        spec: KeySpec::Field("event_id".into()),
        limits: Limits::default(),
        format: eventsieve::engine::input::Format::Json,
    };
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(events.len() as u64));
    for n in [1, 5, 50] {
        let text: String = (0..n).map(rule).collect();
        let spec = RoutingSpec::parse(&text).unwrap();
        let set = RuleSet::build(&spec, "events.unique.{shard}", 32, 0, &|_| Default::default()).unwrap();
        assert_eq!(set.compiled(), n, "every rule compiled");
        let mut out = Routed::default();
        group.bench_function(format!("{n} rules, 1000 events of 200 B"), |b| {
            b.iter(|| {
                for e in &events {
                    set.route(e, (3, "dedup.ingest"), &key, &mut out);
                    black_box(&out);
                }
            })
        });
        // The batch path: the rules' fields read with each line's key.
        let names = set.fields().to_vec();
        let at: Vec<usize> = (0..names.len()).collect();
        let mut seen = vec![eventsieve::engine::event::Seen::Missing; names.len()];
        let read: Vec<Vec<eventsieve::engine::event::Seen>> = events
            .iter()
            .map(|e| {
                assert!(eventsieve::engine::event::capture(e, &names, &mut seen));
                seen.clone()
            })
            .collect();
        group.bench_function(format!("{n} rules, fields read with the key"), |b| {
            b.iter(|| {
                for (e, seen) in events.iter().zip(&read) {
                    set.route_read(e, (3, "dedup.ingest"), &key, (&at, seen), &mut out);
                    black_box(&out);
                }
            })
        });
    }
    group.finish();
}

/// One e-commerce event of about 200 bytes, in JSON and in protobuf, with
/// the same fields and values.
fn shop_event(i: u64) -> (Vec<u8>, Vec<u8>) {
    use prost::Message;
    use prost_reflect::{DynamicMessage, Value};
    let (pool, _) = eventsieve::config::input_config::compile(
        &[std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/proto")],
        &["shop/v1/events.proto".into()],
    )
    .unwrap();
    let desc = pool.get_message_by_name("shop.v1.Event").unwrap();
    let mut m = DynamicMessage::new(desc.clone());
    let id = format!("ev{i:012}");
    let texts = [
        ("event_id", id.as_str()),
        ("session_id", "s0123456789abcdef"),
        ("user_id", "u0123456789"),
        ("category", "electronics"),
        ("product_id", "p-0000012345-blue-xl"),
        ("currency", "USD"),
    ];
    for (name, v) in texts {
        m.set_field_by_name(name, Value::String(v.into()));
    }
    m.set_field_by_name("type", Value::EnumNumber(3));
    m.set_field_by_name("amount", Value::F64(1234.56));
    m.set_field_by_name("seq", Value::U64(17));
    let ts_desc = desc
        .get_field_by_name("timestamp")
        .unwrap()
        .kind()
        .as_message()
        .unwrap()
        .clone();
    let mut ts = DynamicMessage::new(ts_desc);
    ts.set_field_by_name("seconds", Value::I64(1_764_000_000));
    ts.set_field_by_name("nanos", Value::I32(123_456_789));
    m.set_field_by_name("timestamp", Value::Message(ts));
    let proto = m.encode_to_vec();
    let json = format!(
        r#"{{"event_id":"{id}","type":"ORDER_PLACED","session_id":"s0123456789abcdef","user_id":"u0123456789","category":"electronics","product_id":"p-0000012345-blue-xl","currency":"USD","amount":1234.56,"seq":17,"timestamp":1764000000.123456789}}"#
    );
    (json.into_bytes(), proto)
}

fn input(c: &mut Criterion) {
    use eventsieve::engine::event::{Limits, Seen};
    use eventsieve::engine::input::Format;
    use eventsieve::engine::key::KeySpec;
    use eventsieve::engine::proto::Schema;
    let (json, proto) = shop_event(1);
    let (pool, _) = eventsieve::config::input_config::compile(
        &[std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/proto")],
        &["shop/v1/events.proto".into()],
    )
    .unwrap();
    let protobuf = Format::protobuf(Schema::new(pool, "shop.v1.Event").unwrap());
    let key = KeySpec::default();
    let limits = Limits::default();
    let fields: Vec<String> = ["type", "amount", "category"].map(String::from).to_vec();
    let mut group = c.benchmark_group("input");
    group.throughput(Throughput::Elements(1));
    for (name, format, event) in [("json", Format::Json, &json), ("protobuf", protobuf, &proto)] {
        group.bench_function(format!("key/{name} {}B", event.len()), |b| {
            b.iter(|| black_box(format.id_of(&key, black_box(event), &limits).unwrap().len()))
        });
        group.bench_function(format!("key+3 fields/{name} {}B", event.len()), |b| {
            let mut seen = [Seen::Missing; 3];
            b.iter(|| {
                let (id, _) = format
                    .id_capturing(&key, black_box(event), &limits, &fields, &mut seen)
                    .unwrap();
                black_box((id.len(), seen[1]))
            })
        });
    }
    group.finish();
}
