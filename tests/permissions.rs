//! The users and subject permissions the project ships
//! (`nats/permissions.conf`) against a real nats-server, and the sidecar's
//! refusal of reply subjects that are its own.
//!
//! Fault: with no permissions any client could publish forged events to
//! `events.unique.*`, send to internal subjects, and subscribe to the shard
//! subjects as a rogue responder (it forged `false` for 149 of 500 fresh
//! ids). With the shipped permissions a producer can ingest, and nothing
//! more.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use common::*;
use eventsieve::config::{Durability, Secret};
use eventsieve::nats::subjects::FENCE_PAYLOAD;
use eventsieve::service;
use futures_util::StreamExt;

/// A request that must get no reply within a second (refused by the server
/// or dropped by the sidecar).
async fn unanswered(client: &Client, subject: &str, body: impl Into<Bytes>) {
    let request = client.request(subject.to_string(), body.into());
    if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(1), request).await {
        panic!("{subject}: answered {:?}", reply.payload);
    }
}

/// A sidecar that connects as the shipped `sidecar` user.
async fn start_as_sidecar(server: &NatsServer, data: &std::path::Path) -> service::Running {
    let mut s = settings(server, data, "1h", Durability::Local);
    s.config.nats.user = Some("sidecar".into());
    s.config.nats.password = Some(Secret::new("change-me-sidecar"));
    service::start(s).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_permissions_let_a_producer_ingest_and_nothing_more() {
    let server = NatsServer::start_with_permissions();
    let data = tempfile::tempdir().unwrap();
    let running = start_as_sidecar(&server, data.path()).await;
    let producer = server.client_as("producer").await;
    let consumer = server.client_as("consumer").await;
    let mut out = consumer.subscribe("events.unique.*").await.unwrap();
    consumer.flush().await.unwrap();

    // A producer ingests single events (through the mapping) and batches.
    assert_eq!(
        ask(&producer, "dedup.ingest.s1", event("s1")).await,
        Answer::Verdict(true)
    );
    let reply = request(&producer, "dedup.batch", event("s2")).await;
    assert_eq!(&reply.payload[..], b"1\n");
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(5), out.next())
            .await
            .unwrap()
            .unwrap();
    }

    // It cannot forge output, reach internal subjects or send fences.
    producer
        .publish("events.unique.3", event("forged"))
        .await
        .unwrap();
    producer
        .publish("dedup.shard.3._fence", Bytes::from_static(FENCE_PAYLOAD))
        .await
        .unwrap();
    producer.flush().await.unwrap();
    unanswered(&producer, "dedup.internal.batch.3", event("s3")).await;
    assert_silent(&mut out, "nothing forged reaches consumers").await;

    // It cannot answer requests in a sidecar's place.
    let mut rogue = producer.subscribe("dedup.shard.*.*").await.unwrap();
    producer.flush().await.unwrap();
    for i in 0..20 {
        let id = format!("f{i}");
        assert_eq!(
            ask(&producer, &format!("dedup.ingest.{id}"), event(&id)).await,
            Answer::Verdict(true)
        );
    }
    assert_silent(
        &mut rogue,
        "a producer's subscription to the shard subjects gets nothing",
    )
    .await;

    // A request whose reply subject is an output subject is dropped, not
    // answered there.
    let mut out_again = consumer.subscribe("events.unique.*").await.unwrap();
    consumer.flush().await.unwrap();
    producer
        .publish_with_reply("dedup.ingest.s4", "events.unique.5", event("s4"))
        .await
        .unwrap();
    producer.flush().await.unwrap();
    assert_silent(&mut out_again, "no reply forged onto the output").await;
    while tokio::time::timeout(Duration::from_millis(100), out.next())
        .await
        .is_ok()
    {}
    assert_eq!(running.metrics().refused_replies.load(Relaxed), 1);
    assert_eq!(
        ask(&producer, "dedup.ingest.s4", event("s4")).await,
        Answer::Verdict(true),
        "s4 was not taken"
    );
    assert_eq!(
        ask(&producer, "dedup.ingest.s3", event("s3")).await,
        Answer::Verdict(true),
        "s3 was not taken"
    );

    // A consumer publishes nothing; an operator can discover the service,
    // look ids up and forget them, a producer cannot.
    unanswered(&consumer, "dedup.ingest.s5", event("s5")).await;
    unanswered(&producer, "dedup.lookup.s1", Bytes::new()).await;
    unanswered(&producer, "dedup.forget.s1", Bytes::new()).await;
    unanswered(&producer, "dedup.window", Bytes::from_static(b"1s")).await;
    unanswered(&producer, "dedup.status", Bytes::new()).await;
    assert!(
        async_nats::jetstream::new(producer.clone())
            .get_key_value("eventsieve")
            .await
            .is_err(),
        "a producer cannot reach the bucket"
    );
    let operator = server.client_as("operator").await;
    let ping = request(&operator, "$SRV.PING.eventsieve", Bytes::new()).await;
    assert!(!ping.payload.is_empty());
    let forgot = request(&operator, "dedup.forget.s1", Bytes::new()).await;
    assert!(
        forgot.payload.starts_with(br#"{"forgotten":true"#),
        "{:?}",
        forgot.payload
    );
    // The operator changes the window: the sidecar keeps it in the bucket.
    let set = request(&operator, "dedup.window", Bytes::from_static(b"2h")).await;
    assert!(set.headers.is_none(), "{set:?}");
    assert_eq!(running.dedup().window_ms(), 7_200_000);
    let kv = async_nats::jetstream::new(operator.clone())
        .get_key_value("eventsieve")
        .await
        .unwrap();
    assert_eq!(kv.get("window").await.unwrap().as_deref(), Some(&b"2h"[..]));
    let status = request(&operator, "dedup.status", Bytes::new()).await;
    let status: serde_json::Value = serde_json::from_slice(&status.payload).unwrap();
    assert_eq!(status["window"]["window_ms"], 7_200_000, "{status}");
    running.shutdown().await.unwrap();
}

/// Fault: every producer and operator could subscribe to `_INBOX.>`, so one
/// producer read every other producer's verdicts and every operator's
/// status replies (host names, pids, addresses). Now each user has its own
/// inbox prefix and can subscribe to no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_cannot_read_another_users_replies() {
    let server = NatsServer::start_with_permissions();
    let data = tempfile::tempdir().unwrap();
    let running = start_as_sidecar(&server, data.path()).await;
    let (producer, operator) = (
        server.client_as("producer").await,
        server.client_as("operator").await,
    );
    let snoop = server.client_as("producer2").await;
    let mut taps = Vec::new();
    for subject in ["_INBOX.>", "_INBOX_producer.>", "_INBOX_operator.>", ">"] {
        // The server refuses these subscriptions; they must see nothing.
        if let Ok(sub) = snoop.subscribe(subject).await {
            taps.push(sub);
        }
    }
    snoop.flush().await.unwrap();

    assert_eq!(
        ask(&producer, "dedup.ingest.p1", event("p1")).await,
        Answer::Verdict(true)
    );
    let status = request(&operator, "dedup.status", Bytes::new()).await;
    assert!(status.headers.is_none(), "{status:?}");
    // The snooping producer still ingests, on its own inbox.
    assert_eq!(
        ask(&snoop, "dedup.ingest.p2", event("p2")).await,
        Answer::Verdict(true)
    );
    for mut tap in taps {
        if let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(500), tap.next()).await {
            panic!("producer2 read {}: {:?}", message.subject, message.payload);
        }
    }
    running.shutdown().await.unwrap();
}
