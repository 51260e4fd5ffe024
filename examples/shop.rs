//! The e-commerce pipeline end to end, with a live dashboard: realistic
//! shop traffic into a sidecar run with `config/shop.toml`, and what comes
//! out of it, checked against what was sent.
//!
//! ```text
//! eventsieve run --config config/shop.toml                 # terminal 1
//! cargo run --release --example shop -- [--url nats://127.0.0.1:4222]
//!     [--seconds 30] [--rate 2000] [--seed N] [--short]      # terminal 2
//! ```
//!
//! The producer runs many sessions at once, each a customer's path: views,
//! an add to cart, an order, a payment (`seq` 0, 1, 2, ...), as protobuf
//! `shop.v1.Event`s in batches of length-delimited messages. Like real
//! traffic it has retries (5 % of events sent again in a later batch),
//! events out of order within their session (the reorder buffer puts them
//! back), late ones (1 % stamped ten minutes ago: deduplicated, but too
//! late for the aggregates), and big orders over $1000 (the fraud rule's).
//! One category, `control`, gets orders of known amounts, on time.
//!
//! The dashboard, refreshed every second: events/s in and out, duplicates
//! dropped, fraud alerts, payments, and per category the 5-minute moving
//! average and sum of sales with the top three products, as the sidecar
//! emits them. At the end it checks: every event answered, new and
//! duplicate as sent; every unique event out exactly once; every big order
//! on `fraud.orders` exactly once; every payment on `payments`; the
//! emitted moving average of `control` equal to its orders' mean. It exits
//! non-zero if a check fails. `--short` runs 4 seconds at 500 events/s
//! with a fixed seed, for CI.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Client;
use bytes::Bytes;
use eventsieve::config::input_config::compile;
use eventsieve::engine::batch::{self, Entry};
use futures_util::StreamExt;
use prost::Message;
use prost_reflect::{DynamicMessage, MessageDescriptor, Value};
use serde_json::Value as Json;

const CATEGORIES: [&str; 5] = ["shoes", "hats", "books", "games", "garden"];

struct Args {
    url: String,
    seconds: u64,
    rate: u64,
    seed: u64,
    short: bool,
}

fn args() -> Args {
    let mut a = Args {
        url: "nats://127.0.0.1:4222".into(),
        seconds: 30,
        rate: 2000,
        seed: 0x5eed,
        short: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| fail(&format!("{flag} needs a value")))
        };
        let number = |v: String| {
            v.parse()
                .unwrap_or_else(|_| fail(&format!("{v:?} is not a number")))
        };
        match flag.as_str() {
            "--url" => a.url = value(),
            "--seconds" => a.seconds = number(value()),
            "--rate" => a.rate = number(value()),
            "--seed" => a.seed = number(value()),
            "--short" => a.short = true,
            other => fail(&format!(
                "unknown flag {other}; see the header of examples/shop.rs"
            )),
        }
    }
    if a.short {
        (a.seconds, a.rate) = (4, 500);
    }
    a
}

fn fail(why: &str) -> ! {
    eprintln!("shop: {why}");
    std::process::exit(2)
}

/// xorshift64*: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One event before it is encoded.
#[derive(Clone)]
struct Shop {
    id: String,
    kind: &'static str,
    session: u64,
    seq: u64,
    category: String,
    product: String,
    amount: f64,
    at_ms: u64,
}

impl Shop {
    fn encode(&self, desc: &MessageDescriptor) -> Vec<u8> {
        let mut m = DynamicMessage::new(desc.clone());
        let text =
            |m: &mut DynamicMessage, name: &str, v: &str| m.set_field_by_name(name, Value::String(v.into()));
        text(&mut m, "event_id", &self.id);
        let number = desc
            .get_field_by_name("type")
            .and_then(|f| f.kind().as_enum().and_then(|e| e.get_value_by_name(self.kind)))
            .map_or(0, |v| v.number());
        m.set_field_by_name("type", Value::EnumNumber(number));
        text(&mut m, "session_id", &format!("s{}", self.session));
        text(&mut m, "user_id", &format!("u{}", self.session % 997));
        text(&mut m, "category", &self.category);
        text(&mut m, "product_id", &self.product);
        text(&mut m, "currency", "USD");
        m.set_field_by_name("amount", Value::F64(self.amount));
        m.set_field_by_name("seq", Value::U64(self.seq));
        if let Some(ts) = desc
            .get_field_by_name("timestamp")
            .and_then(|f| f.kind().as_message().cloned())
        {
            let mut t = DynamicMessage::new(ts);
            t.set_field_by_name("seconds", Value::I64((self.at_ms / 1000) as i64));
            t.set_field_by_name("nanos", Value::I32(((self.at_ms % 1000) * 1_000_000) as i32));
            m.set_field_by_name("timestamp", Value::Message(t));
        }
        m.encode_to_vec()
    }
}

