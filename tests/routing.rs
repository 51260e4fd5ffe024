//! Routing rules against a real nats-server: the brief's example end to
//! end, per-rule counters and shadow rules, sets replaced in the KV bucket
//! while events flow (each request routed by one version, nothing lost),
//! broken sets refused with the old one still routing, and `rules test`
//! over NATS and from the command line.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_nats::Client;
use bytes::Bytes;
use common::*;
use eventsieve::config::{Durability, RoutingSpec};
use eventsieve::engine::batch::{self, Entry};
use eventsieve::service;
use futures_util::StreamExt;

/// The shipped example, and a shadow rule.
const BRIEF: &str = concat!(
    include_str!("../config/rules.example.toml"),
    r#"
[[rule]]
name = "small_orders"
when = 'event.type == "order_placed" && event.total < 100.0'
to = ["never.sent"]
shadow = true
"#
);

fn order(id: &str, kind: &str, total: Option<f64>) -> Bytes {
    let total = total.map_or(String::new(), |t| format!(",\"total\":{t}"));
    Bytes::from(format!(r#"{{"event_id":"{id}","type":"{kind}"{total}}}"#))
}

/// The `event_id`s of the messages `sub` got within `wait` (a batch's
/// lines each), with the subject each came on.
async fn received(sub: &mut async_nats::Subscriber, wait: Duration) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(wait, sub.next()).await {
        for line in m.payload.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_slice(line).unwrap();
            out.push((m.subject.to_string(), v["event_id"].as_str().unwrap().to_owned()));
        }
    }
    out
}

fn ids(got: &[(String, String)]) -> BTreeSet<String> {
    got.iter().map(|(_, id)| id.clone()).collect()
}

fn set_of(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in the metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brief_s_example_end_to_end_with_counters_and_a_shadow_rule() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut s = settings(&server, data.path(), "1h", Durability::Local);
    s.config.routing = RoutingSpec::parse(BRIEF).unwrap();
    let running = service::start(s).await.unwrap();
    let client = server.client().await;
    let mut fraud = client.subscribe("fraud.orders").await.unwrap();
    let mut default = client.subscribe("events.unique.*").await.unwrap();
    let mut errors = client.subscribe("events.rule_errors").await.unwrap();
    let mut never = client.subscribe("never.>").await.unwrap();
    client.flush().await.unwrap();

    // Singles.
    for (id, kind, total, new) in [
        ("o1", "order_placed", Some(1500.0), true),
        ("o2", "order_placed", Some(10.0), true),
        ("h1", "heartbeat", None, true),
        ("o1", "order_placed", Some(1500.0), false),
        ("o3", "order_placed", None, true),
    ] {
        let answer = ask(&client, &format!("dedup.ingest.{id}"), order(id, kind, total)).await;
        assert_eq!(answer, Answer::Verdict(new), "{id}");
    }
    // A batch: its lines of one destination and shard go together.
    let lines = [
        order("b1", "order_placed", Some(2000.0)),
        order("b2", "order_placed", Some(50.0)),
        order("b3", "heartbeat", None),
        order("b1", "order_placed", Some(2000.0)),
        order("b4", "page_view", None),
    ];
    let body: Vec<u8> = lines.iter().flat_map(|l| [&l[..], b"\n"].concat()).collect();
    let reply = request(&client, "dedup.batch", body).await;
    assert_eq!(
        batch::decode(&reply.payload).unwrap(),
        [Entry::New, Entry::New, Entry::New, Entry::Duplicate, Entry::New]
    );

    let wait = Duration::from_millis(500);
    let fraud = received(&mut fraud, wait).await;
    let default = received(&mut default, wait).await;
    let errors = received(&mut errors, wait).await;
    assert_eq!(ids(&fraud), set_of(&["o1", "b1"]), "orders over 1000");
    assert_eq!(
        ids(&default),
        set_of(&["o1", "o2", "b1", "b2", "b4"]),
        "and the default, heartbeats nowhere"
    );
    assert_eq!(
        ids(&errors),
        set_of(&["o3"]),
        "an order without a total cannot be decided"
    );
    for got in [&fraud, &default, &errors] {
        assert_eq!(got.len(), ids(got).len(), "each once, duplicates never: {got:?}");
    }
    assert!(
        received(&mut never, Duration::from_millis(100)).await.is_empty(),
        "shadow rules send nothing"
    );

    let text = running.metrics().render(running.dedup(), Instant::now());
    assert_eq!(
        metric(&text, "eventsieve_rule_matches_total{rule=\"fraud_big_orders\"} "),
        2
    );
    assert_eq!(
        metric(&text, "eventsieve_rule_matches_total{rule=\"drop_heartbeats\"} "),
        2
    );
    assert_eq!(
        metric(&text, "eventsieve_rule_matches_total{rule=\"small_orders\"} "),
        2,
        "o2 and b2"
    );
    assert_eq!(
        metric(&text, "eventsieve_rule_errors_total{rule=\"fraud_big_orders\"} "),
        1,
        "o3"
    );
    running.shutdown().await.unwrap();
}

