//! `<prefix>.lookup.<id>` and `<prefix>.forget.<id>` against a real
//! nats-server: a look-up changes nothing, a forget is durable (journaled)
//! and lets the id be accepted again, and with two sidecars only the owner
//! of the id's shard answers.

mod common;

use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use common::*;
use eventsieve::config::Durability;
use eventsieve::engine::unix_ms;
use eventsieve::service;
use futures_util::StreamExt;
use serde_json::{Value, json};

async fn admin(client: &Client, what: &str, id: &str) -> Value {
    let reply = request(client, &format!("dedup.{what}.{id}"), Bytes::new()).await;
    assert!(reply.headers.is_none(), "{what} {id}: {:?}", reply.headers);
    serde_json::from_slice(&reply.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_changes_nothing_and_forget_is_durable() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let s = settings(&server, data.path(), "1h", Durability::Local);
    let running = service::start(s.clone()).await.unwrap();
    let client = server.client().await;

    let before = unix_ms();
    for id in ["a1", "c1"] {
        assert_eq!(
            ask(&client, &format!("dedup.ingest.{id}"), event(id)).await,
            Answer::Verdict(true)
        );
    }
    let after = unix_ms();
    let found = admin(&client, "lookup", "a1").await;
    assert_eq!(found["remembered"], true);
    // A 1 h window keeps arrivals in 120 ms units.
    let since = found["since"].as_u64().unwrap();
    assert!(
        since <= after && since + 120 >= before,
        "{since} not in {before}..{after}"
    );
    assert_eq!(admin(&client, "lookup", "b1").await, json!({"remembered": false}));
    assert_eq!(
        admin(&client, "lookup", "a1").await,
        found,
        "a look-up changes nothing"
    );
    match ask(&client, "dedup.lookup.a_1", Bytes::new()).await {
        Answer::Error(400, reason) => assert!(reason.contains("a-z"), "{reason}"),
        other => panic!("expected 400, got {other:?}"),
    }

    // Forgotten: accepted again, and that new acceptance is remembered.
    assert_eq!(
        admin(&client, "forget", "a1").await,
        json!({"forgotten": true, "since": since})
    );
    assert_eq!(admin(&client, "lookup", "a1").await, json!({"remembered": false}));
    assert_eq!(admin(&client, "forget", "a1").await, json!({"forgotten": false}));
    assert_eq!(
        ask(&client, "dedup.ingest.a1", event("a1")).await,
        Answer::Verdict(true)
    );
    assert_eq!(admin(&client, "forget", "c1").await["forgotten"], true);
    assert_eq!(
        running
            .metrics()
            .forgotten
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    running.shutdown().await.unwrap();

    // After a restart: c1 stays forgotten, a1's second acceptance stays.
    let running = service::start(s).await.unwrap();
    assert_eq!(admin(&client, "lookup", "c1").await, json!({"remembered": false}));
    assert_eq!(admin(&client, "lookup", "a1").await["remembered"], true);
    assert_eq!(
        ask(&client, "dedup.ingest.a1", event("a1")).await,
        Answer::Verdict(false)
    );
    assert_eq!(
        ask(&client, "dedup.ingest.c1", event("c1")).await,
        Answer::Verdict(true)
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_sidecars_only_the_owner_answers() {
    let server = NatsServer::start();
    let (_dirs, first, second) = start_two_sidecars(&server).await;
    let client = server.client().await;
    // Spread over both halves of the 32 shards.
    let ids: Vec<String> = (0..16).map(|i| format!("o{i}")).collect();
    let shards: std::collections::HashSet<bool> = ids
        .iter()
        .map(|id| eventsieve::engine::shard::shard_of(id, 32) < 16)
        .collect();
    assert_eq!(shards.len(), 2);
    for id in &ids {
        assert_eq!(
            ask(&client, &format!("dedup.ingest.{id}"), event(id)).await,
            Answer::Verdict(true)
        );
    }
    for (what, key) in [("lookup", "remembered"), ("forget", "forgotten")] {
        for id in &ids {
            let inbox = client.new_inbox();
            let mut replies = client.subscribe(inbox.clone()).await.unwrap();
            client
                .publish_with_reply(format!("dedup.{what}.{id}"), inbox, Bytes::new())
                .await
                .unwrap();
            let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
                .await
                .unwrap()
                .unwrap();
            let body: Value = serde_json::from_slice(&reply.payload).unwrap();
            assert_eq!(body[key], true, "{what} {id}");
            assert!(
                tokio::time::timeout(Duration::from_millis(100), replies.next())
                    .await
                    .is_err(),
                "{what} {id}: one answer, from the owner"
            );
        }
    }
    for id in &ids {
        assert_eq!(
            ask(&client, &format!("dedup.ingest.{id}"), event(id)).await,
            Answer::Verdict(true)
        );
    }
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

/// Fault: look-up, forget, window and status requests in flight at a stop
/// went unanswered (their subscriptions were dropped, not fenced). Now
/// every request the server routed to the stopping sidecar is answered;
/// the others are told at once that no one responds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_requests_in_flight_at_a_stop_are_answered() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let running = service::start(settings(&server, data.path(), "1h", Durability::Local))
        .await
        .unwrap();
    let client = server.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut askers = Vec::new();
    for (i, subject) in [
        "dedup.lookup.a1",
        "dedup.forget.b1",
        "dedup.window",
        "dedup.status",
    ]
    .into_iter()
    .cycle()
    .take(8)
    .enumerate()
    {
        let (client, stop) = (client.clone(), stop.clone());
        askers.push(tokio::spawn(async move {
            let (mut answered, mut no_one, mut silent) = (0u32, 0u32, 0u32);
            for n in 0..20_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) && n % 64 == 0 && no_one > 0 {
                    break;
                }
                let request = client.request(subject.to_string(), Bytes::new());
                match tokio::time::timeout(Duration::from_secs(3), request).await {
                    Ok(Ok(_)) => answered += 1,
                    Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => no_one += 1,
                    Ok(Err(e)) => panic!("{subject} ({i}): {e}"),
                    Err(_) => silent += 1,
                }
            }
            (answered, no_one, silent)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    running.shutdown().await.unwrap();
    let (mut answered, mut silent) = (0, 0);
    for asker in askers {
        let (a, _, s) = asker.await.unwrap();
        answered += a;
        silent += s;
    }
    assert!(answered > 100, "the requests ran: {answered}");
    assert_eq!(
        silent, 0,
        "requests left unanswered by the stop ({answered} answered)"
    );
}
