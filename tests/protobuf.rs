//! Protobuf events against a real nats-server: verdicts, every kind of
//! bad message answered 400 with nothing kept, unknown fields kept byte
//! for byte, batches of length-delimited messages, rules and aggregates
//! over protobuf fields giving what they give over the same events in
//! JSON, the canonical JSON output, the HTTP gateway's content types, and
//! schemas that stop the start with a message.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use eventsieve::config::input_config::compile;
use eventsieve::config::{AggregateConfig, Config, Durability, InputConfig, RoutingSpec, Settings};
use eventsieve::engine::batch::{self, Entry};
use eventsieve::engine::input::Format;
use eventsieve::engine::proto::Schema;
use eventsieve::service;
use futures_util::StreamExt;
use prost::Message;
use prost_reflect::{DynamicMessage, MessageDescriptor, Value};

fn proto_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/proto")
}

fn shop_input() -> InputConfig {
    InputConfig {
        format: "protobuf".into(),
        proto_paths: vec![proto_dir()],
        proto_files: vec!["shop/v1/events.proto".into()],
        message: "shop.v1.Event".into(),
        ..InputConfig::default()
    }
}

fn descriptor() -> MessageDescriptor {
    let (pool, _) = compile(&[proto_dir()], &["shop/v1/events.proto".into()]).unwrap();
    pool.get_message_by_name("shop.v1.Event").unwrap()
}

/// Settings for a sidecar on `server`, changed by `change` before they are
/// checked.
fn configured(server: &NatsServer, data: &std::path::Path, change: impl FnOnce(&mut Config)) -> Settings {
    let mut config = Config::default();
    config.nats.url = server.url();
    config.data_dir = data.to_owned();
    config.window = "1h".into();
    config.durability = Durability::Local;
    config.metrics_addr = String::new();
    change(&mut config);
    config.validate().expect("test settings are valid")
}

/// One shop event; `None` leaves a field out.
#[derive(Clone)]
struct Shop<'a> {
    id: Option<&'a str>,
    kind: &'a str,
    category: &'a str,
    amount: f64,
    seconds: i64,
}

impl Shop<'_> {
    fn message(&self) -> DynamicMessage {
        let desc = descriptor();
        let mut m = DynamicMessage::new(desc.clone());
        if let Some(id) = self.id {
            m.set_field_by_name("event_id", Value::String(id.into()));
        }
        let kinds = desc.get_field_by_name("type").unwrap().kind();
        let number = kinds
            .as_enum()
            .unwrap()
            .get_value_by_name(self.kind)
            .unwrap()
            .number();
        m.set_field_by_name("type", Value::EnumNumber(number));
        m.set_field_by_name("category", Value::String(self.category.into()));
        m.set_field_by_name("amount", Value::F64(self.amount));
        let ts_desc = desc
            .get_field_by_name("timestamp")
            .unwrap()
            .kind()
            .as_message()
            .unwrap()
            .clone();
        let mut ts = DynamicMessage::new(ts_desc);
        ts.set_field_by_name("seconds", Value::I64(self.seconds));
        m.set_field_by_name("timestamp", Value::Message(ts));
        m
    }

    fn bytes(&self) -> Vec<u8> {
        self.message().encode_to_vec()
    }

    /// The same event in JSON, with the `.proto` field names.
    fn json(&self) -> Bytes {
        let mut v = serde_json::json!({
            "type": self.kind,
            "category": self.category,
            "amount": self.amount,
            "timestamp": self.seconds,
        });
        if let Some(id) = self.id {
            v["event_id"] = id.into();
        }
        Bytes::from(v.to_string())
    }
}

fn shop(id: &str, kind: &str, category: &str, amount: f64) -> Shop<'static> {
    let id: &'static str = Box::leak(id.to_owned().into_boxed_str());
    let kind: &'static str = Box::leak(kind.to_owned().into_boxed_str());
    let category: &'static str = Box::leak(category.to_owned().into_boxed_str());
    Shop {
        id: Some(id),
        kind,
        category,
        amount,
        seconds: now_s(),
    }
}

fn now_s() -> i64 {
    (eventsieve::engine::unix_ms() / 1000) as i64
}

