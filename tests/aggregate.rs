//! Aggregates over the deduplicated stream against a real nats-server: the
//! query reply byte for byte, pane alignment, lateness, duplicates counted
//! once, two sidecars answering one merged query (and a partial one when a
//! node is gone), quantiles and the published medians.

mod common;

use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use common::*;
use eventsieve::config::{AggregateConfig, Durability, Settings};
use eventsieve::engine::unix_ms;
use eventsieve::service;
use futures_util::StreamExt;
use serde_json::Value;

fn with_aggregate(mut s: Settings, emit_every: &str) -> Settings {
    s.config.aggregate = vec![AggregateConfig {
        group: "metric_name".into(),
        value: "metric_value".into(),
        time: "timestamp".into(),
        pane: "1s".into(),
        max_window: "1h".into(),
        lateness: "5s".into(),
        emit_every: emit_every.into(),
        emit_window: "5s".into(),
        ..AggregateConfig::default()
    }];
    // Validated as from a file; the rest (shards owned) as the test set it.
    s.aggregates = s
        .config
        .clone()
        .validate()
        .expect("valid aggregate settings")
        .aggregates;
    s
}

fn metric(id: &str, name: &str, value: &str, t: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"event_id":"{id}","metric_name":"{name}","metric_value":{value},"timestamp":{t}}}"#
    ))
}

async fn send(client: &Client, id: &str, event: Bytes) -> Answer {
    ask(client, &format!("dedup.ingest.{id}"), event).await
}