/// The `rules` part of every sidecar's status.
async fn rules_status(client: &Client) -> serde_json::Value {
    let reply = request(client, "dedup.status", Bytes::new()).await;
    let status: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    status["rules"].clone()
}

/// Waits until the sidecar runs rules revision `revision`.
async fn wait_revision(client: &Client, revision: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while rules_status(client).await["revision"] != revision {
        assert!(
            Instant::now() < deadline,
            "revision {revision} not in force within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_replaced_under_load_route_each_request_by_one_version_and_broken_ones_are_refused() {
    let server = NatsServer::start();
    let (_data, running) = start_sidecar(&server, "1h", Durability::Local).await;
    let settings = settings(
        &server,
        std::path::Path::new("/nonexistent"),
        "1h",
        Durability::Local,
    );
    let client = server.client().await;
    let mut routed = client.subscribe("v.>").await.unwrap();
    client.flush().await.unwrap();
    let version =
        |n: u32| format!("default = \"\"\n[[rule]]\nname = \"all\"\nwhen = 'true'\nto = [\"v.{n}\"]\n");

    let done = eventsieve::control::rules::rules_set(&settings, &version(1))
        .await
        .unwrap();
    assert!(done.contains("revision"), "{done}");
    let kv = async_nats::jetstream::new(client.clone())
        .get_key_value("eventsieve")
        .await
        .unwrap();
    let first = kv.entry("rules").await.unwrap().unwrap().revision;
    wait_revision(&client, first).await;

    // Batches flow while the set is replaced twice.
    let (batches, per_batch) = (150, 10);
    let producer = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut sent = BTreeMap::new();
            for b in 0..batches {
                let ids: Vec<String> = (0..per_batch).map(|i| format!("r{b}x{i}")).collect();
                let body: Vec<u8> = ids
                    .iter()
                    .flat_map(|id| [&event(id)[..], b"\n"].concat())
                    .collect();
                let reply = request(&client, "dedup.batch", body).await;
                let entries = batch::decode(&reply.payload).unwrap();
                assert!(entries.iter().all(|e| *e == Entry::New), "{entries:?}");
                sent.insert(b, ids);
            }
            sent
        })
    };
    for n in [2, 3] {
        tokio::time::sleep(Duration::from_millis(30)).await;
        eventsieve::control::rules::rules_set(&settings, &version(n))
            .await
            .unwrap();
    }
    let sent = producer.await.unwrap();
    let got = received(&mut routed, Duration::from_millis(700)).await;
    let mut by_id: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (subject, id) in &got {
        by_id.entry(id.as_str()).or_default().push(subject.as_str());
    }
    let versions: BTreeSet<&str> = got.iter().map(|(s, _)| s.as_str()).collect();
    assert!(
        versions.len() >= 2,
        "the set changed while events flowed: {versions:?}"
    );
    for ids in sent.values() {
        let subjects: BTreeSet<&str> = ids
            .iter()
            .map(|id| match by_id.get(id.as_str()).map(Vec::as_slice) {
                Some([one]) => *one,
                other => panic!("{id} routed {other:?}: must be once"),
            })
            .collect();
        assert_eq!(
            subjects.len(),
            1,
            "a batch is routed by one version: {subjects:?}"
        );
    }

    // A broken set put straight into the bucket (as `nats kv put` would)
    // is refused; the one in force keeps routing.
    let in_force = kv.entry("rules").await.unwrap().unwrap().revision;
    wait_revision(&client, in_force).await;
    let broken = kv
        .put(
            "rules",
            Bytes::from_static(b"[[rule]]\nname = \"x\"\nwhen = 'event.a ==' \n"),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rules_status(&client).await["rejected"]["revision"] != broken {
        assert!(
            Instant::now() < deadline,
            "the broken set was not refused within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rules_status(&client).await["revision"], in_force);
    assert_eq!(
        ask(&client, "dedup.ingest.after1", event("after1")).await,
        Answer::Verdict(true)
    );
    let got = received(&mut routed, Duration::from_millis(300)).await;
    assert_eq!(got, [("v.3".to_string(), "after1".to_string())]);
    // The command refuses it before writing anything.
    let err = eventsieve::control::rules::rules_set(&settings, "[[rule]]\nname = \"x\"\nwhen = '('\n")
        .await
        .unwrap_err();
    assert!(err.contains("rule \"x\": when"), "{err}");
    assert_eq!(kv.entry("rules").await.unwrap().unwrap().revision, broken);
    let text = running.metrics().render(running.dedup(), Instant::now());
    assert_eq!(metric(&text, "eventsieve_rules_rejected_total "), 1);

    // Deleting the key brings back the configuration's rules (none).
    kv.delete("rules").await.unwrap();
    let mut default = client.subscribe("events.unique.*").await.unwrap();
    client.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rules_status(&client).await["rules"] != 0 {
        assert!(
            Instant::now() < deadline,
            "the configured rules not back within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        ask(&client, "dedup.ingest.after2", event("after2")).await,
        Answer::Verdict(true)
    );
    assert_eq!(
        ids(&received(&mut default, Duration::from_millis(300)).await),
        set_of(&["after2"])
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_test_says_where_events_would_go_over_nats_and_from_the_command_line() {
    let server = NatsServer::start();
    let (_data, running) = start_sidecar(&server, "1h", Durability::Local).await;
    let client = server.client().await;
    let events = [
        r#"{"event_id":"t1","type":"order_placed","total":5000}"#,
        r#"{"event_id":"t2","type":"heartbeat"}"#,
        r#"{"event_id":"t3","type":"order_placed"}"#,
    ];
    let request_body = serde_json::json!({ "rules": BRIEF, "events": events });
    let reply = request(&client, "dedup.rules.test", request_body.to_string()).await;
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results[0]["matched"], serde_json::json!(["fraud_big_orders"]));
    let to = |i: usize| results[i]["to"].clone();
    assert_eq!(to(0)[0], "fraud.orders");
    assert!(to(0)[1].as_str().unwrap().starts_with("events.unique."));
    assert_eq!(to(1), serde_json::json!([]), "heartbeats nowhere");
    assert_eq!(results[2]["error"]["rule"], "fraud_big_orders");
    assert_eq!(to(2), serde_json::json!(["events.rule_errors"]));
    // Nothing was routed or counted by a test.
    let text = running.metrics().render(running.dedup(), Instant::now());
    assert!(
        !text.contains("eventsieve_rule_matches_total{"),
        "a test counts nothing"
    );
    // A broken set: a clear error.
    let bad = serde_json::json!({ "rules": "[[rule]]\nname = \"a\"\nwhen = 'nope(1)'\n", "events": [] });
    let reply = request(&client, "dedup.rules.test", bad.to_string()).await;
    assert!(
        parse_error(&reply).contains("unknown function"),
        "{:?}",
        parse_error(&reply)
    );

    // The command line, without a server.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), BRIEF).unwrap();
    std::fs::write(dir.path().join("events.jsonl"), events.join("\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eventsieve"))
        .args(["rules", "test"])
        .arg(dir.path().join("rules.toml"))
        .arg(dir.path().join("events.jsonl"))
        .env("EVENTSIEVE_NATS__URL", server.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["to"][0], "fraud.orders");
    assert_eq!(lines[1]["matched"], serde_json::json!(["drop_heartbeats"]));
    running.shutdown().await.unwrap();
}

/// The reason of an error reply.
fn parse_error(message: &async_nats::Message) -> String {
    let headers = message.headers.as_ref().expect("an error reply");
    headers
        .get("Nats-Service-Error")
        .expect("an error reply")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_jetstream_output_a_set_sending_where_no_stream_listens_is_refused() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut s = settings(&server, data.path(), "1h", Durability::Local);
    s.config.output = eventsieve::config::OutputKind::Jetstream;
    // At start: the configured set is refused, and the sidecar does not start.
    let mut bad = s.clone();
    bad.config.routing =
        RoutingSpec::parse("[[rule]]\nname = \"a\"\nwhen = 'true'\nto = [\"no.stream\"]\n").unwrap();
    let err = service::start(bad).await.err().expect("refused");
    assert!(
        err.to_string().contains("no.stream is in no JetStream stream"),
        "{err}"
    );
    // At run time: refused, the set in force stays.
    let running = service::start(s).await.unwrap();
    let client = server.client().await;
    let kv = async_nats::jetstream::new(client.clone())
        .get_key_value("eventsieve")
        .await
        .unwrap();
    let put = kv
        .put(
            "rules",
            Bytes::from_static(b"[[rule]]\nname = \"a\"\nwhen = 'true'\nto = [\"no.stream\"]\n"),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rules_status(&client).await["rejected"]["revision"] != put {
        assert!(Instant::now() < deadline, "not refused within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let why = rules_status(&client).await["rejected"]["error"].clone();
    assert!(why.as_str().unwrap().contains("in no JetStream stream"), "{why}");
    assert_eq!(rules_status(&client).await["revision"], 0);
    assert_eq!(
        ask(&client, "dedup.ingest.j1", event("j1")).await,
        Answer::Verdict(true)
    );
    running.shutdown().await.unwrap();
}

/// Rules on `subject`: each copy says where its request came in.
const BY_SUBJECT: &str = r#"
default = ""

[[rule]]
name = "from_ingest"
when = 'subject == "dedup.ingest"'
to = ["via.ingest"]

[[rule]]
name = "from_batch"
when = 'subject == "dedup.batch"'
to = ["via.batch"]

[[rule]]
name = "sent_to_the_shard"
when = 'subject.startsWith("dedup.shard.") && subject.endsWith("." + key)'
to = ["via.shard"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_see_the_subject_the_producer_used_even_when_a_node_forwards_the_event() {
    let server = NatsServer::start();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (mut low, mut high) = split_settings(&server, dirs[0].path(), dirs[1].path());
    low.config.routing = RoutingSpec::parse(BY_SUBJECT).unwrap();
    high.config.routing = low.config.routing.clone();
    let first = service::start(low).await.unwrap();
    let second = service::start(high).await.unwrap();
    let client = server.client().await;
    let mut via = client.subscribe("via.*").await.unwrap();
    client.flush().await.unwrap();

    // Ids of both halves: whichever node takes a request, half of them
    // are forwarded to the other.
    let ids: Vec<String> = (0..16).map(|i| format!("s{i}")).collect();
    let halves: BTreeSet<bool> = ids
        .iter()
        .map(|id| eventsieve::engine::shard::shard_of(id, 32) < 16)
        .collect();
    assert_eq!(halves.len(), 2, "ids of both nodes");
    let (singles, rest) = ids.split_at(6);
    let (batched, direct) = rest.split_at(5);
    for id in singles {
        // A producer's own `Eventsieve-Subject` on the ingest subject is
        // not taken for a forwarding node's.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Eventsieve-Subject", "dedup.batch");
        let reply = client
            .request_with_headers("dedup.ingest", headers, order(id, "order_placed", None))
            .await
            .unwrap();
        assert_eq!(&reply.payload[..], br#"{"accepted":true}"#, "{id}");
    }
    let body: Vec<u8> = batched
        .iter()
        .flat_map(|id| [&order(id, "order_placed", None)[..], b"\n"].concat())
        .collect();
    let reply = request(&client, "dedup.batch", body).await;
    assert_eq!(
        batch::decode(&reply.payload).unwrap(),
        vec![Entry::New; batched.len()]
    );
    for id in direct {
        let shard = eventsieve::engine::shard::shard_of(id, 32);
        let subject = format!("dedup.shard.{shard}.{id}");
        assert_eq!(
            ask(&client, &subject, order(id, "order_placed", None)).await,
            Answer::Verdict(true)
        );
    }

    let got = received(&mut via, Duration::from_millis(500)).await;
    let by: BTreeMap<&str, BTreeSet<String>> = got.iter().fold(BTreeMap::new(), |mut by, (subject, id)| {
        by.entry(subject.as_str()).or_default().insert(id.clone());
        by
    });
    let expect = |ids: &[String]| ids.iter().cloned().collect::<BTreeSet<_>>();
    assert_eq!(by.get("via.ingest"), Some(&expect(singles)), "{got:?}");
    assert_eq!(by.get("via.batch"), Some(&expect(batched)), "{got:?}");
    assert_eq!(by.get("via.shard"), Some(&expect(direct)), "{got:?}");
    assert_eq!(got.len(), ids.len(), "each once: {got:?}");
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}