fn delimited(events: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        prost::encoding::encode_varint(e.len() as u64, &mut out);
        out.extend_from_slice(e);
    }
    out
}

fn error_of(answer: Answer) -> String {
    match answer {
        Answer::Error(400, reason) => reason,
        other => panic!("expected a 400, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_bad_messages_and_unknown_fields_kept() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let running = service::start(configured(&server, data.path(), |c| {
        c.input = shop_input();
        c.http_addr = format!("127.0.0.1:{port}");
    }))
    .await
    .unwrap();
    let client = server.client().await;
    let mut out = client.subscribe("events.unique.>").await.unwrap();

    // Unknown fields (a newer producer's) are allowed and kept as sent.
    let mut first = shop("p1", "ORDER_PLACED", "shoes", 120.0).bytes();
    prost::encoding::encode_key(99, prost::encoding::WireType::LengthDelimited, &mut first);
    prost::encoding::encode_varint(3, &mut first);
    first.extend_from_slice(b"new");
    assert_eq!(
        ask(&client, "dedup.ingest.p1", first.clone()).await,
        Answer::Verdict(true)
    );
    assert_eq!(
        ask(&client, "dedup.ingest", first.clone()).await,
        Answer::Verdict(false)
    );
    let got = tokio::time::timeout(Duration::from_secs(5), out.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        &got.payload[..],
        &first[..],
        "byte for byte, unknown field included"
    );

    // Each bad message: a 400 saying why, and nothing kept.
    let good = shop("p2", "PRODUCT_VIEWED", "hats", 5.0).bytes();
    let reason = error_of(ask(&client, "dedup.ingest", vec![0xff, 0xff, 0xff]).await);
    assert!(
        reason.starts_with("event is not a valid shop.v1.Event"),
        "{reason}"
    );
    let reason = error_of(ask(&client, "dedup.ingest", good[..good.len() - 2].to_vec()).await);
    assert!(
        reason.contains("not a valid shop.v1.Event"),
        "truncated: {reason}"
    );
    // `amount` (6, a double) sent as a varint.
    let mut wrong = good.clone();
    wrong.extend_from_slice(&[6 << 3, 1]);
    let reason = error_of(ask(&client, "dedup.ingest", wrong).await);
    assert!(
        reason.contains("amount") && reason.contains("wire type"),
        "{reason}"
    );
    // Text that is not UTF-8 in `category` (5).
    let mut latin = good.clone();
    latin.extend_from_slice(&[5 << 3 | 2, 1, 0xe9]);
    let reason = error_of(ask(&client, "dedup.ingest", latin).await);
    assert!(
        reason.contains("category") && reason.contains("UTF-8"),
        "{reason}"
    );
    let keyless = Shop {
        id: None,
        ..shop("x", "PRODUCT_VIEWED", "hats", 5.0)
    }
    .bytes();
    let reason = error_of(ask(&client, "dedup.ingest", keyless).await);
    assert!(reason.contains("event_id"), "{reason}");
    assert_silent(&mut out, "a bad message is not republished").await;
    // The truncated one's id was not kept: the whole event is new.
    assert_eq!(
        ask(&client, "dedup.ingest.p2", good.clone()).await,
        Answer::Verdict(true)
    );

    // Over HTTP: a message with its content type; JSON refused by a
    // protobuf sidecar.
    let url = format!("http://127.0.0.1:{port}/api/v1/events");
    let third = shop("p3", "PRODUCT_VIEWED", "hats", 5.0).bytes();
    let post = |body: Vec<u8>, content_type: &'static str| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            match ureq::post(&url)
                .set("Content-Type", content_type)
                .send_bytes(&body)
            {
                Ok(r) => r.status(),
                Err(ureq::Error::Status(code, _)) => code,
                Err(e) => panic!("{e}"),
            }
        })
    };
    assert_eq!(post(third.clone(), "application/x-protobuf").await.unwrap(), 202);
    assert_eq!(post(third.clone(), "application/x-protobuf").await.unwrap(), 409);
    assert_eq!(post(b"{}".to_vec(), "application/json").await.unwrap(), 415);
    assert_eq!(post(vec![0xff], "application/x-protobuf").await.unwrap(), 400);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_delimited_messages_with_bad_and_truncated_ones() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let running = service::start(configured(&server, data.path(), |c| c.input = shop_input()))
        .await
        .unwrap();
    let client = server.client().await;
    let mut out = client.subscribe("events.unique.>").await.unwrap();
    let a = shop("b1", "PRODUCT_VIEWED", "hats", 1.0).bytes();
    let b = shop("b2", "PRODUCT_ADDED_TO_CART", "hats", 2.0).bytes();
    let c = shop("b3", "ORDER_PLACED", "hats", 3.0).bytes();
    let mut body = delimited(&[a.clone(), vec![0x0a, 0x7f], b.clone(), a.clone()]);
    // The last message's length says more than there is.
    prost::encoding::encode_varint(c.len() as u64 + 10, &mut body);
    body.extend_from_slice(&c);
    let reply = request(&client, "dedup.batch", body).await;
    let entries = batch::decode(&reply.payload).unwrap();
    assert_eq!(entries.len(), 5, "{entries:?}");
    assert_eq!(entries[0], Entry::New);
    assert!(matches!(&entries[1], Entry::Error { code: 400, reason } if reason.contains("not a valid")));
    assert_eq!(entries[2], Entry::New);
    assert_eq!(entries[3], Entry::Duplicate);
    assert!(
        matches!(&entries[4], Entry::Error { code: 400, reason } if reason.contains("truncated")),
        "{:?}",
        entries[4]
    );

    // Per shard, the new messages, each length-delimited.
    let format = Format::protobuf(Schema::new(descriptor().parent_pool().clone(), "shop.v1.Event").unwrap());
    let mut got = BTreeSet::new();
    while got.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(5), out.next())
            .await
            .unwrap()
            .unwrap();
        let frames = format.split(&m.payload);
        assert!(frames.truncated.is_none());
        let count: usize = m
            .headers
            .as_ref()
            .unwrap()
            .get("Eventsieve-Count")
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        assert_eq!(count, frames.ranges.len());
        for r in frames.ranges {
            got.insert(m.payload[r].to_vec());
        }
    }
    assert_eq!(got, BTreeSet::from([a, b]));
    assert_silent(&mut out, "nothing else").await;
    // c was not kept: sent whole, it is new.
    let reply = request(&client, "dedup.batch", delimited(&[c])).await;
    assert_eq!(batch::decode(&reply.payload).unwrap(), vec![Entry::New]);
    running.shutdown().await.unwrap();
}

