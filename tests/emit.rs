//! Statistics published on a schedule (`[[aggregate.emit]]`) against a
//! real nats-server: exact means and counts on every tick, idle groups
//! published with count 0 and null values, and with two sidecars each
//! group published by exactly one of them, the groups spread over both.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_nats::Client;
use bytes::Bytes;
use common::*;
use eventsieve::config::{AggregateConfig, EmitConfig, Settings};
use eventsieve::engine::unix_ms;
use eventsieve::service;
use futures_util::StreamExt;
use serde_json::Value;

fn with_emissions(mut s: Settings) -> Settings {
    let emit = |stat: &str, subject: &str| EmitConfig {
        stat: stat.into(),
        window: "5s".into(),
        every: "200ms".into(),
        subject: subject.into(),
    };
    s.config.aggregate = vec![AggregateConfig {
        group: "metric_name".into(),
        value: "metric_value".into(),
        time: "timestamp".into(),
        pane: "1s".into(),
        max_window: "1h".into(),
        lateness: "5m".into(),
        emit: vec![
            emit("mean", "stats.mean.{group}"),
            emit("count", "stats.count.{group}"),
            emit("quantile(0.5)", "stats.median.{group}"),
        ],
        ..AggregateConfig::default()
    }];
    s.aggregates = s.config.clone().validate().expect("valid emissions").aggregates;
    s
}

fn metric(id: &str, name: &str, value: f64, t: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"event_id":"{id}","metric_name":"{name}","metric_value":{value},"timestamp":{t}}}"#
    ))
}

async fn send(client: &Client, id: &str, event: Bytes) {
    assert_eq!(
        ask(client, &format!("dedup.ingest.{id}"), event).await,
        Answer::Verdict(true)
    );
}