/// What was sent, to check what came out against.
#[derive(Default)]
struct Sent {
    unique: HashSet<String>,
    duplicates: u64,
    big_orders: HashSet<String>,
    payments: HashSet<String>,
    control_amounts: Vec<f64>,
}

/// What came back and out, as the dashboard shows it.
#[derive(Default)]
struct Seen {
    answered_new: u64,
    answered_duplicate: u64,
    errors: u64,
    out: u64,
    fraud: HashMap<String, u64>,
    payments: HashMap<String, u64>,
    /// Per category: the last mean and sum messages, and the top products.
    mean: BTreeMap<String, Json>,
    sum: BTreeMap<String, Json>,
    top: BTreeMap<String, Json>,
}

/// The traffic generator: sessions walking through the shop.
struct Traffic {
    rng: Rng,
    run: u64,
    next_session: u64,
    /// Sessions under way: id, the next seq, their category.
    open: Vec<(u64, u64, String)>,
    next_id: u64,
}

impl Traffic {
    fn event(&mut self, now_ms: u64, sent: &mut Sent) -> Shop {
        if self.open.len() < 200 || self.rng.chance(5) {
            let category = CATEGORIES[self.rng.below(CATEGORIES.len() as u64) as usize].to_owned();
            self.open.push((self.next_session, 0, category));
            self.next_session += 1;
        }
        let i = self.rng.below(self.open.len() as u64) as usize;
        let (session, seq, category) = self.open[i].clone();
        let kind = match seq {
            0 | 1 => "PRODUCT_VIEWED",
            2 => "PRODUCT_ADDED_TO_CART",
            3 => "ORDER_PLACED",
            _ => "PAYMENT_PROCESSED",
        };
        let product = format!("{category}-{}", self.rng.below(40).min(self.rng.below(40)));
        let mut amount = 5.0 + self.rng.below(200) as f64;
        if kind == "ORDER_PLACED" && self.rng.chance(3) {
            amount = 1000.0 + self.rng.below(4000) as f64;
        }
        if kind == "PAYMENT_PROCESSED" {
            self.open.swap_remove(i);
        } else {
            self.open[i].1 += 1;
        }
        self.next_id += 1;
        let late = self.rng.chance(1);
        let event = Shop {
            id: format!("r{}e{}", self.run, self.next_id),
            kind,
            session,
            seq,
            category,
            product,
            amount,
            at_ms: if late { now_ms - 600_000 } else { now_ms },
        };
        sent.unique.insert(event.id.clone());
        if kind == "ORDER_PLACED" && amount > 1000.0 {
            sent.big_orders.insert(event.id.clone());
        }
        if kind == "PAYMENT_PROCESSED" {
            sent.payments.insert(event.id.clone());
        }
        event
    }
}

fn delimited(events: &[Vec<u8>]) -> Bytes {
    let mut body = Vec::new();
    for e in events {
        prost::encoding::encode_varint(e.len() as u64, &mut body);
        body.extend_from_slice(e);
    }
    body.into()
}

/// Follows a subject into `seen` until the task is aborted.
async fn follow(
    client: &Client,
    subject: &str,
    seen: Arc<Mutex<Seen>>,
    take: fn(&mut Seen, &async_nats::Message),
) -> tokio::task::JoinHandle<()> {
    let mut sub = client.subscribe(subject.to_owned()).await.expect("subscribe");
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            take(&mut seen.lock().unwrap(), &m);
        }
    })
}

/// The events of an output message: one, or (with the count header, as
/// batches go out) length-delimited ones.
fn events_in(m: &async_nats::Message) -> Vec<&[u8]> {
    if m.headers
        .as_ref()
        .and_then(|h| h.get("Eventsieve-Count"))
        .is_none()
    {
        return vec![&m.payload[..]];
    }
    let mut rest = &m.payload[..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let Ok(len) = prost::decode_length_delimiter(&mut rest) else {
            break;
        };
        let (event, after) = rest.split_at(len.min(rest.len()));
        out.push(event);
        rest = after;
    }
    out
}

