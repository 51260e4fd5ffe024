//! The window changed while serving, against a real nats-server: through
//! the KV bucket's `window` key with `eventsieve window` (the binary), and
//! through `<prefix>.window` requests without a bucket; kept across
//! restarts, applied by every sidecar, and never claiming ids the journal
//! no longer holds.

mod common;

use std::process::{Command, Output};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use common::*;
use eventsieve::config::{Durability, Settings};
use eventsieve::control::gather;
use eventsieve::service;
use serde_json::Value;

/// Runs `eventsieve <args>` against `server`.
fn cli(server: &NatsServer, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_eventsieve"))
        .args(args)
        .env("EVENTSIEVE_NATS__URL", server.url())
        .env("EVENTSIEVE_LOG", "warn")
        .output()
        .expect("run eventsieve");
    assert!(
        out.status.success(),
        "eventsieve {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every sidecar's reply to `<prefix>.window` with `payload`.
async fn windows(client: &Client, payload: &'static str) -> Vec<Value> {
    let replies = gather(
        client,
        "dedup.window".into(),
        Bytes::from_static(payload.as_bytes()),
    )
    .await
    .unwrap();
    replies
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap_or_else(|_| panic!("{m:?}")))
        .collect()
}

async fn verdict(client: &Client, id: &str) -> Answer {
    ask(client, &format!("dedup.ingest.{id}"), event(id)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_set_in_the_bucket_reaches_every_sidecar_and_holds_across_restarts() {
    let server = NatsServer::start();
    let client = server.client().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (low, high) = split_settings(&server, dirs[0].path(), dirs[1].path());
    let mut nodes = vec![
        service::start(low.clone()).await.unwrap(),
        service::start(high.clone()).await.unwrap(),
    ];
    let old: Vec<String> = (0..20).map(|i| format!("old{i}")).collect();
    for id in &old {
        assert_eq!(verdict(&client, id).await, Answer::Verdict(true));
    }
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(verdict(&client, "fresh1").await, Answer::Verdict(true));

    // 3 s: the ids of 3.5 s ago are forgotten at once, the fresh one is not.
    let out = cli(&server, &["window", "set", "3s"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.lines().count(), 2, "one line per sidecar: {said}");
    assert!(
        said.lines()
            .all(|l| l.contains("window 3s (run-time, kept in kv:eventsieve/window)")),
        "{said}"
    );
    for node in &nodes {
        assert_eq!(node.dedup().window_ms(), 3000);
        assert_eq!(node.metrics().window_ms.load(Relaxed), 3000);
        assert_eq!(node.metrics().window_changes.load(Relaxed), 1);
    }
    assert_eq!(verdict(&client, "fresh1").await, Answer::Verdict(false));
    for id in &old {
        assert_eq!(
            verdict(&client, id).await,
            Answer::Verdict(true),
            "{id} is older than the new window"
        );
    }
    let kv = async_nats::jetstream::new(client.clone())
        .get_key_value("eventsieve")
        .await
        .unwrap();
    assert_eq!(kv.get("window").await.unwrap().as_deref(), Some(&b"3s"[..]));

    // What is put in the bucket directly applies too; what is not a window
    // is ignored and counted.
    kv.put("window", Bytes::from_static(b"soon")).await.unwrap();
    kv.put("window", Bytes::from_static(b"4s")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for node in &nodes {
        assert_eq!(node.dedup().window_ms(), 4000);
        assert_eq!(node.metrics().window_rejected.load(Relaxed), 1);
    }

    // A restart reads the key before rebuilding the tables.
    for node in nodes.drain(..) {
        node.shutdown().await.unwrap();
    }
    let first = service::start(low.clone()).await.unwrap();
    assert_eq!(first.dedup().window_ms(), 4000, "configured 1h, kept 4s");
    first.shutdown().await.unwrap();

    // Reset with no sidecar running: the CLI deletes the key itself. The
    // journal expired ids at 4 s, so the configured hour is in force only
    // as far as the ids it still holds reach.
    let out = cli(&server, &["window", "reset"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no sidecar answered"),
        "{out:?}"
    );
    assert_eq!(kv.get("window").await.unwrap(), None);
    let first = service::start(low).await.unwrap();
    let second = service::start(high).await.unwrap();
    for w in windows(&client, "").await {
        assert_eq!(w["window_ms"], 3_600_000, "{w}");
        assert_eq!(w["source"], "config", "{w}");
        let in_force = w["in_force_ms"].as_u64().unwrap();
        assert!(
            in_force < 60_000,
            "the journal holds a few seconds of ids, not an hour: {w}"
        );
    }
    // Status shows every node, its shards and its window.
    let out = cli(&server, &["status"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("shards 0-15 of 32 (16 ready)") && said.contains("shards 16-31 of 32 (16 ready)"),
        "{said}"
    );
    assert!(said.lines().all(|l| l.contains("window 1h")), "{said}");
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

fn without_bucket(server: &NatsServer, dir: &std::path::Path, owned: std::ops::Range<u32>) -> Settings {
    let mut s = settings(server, dir, "1h", Durability::Local);
    s.config.kv_bucket = String::new();
    s.owned = owned.collect();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_bucket_every_sidecar_takes_the_request_and_keeps_it_in_its_data_dir() {
    let server = NatsServer::start();
    let client = server.client().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let low = without_bucket(&server, dirs[0].path(), 0..16);
    let high = without_bucket(&server, dirs[1].path(), 16..32);
    let first = service::start(low.clone()).await.unwrap();
    let second = service::start(high).await.unwrap();

    let set = windows(&client, "2h").await;
    assert_eq!(set.len(), 2, "{set:?}");
    for w in &set {
        assert_eq!(w["window_ms"], 7_200_000, "{w}");
        assert!(w["kept_in"].as_str().unwrap().starts_with("file:"), "{w}");
    }
    for dir in &dirs {
        assert_eq!(
            std::fs::read_to_string(dir.path().join("window")).unwrap(),
            "2h\n"
        );
    }

    // Not a window: every node says why and keeps its window.
    let refused = gather(&client, "dedup.window".into(), Bytes::from_static(b"8d"))
        .await
        .unwrap();
    assert_eq!(refused.len(), 2);
    for reply in &refused {
        let headers = reply.headers.as_ref().expect("an error reply");
        assert_eq!(headers.get("Nats-Service-Error-Code").unwrap().as_str(), "400");
        assert!(
            headers
                .get("Nats-Service-Error")
                .unwrap()
                .as_str()
                .contains("1ms to 7d"),
            "{headers:?}"
        );
    }
    assert_eq!(first.dedup().window_ms(), 7_200_000);
    assert_eq!(second.dedup().window_ms(), 7_200_000);

    first.shutdown().await.unwrap();
    let first = service::start(low).await.unwrap();
    assert_eq!(first.dedup().window_ms(), 7_200_000, "kept in the data dir");

    let reset = windows(&client, "reset").await;
    assert_eq!(reset.len(), 2, "{reset:?}");
    for w in reset {
        assert_eq!(w["window_ms"], 3_600_000, "{w}");
    }
    assert!(!dirs[0].path().join("window").exists());
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

/// Fault: the journal stream's `max_age` was fixed at creation (window +
/// 10 min), so a window raised at run time beyond it claimed, after a
/// takeover, ids the stream no longer held. Now the stream's `max_age`
/// follows the window as it grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_raised_at_run_time_makes_the_journal_keep_ids_as_long() {
    let server = NatsServer::start();
    let client = server.client().await;
    let data = tempfile::tempdir().unwrap();
    let running = service::start(settings(&server, data.path(), "5m", Durability::Replicated))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let max_age = || async {
        let mut stream = js.get_stream("EVENTSIEVE_JOURNAL").await.unwrap();
        stream.info().await.unwrap().config.max_age
    };
    assert_eq!(max_age().await, Duration::from_secs(5 * 60 + 600));
    let replies = windows(&client, "3h").await;
    assert!(
        replies.iter().all(|r| r["window_ms"] == 3 * 3_600_000),
        "{replies:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while max_age().await < Duration::from_secs(3 * 3600 + 600) {
        assert!(
            std::time::Instant::now() < deadline,
            "max_age still {:?}",
            max_age().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A smaller window leaves it as it is: the stream keeps what it has.
    windows(&client, "reset").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(max_age().await, Duration::from_secs(3 * 3600 + 600));
    running.shutdown().await.unwrap();
}