/// The messages on `stats.>` for `wait`, parsed, with their subjects.
async fn collect(sub: &mut async_nats::Subscriber, wait: Duration) -> Vec<(String, Value)> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline.into(), sub.next()).await {
        out.push((m.subject.to_string(), serde_json::from_slice(&m.payload).unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tick_carries_exact_statistics_and_idle_groups_go_quiet_visibly() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let s = with_emissions(settings(
        &server,
        data.path(),
        "1h",
        eventsieve::config::Durability::Local,
    ));
    let running = service::start(s).await.unwrap();
    let client = server.client().await;
    let now = unix_ms() / 1000;
    for (i, v) in [10.0, 20.0, 45.0].into_iter().enumerate() {
        send(&client, &format!("a{i}"), metric(&format!("a{i}"), "cpu", v, now)).await;
    }
    // A group whose only event is a minute old: in max_window, not in the 5 s window.
    send(&client, "q0", metric("q0", "quiet", 7.0, now - 60)).await;
    let mut sub = client.subscribe("stats.>").await.unwrap();
    let got = collect(&mut sub, Duration::from_millis(2500)).await;
    let of =
        |subject: &str| -> Vec<&Value> { got.iter().filter(|(s, _)| s == subject).map(|(_, v)| v).collect() };

    let means = of("stats.mean.cpu");
    assert!(
        (4..=14).contains(&means.len()),
        "about one every 200 ms for 2 s: {}",
        means.len()
    );
    for m in &means {
        assert_eq!(m["metric_name"], "cpu");
        assert_eq!(m["stat"], "mean");
        assert_eq!(m["value"], 25.0, "exact: {m}");
        assert_eq!(m["count"], 3);
        let (start, end) = (
            m["window_start"].as_f64().unwrap(),
            m["window_end"].as_f64().unwrap(),
        );
        assert_eq!(end - start, 5.0, "{m}");
        assert!(start <= now as f64 && (now as f64) < end, "{m}");
        assert!(m.get("partial").is_none(), "{m}");
    }
    let ticks: Vec<f64> = means
        .iter()
        .map(|m| m["timestamp_of_calculation"].as_f64().unwrap())
        .collect();
    let gaps: Vec<f64> = ticks.windows(2).map(|w| w[1] - w[0]).collect();
    let mean_gap = gaps.iter().sum::<f64>() / gaps.len() as f64;
    assert!((0.1..=0.4).contains(&mean_gap), "every 200 ms: {gaps:?}");
    assert!(
        of("stats.median.cpu")
            .iter()
            .all(|m| m["value"].as_f64().is_some_and(|v| (v - 20.0).abs() <= 0.2))
    );

    // The quiet group: every tick too (once the groups within max_window
    // are gathered again, every second), with count 0 and no value.
    let quiet = of("stats.mean.quiet");
    assert!(quiet.len() >= 3, "idle groups are published: {}", quiet.len());
    assert!(
        quiet.iter().all(|m| m["count"] == 0 && m["value"].is_null()),
        "{quiet:?}"
    );
    assert!(of("stats.count.quiet").iter().all(|m| m["value"] == 0.0));
    assert!(of("stats.median.quiet").iter().all(|m| m["value"].is_null()));
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_sidecars_each_group_has_exactly_one_emitter() {
    let server = NatsServer::start();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (low, high) = split_settings(&server, dirs[0].path(), dirs[1].path());
    let (mut low, mut high) = (with_emissions(low), with_emissions(high));
    low.config.cluster.node_id = "low".into();
    high.config.cluster.node_id = "high".into();
    low.node_id = "low".into();
    high.node_id = "high".into();
    let first = service::start(low).await.unwrap();
    let second = service::start(high).await.unwrap();
    let client = server.client().await;
    let now = unix_ms() / 1000;
    let groups: Vec<String> = (0..24).map(|g| format!("g{g}")).collect();
    let mut sums = BTreeMap::new();
    for (i, g) in groups.iter().cycle().take(120).enumerate() {
        let v = (i % 7) as f64;
        *sums.entry(g.clone()).or_insert((0.0, 0)) = {
            let (s, n) = sums.get(g).copied().unwrap_or((0.0, 0));
            (s + v, n + 1)
        };
        send(&client, &format!("e{i}"), metric(&format!("e{i}"), g, v, now)).await;
    }
    let mut sub = client.subscribe("stats.mean.>").await.unwrap();
    let got = collect(&mut sub, Duration::from_millis(2000)).await;
    let mut by_group: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for (_, m) in &got {
        by_group
            .entry(m["metric_name"].as_str().unwrap().to_owned())
            .or_default()
            .push(m);
    }
    assert_eq!(by_group.keys().cloned().collect::<Vec<_>>(), {
        let mut g = groups.clone();
        g.sort();
        g
    });
    let mut emitters = BTreeSet::new();
    for (group, messages) in &by_group {
        let nodes: BTreeSet<&str> = messages.iter().map(|m| m["node"].as_str().unwrap()).collect();
        assert_eq!(nodes.len(), 1, "{group}: one emitter, got {nodes:?}");
        emitters.extend(nodes);
        assert!(
            messages.len() <= 14,
            "{group}: once a tick, not once a node: {}",
            messages.len()
        );
        let (sum, n) = sums[group];
        for m in messages {
            assert_eq!(m["count"], n, "merged over both nodes: {m}");
            assert!(
                (m["value"].as_f64().unwrap() - sum / n as f64).abs() < 1e-9,
                "{m}"
            );
        }
    }
    assert_eq!(
        emitters,
        BTreeSet::from(["high", "low"]),
        "groups spread over both nodes"
    );
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_items_per_group_with_their_totals_and_the_bound() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut s = settings(&server, data.path(), "1h", eventsieve::config::Durability::Local);
    s.config.aggregate = vec![AggregateConfig {
        group: "category".into(),
        value: "amount".into(),
        time: "timestamp".into(),
        item: "product".into(),
        lateness: "5m".into(),
        emit: vec![EmitConfig {
            stat: "top(3)".into(),
            window: "10s".into(),
            every: "200ms".into(),
            subject: "stats.top.{group}".into(),
        }],
        ..AggregateConfig::default()
    }];
    s.aggregates = s.config.clone().validate().unwrap().aggregates;
    let running = service::start(s).await.unwrap();
    let client = server.client().await;
    let now = unix_ms() / 1000;
    // Totals: p1 100, p2 60, p3 35, p4 20, p5 4; a duplicate of a p1 sale
    // is not counted; one hats sale.
    let sales = [
        ("p1", 40.0),
        ("p2", 30.0),
        ("p1", 60.0),
        ("p3", 35.0),
        ("p2", 30.0),
        ("p4", 20.0),
        ("p5", 4.0),
    ];
    let mut body = Vec::new();
    for (i, (product, amount)) in sales.iter().enumerate() {
        body.push(format!(
            r#"{{"event_id":"s{i}","category":"shoes","product":"{product}","amount":{amount},"timestamp":{now}}}"#
        ));
    }
    body.push(format!(
        r#"{{"event_id":"s0","category":"shoes","product":"p1","amount":40,"timestamp":{now}}}"#
    ));
    body.push(format!(
        r#"{{"event_id":"h0","category":"hats","product":"h1","amount":9,"timestamp":{now}}}"#
    ));
    let mut sub = client.subscribe("stats.top.>").await.unwrap();
    request(&client, "dedup.batch", body.join("\n").into_bytes()).await;
    let got = collect(&mut sub, Duration::from_millis(1500)).await;
    let shoes = got
        .iter()
        .rev()
        .find(|(s, m)| s == "stats.top.shoes" && m["count"] == 7)
        .map(|(_, m)| m)
        .unwrap_or_else(|| panic!("no complete shoes message: {got:?}"));
    assert_eq!(shoes["stat"], "top(3)");
    assert!(shoes["value"].is_null());
    let items: Vec<(&str, f64, f64)> = shoes["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["item"].as_str().unwrap(),
                i["total"].as_f64().unwrap(),
                i["error"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        items,
        vec![("p1", 100.0, 0.0), ("p2", 60.0, 0.0), ("p3", 35.0, 0.0)],
        "{shoes}"
    );
    // W / m: 219 of value over the 30 counters of top(3).
    assert!(
        (shoes["bound"].as_f64().unwrap() - 219.0 / 30.0).abs() < 1e-9,
        "{shoes}"
    );
    let hats = got.iter().rev().find(|(s, _)| s == "stats.top.hats").unwrap();
    assert_eq!(
        hats.1["items"],
        serde_json::json!([{ "item": "h1", "total": 9.0, "error": 0.0 }])
    );
    running.shutdown().await.unwrap();
}

/// `GET url`: the status and body.
async fn http_get(url: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{url}: {e}"),
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_over_http_answer_as_over_nats_and_emissions_stream_as_events() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut s = with_emissions(settings(
        &server,
        data.path(),
        "1h",
        eventsieve::config::Durability::Local,
    ));
    let port = free_port();
    s.http_addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let running = service::start(s).await.unwrap();
    let client = server.client().await;
    let now = unix_ms() / 1000;
    for (i, v) in [3.0, 9.0, 27.5].into_iter().enumerate() {
        send(
            &client,
            &format!("h{i}"),
            metric(&format!("h{i}"), "disk io", v, now),
        )
        .await;
    }
    let base = format!("http://127.0.0.1:{port}/api/v1/aggregates/metric_name");
    let (start, end) = (now - 30, now + 30);
    let nats = |subject: &'static str, q: String| {
        let client = client.clone();
        async move { String::from_utf8(request(&client, subject, Bytes::from(q)).await.payload.to_vec()).unwrap() }
    };
    let by_nats = nats(
        "dedup.agg.query",
        format!(r#"{{"aggregate":"metric_name","metric_name":"disk io","start":{start},"end":{end}}}"#),
    )
    .await;
    let (code, by_http) = http_get(format!("{base}?metric_name=disk%20io&start={start}&end={end}")).await;
    assert_eq!((code, by_http.as_str()), (200, by_nats.as_str()));
    assert!(by_http.contains(r#""count":3"#), "{by_http}");
    let by_nats = nats(
        "dedup.agg.quantile",
        format!(
            r#"{{"aggregate":"metric_name","metric_name":"disk io","start":{start},"end":{end},"q":0.9}}"#
        ),
    )
    .await;
    let (code, by_http) = http_get(format!(
        "{base}/quantile?metric_name=disk+io&start={start}&end={end}&q=0.9"
    ))
    .await;
    assert_eq!((code, by_http.as_str()), (200, by_nats.as_str()));

    let (code, body) = http_get(format!("{base}?metric_name=cpu&window=10x")).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("window"), "names the parameter: {body}");
    let (code, body) = http_get(format!(
        "http://127.0.0.1:{port}/api/v1/aggregates/nope?g=1&window=60s"
    ))
    .await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("nope"), "{body}");
    let (code, _) = http_get(format!("http://127.0.0.1:{port}/api/v1/stats?subject=$SYS.>")).await;
    assert_eq!(code, 400);

    // The emissions as Server-Sent Events, in order.
    let url = format!("http://127.0.0.1:{port}/api/v1/stats?subject=stats.mean.>");
    let events = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let response = ureq::get(&url).call().unwrap();
        assert_eq!(response.header("Content-Type"), Some("text/event-stream"));
        let mut lines = std::io::BufReader::new(response.into_reader()).lines();
        let mut events = Vec::new();
        while events.len() < 4 {
            let line = lines.next().unwrap().unwrap();
            if let Some(data) = line.strip_prefix("data: ") {
                events.push(serde_json::from_str::<Value>(data).unwrap());
            }
        }
        events
    });
    let events = tokio::time::timeout(Duration::from_secs(10), events)
        .await
        .unwrap()
        .unwrap();
    let ticks: Vec<f64> = events
        .iter()
        .filter(|e| e["metric_name"] == "disk io")
        .map(|e| e["timestamp_of_calculation"].as_f64().unwrap())
        .collect();
    assert!(
        ticks.len() >= 2 && ticks.windows(2).all(|w| w[0] < w[1]),
        "in order: {events:?}"
    );
    assert!(events.iter().all(|e| e["stat"] == "mean"));
    running.shutdown().await.unwrap();
}