fn event_id(desc: &MessageDescriptor, bytes: &[u8]) -> String {
    DynamicMessage::decode(desc.clone(), bytes)
        .ok()
        .and_then(|m| {
            m.get_field_by_name("event_id")
                .and_then(|v| v.as_str().map(str::to_owned))
        })
        .unwrap_or_default()
}

static DESCRIPTOR: std::sync::OnceLock<MessageDescriptor> = std::sync::OnceLock::new();

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/proto");
    let (pool, _) = compile(&[root], &["shop/v1/events.proto".into()])?;
    let desc = pool
        .get_message_by_name("shop.v1.Event")
        .ok_or("no shop.v1.Event")?;
    DESCRIPTOR.set(desc.clone()).ok();
    let client = async_nats::connect(&a.url).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let tasks = vec![
        follow(&client, "events.unique.>", seen.clone(), |s, m| {
            let counted = m.headers.as_ref().and_then(|h| h.get("Eventsieve-Count"));
            s.out += counted.and_then(|c| c.as_str().parse().ok()).unwrap_or(1);
        })
        .await,
        follow(&client, "fraud.orders", seen.clone(), |s, m| {
            for event in events_in(m) {
                *s.fraud
                    .entry(event_id(DESCRIPTOR.get().unwrap(), event))
                    .or_default() += 1;
            }
        })
        .await,
        follow(&client, "payments", seen.clone(), |s, m| {
            for event in events_in(m) {
                *s.payments
                    .entry(event_id(DESCRIPTOR.get().unwrap(), event))
                    .or_default() += 1;
            }
        })
        .await,
        follow(&client, "stats.sales.>", seen.clone(), |s, m| {
            let Ok(v) = serde_json::from_slice::<Json>(&m.payload) else {
                return;
            };
            let category = v["category"].as_str().unwrap_or("?").to_owned();
            match v["stat"].as_str() {
                Some("mean") => s.mean.insert(category, v),
                Some("sum") => s.sum.insert(category, v),
                _ => s.top.insert(category, v),
            };
        })
        .await,
    ];
    client.flush().await?;

    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let mut traffic = Traffic {
        rng: Rng(a.seed | 1),
        run: if a.short { a.seed } else { run },
        next_session: 0,
        open: Vec::new(),
        next_id: 0,
    };
    let mut sent = Sent::default();
    let mut retries: Vec<Vec<u8>> = Vec::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.seconds);
    let per_batch = 50u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 * per_batch / a.rate.max(1)));
    let mut shown = Instant::now();
    let mut shown_in = 0u64;
    let mut shown_out = 0u64;
    while Instant::now() < deadline {
        tick.tick().await;
        let now_ms = eventsieve::engine::unix_ms();
        let mut batch: Vec<Shop> = (0..per_batch).map(|_| traffic.event(now_ms, &mut sent)).collect();
        // Out of order within a session now and then: the reorder buffer's work.
        for i in 1..batch.len() {
            if batch[i - 1].session == batch[i].session && traffic.rng.chance(50) {
                batch.swap(i - 1, i);
            }
        }
        let mut bodies: Vec<Vec<u8>> = batch.iter().map(|e| e.encode(&desc)).collect();
        // Retries of earlier events: duplicates.
        sent.duplicates += retries.len() as u64;
        bodies.append(&mut retries);
        for e in &batch {
            if traffic.rng.chance(5) {
                retries.push(e.encode(&desc));
            }
        }
        let reply = client.request("dedup.batch", delimited(&bodies)).await?;
        let mut s = seen.lock().unwrap();
        for entry in batch::decode(&reply.payload)? {
            match entry {
                Entry::New => s.answered_new += 1,
                Entry::Duplicate => s.answered_duplicate += 1,
                Entry::Error { code, reason } => {
                    s.errors += 1;
                    eprintln!("error {code}: {reason}");
                }
            }
        }
        if shown.elapsed() >= Duration::from_secs(1) {
            let secs = shown.elapsed().as_secs_f64();
            let total_in = s.answered_new + s.answered_duplicate;
            dashboard(
                &s,
                (total_in - shown_in) as f64 / secs,
                (s.out - shown_out) as f64 / secs,
            );
            (shown, shown_in, shown_out) = (Instant::now(), total_in, s.out);
        }
    }
    // The control category: orders of known amounts, on time.
    let now_ms = eventsieve::engine::unix_ms();
    let mut control = Vec::new();
    for i in 0..20u64 {
        let amount = 10.0 * (i + 1) as f64;
        sent.control_amounts.push(amount);
        let id = format!("r{}c{i}", traffic.run);
        sent.unique.insert(id.clone());
        control.push(
            Shop {
                id,
                kind: "ORDER_PLACED",
                session: 1_000_000 + i,
                seq: 0,
                category: "control".into(),
                product: format!("c-{}", i % 3),
                amount,
                at_ms: now_ms,
            }
            .encode(&desc),
        );
    }
    let reply = client.request("dedup.batch", delimited(&control)).await?;
    seen.lock().unwrap().answered_new += batch::decode(&reply.payload)?
        .iter()
        .filter(|e| **e == Entry::New)
        .count() as u64;
    // Everything out, the held events released, the control mean emitted.
    let want_mean = sent.control_amounts.iter().sum::<f64>() / sent.control_amounts.len() as f64;
    let settle = Instant::now() + Duration::from_secs(10);
    while Instant::now() < settle {
        let done = {
            let s = seen.lock().unwrap();
            s.out >= sent.unique.len() as u64
                && s.mean
                    .get("control")
                    .is_some_and(|m| m["count"] == sent.control_amounts.len())
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for t in tasks {
        t.abort();
    }
    let s = seen.lock().unwrap();
    dashboard(&s, 0.0, 0.0);
    let mut problems = Vec::new();
    let unique = sent.unique.len() as u64;
    let mut check = |ok: bool, what: String| {
        println!("{} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            problems.push(what);
        }
    };
    check(s.errors == 0, format!("{} errors", s.errors));
    check(
        s.answered_new == unique,
        format!("{} answered new of {unique} unique events sent", s.answered_new),
    );
    check(
        s.answered_duplicate == sent.duplicates,
        format!(
            "{} answered duplicate of {} retries sent",
            s.answered_duplicate, sent.duplicates
        ),
    );
    check(
        s.out == unique,
        format!("{} events out of {unique} unique", s.out),
    );
    let fraud_ok = s.fraud.len() == sent.big_orders.len()
        && s.fraud.values().all(|&n| n == 1)
        && sent.big_orders.iter().all(|id| s.fraud.contains_key(id));
    check(
        fraud_ok,
        format!(
            "{} fraud alerts, each once, of {} big orders",
            s.fraud.len(),
            sent.big_orders.len()
        ),
    );
    let payments_ok = s.payments.len() == sent.payments.len() && s.payments.values().all(|&n| n == 1);
    check(
        payments_ok,
        format!(
            "{} payments routed, each once, of {}",
            s.payments.len(),
            sent.payments.len()
        ),
    );
    let mean = s.mean.get("control").and_then(|m| m["value"].as_f64());
    check(
        mean.is_some_and(|m| (m - want_mean).abs() < 1e-9),
        format!("control's emitted moving average {mean:?}, its orders' mean {want_mean}"),
    );
    if problems.is_empty() {
        println!("shop: every check passed");
        Ok(())
    } else {
        Err(format!("{} checks failed", problems.len()).into())
    }
}

/// One screen of the dashboard (redrawn in place on a terminal).
fn dashboard(s: &Seen, in_rate: f64, out_rate: f64) {
    let mut out = String::new();
    if std::io::stdout().is_terminal() {
        out.push_str("\x1b[2J\x1b[H");
    }
    out.push_str(&format!(
        "events/s in {in_rate:>8.0}   out {out_rate:>8.0}   duplicates dropped {:>6}   fraud alerts {:>4}   payments {:>5}\n",
        s.answered_duplicate,
        s.fraud.len(),
        s.payments.len()
    ));
    out.push_str("category   5-min avg sale   5-min sales   orders   top products (total)\n");
    for (category, mean) in &s.mean {
        let top: Vec<String> = s
            .top
            .get(category)
            .and_then(|t| t["items"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .take(3)
            .map(|i| {
                format!(
                    "{} ({:.0})",
                    i["item"].as_str().unwrap_or("?"),
                    i["total"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        out.push_str(&format!(
            "{category:<10} {:>14} {:>13} {:>8}   {}\n",
            mean["value"].as_f64().map_or("-".into(), |v| format!("{v:.2}")),
            s.sum
                .get(category)
                .and_then(|v| v["value"].as_f64())
                .map_or("-".into(), |v| format!("{v:.0}")),
            mean["count"].as_u64().unwrap_or(0),
            top.join(", ")
        ));
    }
    print!("{out}");
    std::io::stdout().flush().ok();
}