async fn query(client: &Client, subject: &str, q: &str) -> String {
    let reply = request(client, subject, Bytes::from(q.to_owned())).await;
    String::from_utf8(reply.payload.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_reply_is_exact_aligned_to_panes_and_counts_each_event_once() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let s = with_aggregate(settings(&server, data.path(), "1h", Durability::Local), "");
    let running = service::start(s).await.unwrap();
    let client = server.client().await;
    let now = unix_ms() / 1000;
    // Out of order within the lateness, a duplicate, a late one, a value
    // that is not a number (accepted, not aggregated), another group.
    for (id, name, value, t, verdict) in [
        ("m1", "temperature", "10.0", now - 2, true),
        ("m2", "temperature", "40", now, true),
        ("m3", "temperature", "25.0", now - 4, true),
        ("m2", "temperature", "40", now, false),
        ("m4", "temperature", "99", now - 120, true),
        ("m5", "temperature", "\"hot\"", now, true),
        ("m6", "humidity", "-3.5", now, true),
    ] {
        assert_eq!(
            send(&client, id, metric(id, name, value, t)).await,
            Answer::Verdict(verdict),
            "{id}"
        );
    }
    let start = now - 30;
    let q = format!(
        r#"{{"metric_name":"temperature","start":{start},"end":{}}}"#,
        now + 30
    );
    assert_eq!(
        query(&client, "dedup.agg.query", &q).await,
        format!(
            r#"{{"metric_name":"temperature","time_window_start":{start},"time_window_end":{},"count":3,"sum":75.0,"avg":25.0,"min":10.0,"max":40.0}}"#,
            now + 30
        )
    );
    // Bounds inside panes widen to whole panes (1 s), and say so.
    let q = format!(
        r#"{{"metric_name":"humidity","start":{}.25,"end":{}.5}}"#,
        now, now
    );
    assert_eq!(
        query(&client, "dedup.agg.query", &q).await,
        format!(
            r#"{{"metric_name":"humidity","time_window_start":{now},"time_window_end":{},"count":1,"sum":-3.5,"avg":-3.5,"min":-3.5,"max":-3.5}}"#,
            now + 1
        )
    );
    // The last 60 s: up to the end of the current pane.
    let last: Value = serde_json::from_str(
        &query(
            &client,
            "dedup.agg.query",
            r#"{"metric_name":"temperature","window":"60s"}"#,
        )
        .await,
    )
    .unwrap();
    let end = last["time_window_end"].as_u64().unwrap();
    assert_eq!(end - last["time_window_start"].as_u64().unwrap(), 60);
    assert!(end > now && end <= unix_ms() / 1000 + 1, "{last}");
    assert_eq!(last["count"], 3);
    // Unknown group, empty window: count 0 and nulls.
    let q = format!(
        r#"{{"metric_name":"nothing","start":{start},"end":{}}}"#,
        now + 30
    );
    assert_eq!(
        query(&client, "dedup.agg.query", &q).await,
        format!(
            r#"{{"metric_name":"nothing","time_window_start":{start},"time_window_end":{},"count":0,"sum":0.0,"avg":null,"min":null,"max":null}}"#,
            now + 30
        )
    );
    // Quantiles.
    let q = format!(
        r#"{{"metric_name":"temperature","start":{start},"end":{},"q":0.5}}"#,
        now + 30
    );
    let median: Value = serde_json::from_str(&query(&client, "dedup.agg.quantile", &q).await).unwrap();
    assert_eq!(median["count"], 3);
    let v = median["value"].as_f64().unwrap();
    assert!((v - 25.0).abs() <= 0.25, "{median}");
    // Bad queries: 400 with the reason.
    for (bad, reason) in [
        ("nope", "not JSON"),
        (r#"{"other":"x","window":"60s"}"#, "names no aggregate"),
        (r#"{"metric_name":"temperature","window":"2h"}"#, "longer than"),
        (r#"{"metric_name":"temperature"}"#, "give \"window\""),
        (r#"{"metric_name":"temperature","window":"60s","q":2}"#, "\"q\""),
    ] {
        match ask(&client, "dedup.agg.quantile", Bytes::from(bad)).await {
            Answer::Error(400, why) => assert!(why.contains(reason), "{bad}: {why}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    let text = running
        .metrics()
        .render(running.dedup(), std::time::Instant::now());
    for line in [
        r#"eventsieve_aggregate_events_total{aggregate="metric_name",outcome="added"} 4"#,
        r#"eventsieve_aggregate_events_total{aggregate="metric_name",outcome="out_of_time"} 1"#,
        r#"eventsieve_aggregate_events_total{aggregate="metric_name",outcome="skipped"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }

    // A restart keeps the numbers (saved at stop, restored at start).
    let q = format!(
        r#"{{"metric_name":"temperature","start":{start},"end":{}}}"#,
        now + 30
    );
    let before = query(&client, "dedup.agg.query", &q).await;
    running.shutdown().await.unwrap();
    let again = with_aggregate(settings(&server, data.path(), "1h", Durability::Local), "");
    let running = service::start(again).await.unwrap();
    assert_eq!(query(&client, "dedup.agg.query", &q).await, before);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_answer_one_merged_query_and_say_when_one_is_missing() {
    let server = NatsServer::start();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (low, high) = split_settings(&server, dirs[0].path(), dirs[1].path());
    let (low, high) = (with_aggregate(low, "200ms"), with_aggregate(high, ""));
    let first = service::start(low).await.unwrap();
    let second = service::start(high).await.unwrap();
    let client = server.client().await;
    let mut medians = client.subscribe("dedup.median.>").await.unwrap();
    client.flush().await.unwrap();
    let now = unix_ms() / 1000;
    let mut values = Vec::new();
    for i in 0..200u32 {
        let id = format!("n{i}");
        let value = f64::from(i) * 1.5 - 40.0;
        values.push(value);
        assert_eq!(
            send(&client, &id, metric(&id, "latency", &value.to_string(), now)).await,
            Answer::Verdict(true)
        );
    }
    let sum: f64 = values.iter().sum();
    let q = format!(
        r#"{{"metric_name":"latency","start":{},"end":{}}}"#,
        now - 10,
        now + 10
    );
    let merged: Value = serde_json::from_str(&query(&client, "dedup.agg.query", &q).await).unwrap();
    assert_eq!(merged["count"], 200, "{merged}");
    assert!((merged["sum"].as_f64().unwrap() - sum).abs() < 1e-6, "{merged}");
    assert_eq!(merged["min"], -40.0);
    assert_eq!(merged["max"], 199.0 * 1.5 - 40.0);
    assert!(merged.get("partial").is_none(), "{merged}");

    // The median over both nodes, published by the owner of shard 0.
    values.sort_by(f64::total_cmp);
    let exact = values[(values.len() - 1) / 2];
    let message = tokio::time::timeout(Duration::from_secs(5), medians.next())
        .await
        .expect("a median within 5 s")
        .unwrap();
    assert_eq!(message.subject.as_str(), "dedup.median.latency");
    let m: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(m["metric_name"], "latency");
    let got = m["median_value"].as_f64().unwrap();
    assert!((got - exact).abs() <= 0.01 * exact.abs(), "{m} exact {exact}");
    assert!(m["timestamp_of_calculation"].as_f64().unwrap() >= now as f64);

    // Without the second node its shards are missing, and the reply says so.
    second.shutdown().await.unwrap();
    let partial: Value = serde_json::from_str(&query(&client, "dedup.agg.query", &q).await).unwrap();
    assert_eq!(partial["partial"], true, "{partial}");
    let missing: Vec<u64> = serde_json::from_value(partial["missing_shards"].clone()).unwrap();
    assert_eq!(missing, (16..32).collect::<Vec<u64>>());
    assert!(partial["count"].as_u64().unwrap() < 200);
    first.shutdown().await.unwrap();
}

/// The batch path hands the stage the fields its key parser read; a batch
/// must count exactly as the same events sent one by one (the single path
/// reads them in the stage), escaped names, wrong types and late events
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_counts_as_the_same_events_sent_one_by_one() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let s = with_aggregate(settings(&server, data.path(), "1h", Durability::Memory), "");
    let running = service::start(s).await.unwrap();
    let client = server.client().await;
    let now = unix_ms() / 1000;
    // (group as JSON text, value, time); the group is suffixed per path.
    let events: Vec<(String, String, u64)> = (0..300u64)
        .map(|i| {
            let group = match i % 5 {
                0 => "\"g\\u0041".to_string(), // escaped: "gA"
                _ => "\"gA".to_string(),
            };
            let value = match i % 7 {
                0 => "\"7\"".to_string(),
                1 => format!("{}e-1", i),
                _ => format!("{}", i as i64 - 150),
            };
            let t = if i % 11 == 0 { now - 300 } else { now - i % 4 };
            (group, value, t)
        })
        .collect();
    let line = |path: &str, i: usize, (group, value, t): &(String, String, u64)| {
        format!(
            r#"{{"event_id":"{path}{i}","metric_name":{group}{path}","metric_value":{value},"timestamp":{t}}}"#
        )
    };
    let body: Vec<String> = events.iter().enumerate().map(|(i, e)| line("b", i, e)).collect();
    let reply = request(&client, "dedup.batch", body.join("\n").into_bytes()).await;
    assert_eq!(
        reply.payload.iter().filter(|&&b| b == b'1').count(),
        events.len(),
        "all new"
    );
    for (i, e) in events.iter().enumerate() {
        let id = format!("s{i}");
        assert_eq!(
            send(&client, &id, Bytes::from(line("s", i, e))).await,
            Answer::Verdict(true)
        );
    }
    let q = |group: &str| {
        format!(
            r#"{{"metric_name":"{group}","start":{},"end":{}}}"#,
            now - 3600,
            now + 10
        )
    };
    let by_batch: Value = serde_json::from_str(&query(&client, "dedup.agg.query", &q("gAb")).await).unwrap();
    let by_one: Value = serde_json::from_str(&query(&client, "dedup.agg.query", &q("gAs")).await).unwrap();
    assert!(by_batch["count"].as_u64().unwrap() > 200, "{by_batch}");
    for field in ["count", "min", "max"] {
        assert_eq!(by_batch[field], by_one[field], "{field}: {by_batch} vs {by_one}");
    }
    // A batch adds its lines shard by shard: the sums differ only by the
    // rounding of another order.
    for field in ["sum", "avg"] {
        let (a, b) = (by_batch[field].as_f64().unwrap(), by_one[field].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-9 * b.abs().max(1.0),
            "{field}: {by_batch} vs {by_one}"
        );
    }
    running.shutdown().await.unwrap();
}