const RULES: &str = r#"
[[rule]]
name = "fraud"
when = 'event.type == "ORDER_PLACED" && event.amount > 1000.0'
to = ["fraud.orders"]

[[rule]]
name = "payments"
when = 'event.type == "PAYMENT_PROCESSED"'
to = ["payments"]

[[rule]]
name = "big_anything"
when = 'event.amount * 2.0 > 5000.0'
to = ["big"]
continue = true
"#;

/// Routes and aggregates `events` on a sidecar reading `format`; what
/// went where (by id), and the aggregate's answer for `shoes`.
async fn routed_and_aggregated(
    protobuf: bool,
    events: &[Shop<'static>],
    now: i64,
) -> (BTreeSet<(String, String)>, String) {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let settings = configured(&server, data.path(), |c| {
        if protobuf {
            c.input = shop_input();
        }
        c.routing = RoutingSpec::parse(RULES).unwrap();
        c.aggregate = vec![AggregateConfig {
            group: "category".into(),
            value: "amount".into(),
            time: "timestamp".into(),
            pane: "1s".into(),
            max_window: "1h".into(),
            lateness: "1h".into(),
            ..AggregateConfig::default()
        }];
    });
    let running = service::start(settings).await.unwrap();
    let client = server.client().await;
    let mut out = client.subscribe(">").await.unwrap();
    let (singles, batched) = events.split_at(events.len() / 2);
    for e in singles {
        let body = if protobuf {
            Bytes::from(e.bytes())
        } else {
            e.json()
        };
        assert!(matches!(
            ask(&client, "dedup.ingest", body).await,
            Answer::Verdict(_)
        ));
    }
    let body = if protobuf {
        delimited(&batched.iter().map(Shop::bytes).collect::<Vec<_>>())
    } else {
        batched
            .iter()
            .map(|e| String::from_utf8(e.json().to_vec()).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes()
    };
    request(&client, "dedup.batch", body).await;
    let format = Format::protobuf(Schema::new(descriptor().parent_pool().clone(), "shop.v1.Event").unwrap());
    let mut got = BTreeSet::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(700), out.next()).await {
        let subject = m.subject.to_string();
        if subject.starts_with("dedup.") || subject.starts_with("_INBOX") || subject.starts_with("$") {
            continue;
        }
        // A batch's events of one subject come together, counted; a
        // single event alone.
        let counted = m
            .headers
            .as_ref()
            .is_some_and(|h| h.get("Eventsieve-Count").is_some());
        #[allow(clippy::single_range_in_vec_init)]
        let ranges = if counted {
            format.split(&m.payload).ranges
        } else {
            vec![0..m.payload.len()]
        };
        let ids: Vec<String> = if protobuf {
            ranges
                .into_iter()
                .map(|r| {
                    let msg = DynamicMessage::decode(descriptor(), &m.payload[r]).unwrap();
                    msg.get_field_by_name("event_id")
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        } else {
            m.payload
                .split(|&b| b == b'\n')
                .map(|l| {
                    serde_json::from_slice::<serde_json::Value>(l).unwrap()["event_id"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        };
        let subject = if subject.starts_with("events.unique.") {
            "default".to_owned()
        } else {
            subject
        };
        got.extend(ids.into_iter().map(|id| (subject.clone(), id)));
    }
    let q = format!(
        r#"{{"category":"shoes","start":{},"end":{}}}"#,
        now - 600,
        now + 600
    );
    let answer = request(&client, "dedup.agg.query", Bytes::from(q)).await;
    running.shutdown().await.unwrap();
    (got, String::from_utf8(answer.payload.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_aggregates_read_protobuf_fields_as_they_read_json() {
    let mut events = Vec::new();
    for i in 0..40 {
        let kind = [
            "PRODUCT_VIEWED",
            "ORDER_PLACED",
            "PAYMENT_PROCESSED",
            "PRODUCT_ADDED_TO_CART",
        ][i % 4];
        let category = ["shoes", "hats"][i % 3 % 2];
        let amount = [12.5, 1500.0, 999.0, 3000.0, 40.0][i % 5];
        events.push(shop(&format!("r{i}"), kind, category, amount));
    }
    events.push(events[1].clone()); // a duplicate: routed once
    let now = now_s();
    let (json_routes, json_agg) = routed_and_aggregated(false, &events, now).await;
    let (proto_routes, proto_agg) = routed_and_aggregated(true, &events, now).await;
    assert!(
        json_routes.iter().any(|(s, _)| s == "fraud.orders"),
        "{json_routes:?}"
    );
    assert!(json_routes.iter().any(|(s, _)| s == "payments"));
    assert!(
        json_routes.iter().any(|(s, _)| s == "big"),
        "the interpreted rule matched"
    );
    assert_eq!(proto_routes, json_routes);
    assert!(json_agg.contains("\"count\":"), "{json_agg}");
    assert_eq!(proto_agg, json_agg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_in_the_canonical_json_mapping() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let running = service::start(configured(&server, data.path(), |c| {
        c.input = InputConfig {
            output_format: "json".into(),
            ..shop_input()
        };
    }))
    .await
    .unwrap();
    let client = server.client().await;
    let mut out = client.subscribe("events.unique.>").await.unwrap();
    let one = shop("j1", "ORDER_PLACED", "shoes", 1200.0);
    assert_eq!(
        ask(&client, "dedup.ingest", one.bytes()).await,
        Answer::Verdict(true)
    );
    let m = tokio::time::timeout(Duration::from_secs(5), out.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.payload, serde_json::to_vec(&one.message()).unwrap());
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["eventId"], "j1", "canonical: lowerCamelCase names");
    assert_eq!(v["type"], "ORDER_PLACED");
    assert!(v["timestamp"].as_str().unwrap().ends_with('Z'), "RFC 3339: {v}");

    let (two, three) = (
        shop("j2", "PRODUCT_VIEWED", "hats", 1.0),
        shop("j3", "PRODUCT_VIEWED", "hats", 2.0),
    );
    request(&client, "dedup.batch", delimited(&[two.bytes(), three.bytes()])).await;
    let mut lines = Vec::new();
    while lines.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(5), out.next())
            .await
            .unwrap()
            .unwrap();
        lines.extend(m.payload.split(|&b| b == b'\n').map(<[u8]>::to_vec));
    }
    lines.sort();
    let mut want = vec![
        serde_json::to_vec(&two.message()).unwrap(),
        serde_json::to_vec(&three.message()).unwrap(),
    ];
    want.sort();
    assert_eq!(lines, want, "JSON lines");
    running.shutdown().await.unwrap();
}

#[test]
fn schemas_that_cannot_serve_stop_the_start_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.proto"),
        "syntax = \"proto3\";\npackage b;\nmessage E {\n  string event_id = 1\n}\n",
    )
    .unwrap();
    let broken = InputConfig {
        format: "protobuf".into(),
        proto_paths: vec![dir.path().to_owned()],
        proto_files: vec!["broken.proto".into()],
        message: "b.E".into(),
        ..InputConfig::default()
    };
    let error = |change: &dyn Fn(&mut Config)| {
        let mut config = Config::default();
        change(&mut config);
        config.validate().unwrap_err().to_string()
    };
    let e = error(&|c| c.input = broken.clone());
    assert!(e.contains("broken.proto:5:1"), "file, line and column: {e}");
    let e = error(&|c| {
        c.input = InputConfig {
            message: "shop.v1.Nope".into(),
            ..shop_input()
        }
    });
    assert!(
        e.contains("shop.v1.Nope") && e.contains("shop.v1.Event, shop.v1.LineItem"),
        "{e}"
    );
    let e = error(&|c| {
        c.input = shop_input();
        c.key = eventsieve::config::KeyConfig::One("order_id".into());
    });
    assert!(
        e.contains("key \"order_id\"") && e.contains("has no field"),
        "{e}"
    );
    let e = error(&|c| {
        c.input = shop_input();
        c.key = eventsieve::config::KeyConfig::One("amount".into());
    });
    assert!(e.contains("a string or an integer"), "{e}");
    let e = error(&|c| {
        c.input = shop_input();
        c.shard_key = "seq".into();
    });
    assert!(e.contains("shard_key") && e.contains("a string"), "{e}");
    let e = error(&|c| {
        c.input = InputConfig {
            proto_files: vec!["missing.proto".into()],
            ..shop_input()
        };
    });
    assert!(e.contains("missing.proto"), "{e}");
    // A FileDescriptorSet file works as the .proto files do.
    let (_, set) = compile(&[proto_dir()], &["shop/v1/events.proto".into()]).unwrap();
    let path = dir.path().join("shop.pb");
    std::fs::write(&path, set).unwrap();
    let config = Config {
        input: InputConfig {
            descriptor_set: path.display().to_string(),
            proto_files: Vec::new(),
            ..shop_input()
        },
        ..Config::default()
    };
    let settings = config.validate().unwrap();
    assert_eq!(settings.format.schema().unwrap().name(), "shop.v1.Event");
}

/// The schema section of the one sidecar's status.
async fn schema_status(settings: &Settings) -> serde_json::Value {
    let lines = eventsieve::control::status::status_command(settings, true)
        .await
        .unwrap();
    let node: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    node["schema"].clone()
}

/// Polls the status until `done` holds of the schema section (bounded).
async fn wait_schema(settings: &Settings, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    for _ in 0..100 {
        let s = schema_status(settings).await;
        if done(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("schema status never got there: {}", schema_status(settings).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_set_while_serving_is_taken_or_refused_whole() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let settings = configured(&server, data.path(), |c| {
        c.input = shop_input();
        c.routing = RoutingSpec::parse(
            "[[rule]]\nname = \"coupon\"\nwhen = 'event.type == \"ORDER_PLACED\" && event.coupon == \"SAVE10\"'\nto = [\"coupons\"]\n",
        )
        .unwrap();
    });
    let running = service::start(settings.clone()).await.unwrap();
    let client = server.client().await;
    let mut coupons = client.subscribe("coupons").await.unwrap();
    // An order with field 30 (`coupon` in the next version): unknown now.
    let with_coupon = |id: &str| {
        let mut bytes = shop(id, "ORDER_PLACED", "shoes", 50.0).bytes();
        prost::encoding::encode_key(30, prost::encoding::WireType::LengthDelimited, &mut bytes);
        prost::encoding::encode_varint(6, &mut bytes);
        bytes.extend_from_slice(b"SAVE10");
        bytes
    };
    assert_eq!(
        ask(&client, "dedup.ingest", with_coupon("c1")).await,
        Answer::Verdict(true)
    );
    assert_silent(&mut coupons, "no coupon field in the configured schema").await;

    // A compatible change: a field added.
    let next = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(next.path().join("shop/v1")).unwrap();
    let v1 = std::fs::read_to_string(proto_dir().join("shop/v1/events.proto")).unwrap();
    let v2 = v1.replace(
        "  string currency = 10;\n",
        "  string currency = 10;\n  string coupon = 30;\n",
    );
    assert_ne!(v1, v2);
    std::fs::write(next.path().join("shop/v1/events.proto"), &v2).unwrap();
    let files = [PathBuf::from("shop/v1/events.proto")];
    let done = eventsieve::control::schema::schema_set(&settings, &files, &[next.path().to_owned()])
        .await
        .unwrap();
    assert!(done.contains("shop.v1.Event"), "{done}");
    let taken = wait_schema(&settings, |s| s["revision"].as_u64().unwrap_or(0) > 0).await;
    assert!(taken.get("rejected").is_none(), "{taken}");
    assert_eq!(
        ask(&client, "dedup.ingest", with_coupon("c2")).await,
        Answer::Verdict(true)
    );
    let routed = tokio::time::timeout(Duration::from_secs(5), coupons.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&routed.payload[..], &with_coupon("c2")[..]);

    // A change without the key field: the CLI refuses it, writing nothing...
    let v3 = v2.replace("  string event_id = 1;\n", "");
    std::fs::write(next.path().join("shop/v1/events.proto"), &v3).unwrap();
    let refused = eventsieve::control::schema::schema_set(&settings, &files, &[next.path().to_owned()])
        .await
        .unwrap_err();
    assert!(refused.contains("event_id"), "{refused}");
    assert_eq!(schema_status(&settings).await["revision"], taken["revision"]);
    // ...and a sidecar refuses it when it is put in the bucket anyway.
    let (_, broken) = compile(&[next.path().to_owned()], &files).unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let store = js.get_key_value("eventsieve").await.unwrap();
    store.put("schema", Bytes::from(broken)).await.unwrap();
    let status = wait_schema(&settings, |s| s.get("rejected").is_some()).await;
    assert_eq!(status["revision"], taken["revision"], "the schema in force stays");
    assert!(
        status["rejected"]["error"].as_str().unwrap().contains("event_id"),
        "{status}"
    );
    // Still served by the taken schema: keys read, coupons routed.
    assert_eq!(
        ask(&client, "dedup.ingest", with_coupon("c3")).await,
        Answer::Verdict(true)
    );
    tokio::time::timeout(Duration::from_secs(5), coupons.next())
        .await
        .unwrap()
        .unwrap();
    let text = running
        .metrics()
        .render(running.dedup(), std::time::Instant::now());
    assert!(text.contains("eventsieve_schema_rejected_total 1"), "{text}");

    // Reset: the configured schema again.
    eventsieve::control::schema::schema_reset(&settings)
        .await
        .unwrap();
    wait_schema(&settings, |s| s["revision"].as_u64() > taken["revision"].as_u64()).await;
    assert_eq!(
        ask(&client, "dedup.ingest", with_coupon("c4")).await,
        Answer::Verdict(true)
    );
    assert_silent(&mut coupons, "the configured schema has no coupon").await;
    running.shutdown().await.unwrap();
}
