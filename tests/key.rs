//! A configured dedup key against a real nats-server: events without an
//! `event_id`, keyed by several fields or by their content, through the
//! fallback and batch subjects, routed to their shard's owner across two
//! sidecars; clear 400s for a missing or wrong-typed field.

mod common;

use bytes::Bytes;
use common::*;
use eventsieve::config::{KeyConfig, Settings};
use eventsieve::engine::key::KeySpec;
use eventsieve::engine::shard::shard_of;
use eventsieve::service;

fn keyed(mut s: Settings, key: KeyConfig) -> Settings {
    let names = match &key {
        KeyConfig::One(n) => vec![n.clone()],
        KeyConfig::Many(n) => n.clone(),
    };
    s.config.key = key;
    s.key = KeySpec::parse(&names).unwrap();
    s
}

fn reading(node: &str, t: u64, category: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"node_id":"{node}","timestamp":{t},"category":"{category}","value":1.5}}"#
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_keyed_by_several_fields_reach_their_owner_and_are_deduplicated() {
    let server = NatsServer::start();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (low, high) = split_settings(&server, dirs[0].path(), dirs[1].path());
    let fields = KeyConfig::Many(vec!["node_id".into(), "timestamp".into(), "category".into()]);
    let spec = KeySpec::parse(&["node_id".into(), "timestamp".into(), "category".into()]).unwrap();
    let first = service::start(keyed(low, fields.clone())).await.unwrap();
    let second = service::start(keyed(high, fields)).await.unwrap();
    let client = server.client().await;

    // Both halves of the shards are reached through the fallback subject.
    let mut shards = std::collections::BTreeSet::new();
    for i in 0..40u64 {
        let e = reading("n1", 1_678_886_400 + i, "cpu");
        let id = spec.id_of(&e, &Default::default()).unwrap().into_owned();
        shards.insert(shard_of(&id, 32) < 16);
        assert_eq!(
            ask(&client, "dedup.ingest", e.clone()).await,
            Answer::Verdict(true)
        );
        assert_eq!(
            ask(&client, "dedup.ingest", e).await,
            Answer::Verdict(false),
            "{i}"
        );
    }
    assert_eq!(shards.len(), 2, "ids of both sidecars");
    // Field order and other fields do not matter; a different field value does.
    let same = Bytes::from_static(br#"{"category":"cpu","extra":[1],"timestamp":1678886400,"node_id":"n1"}"#);
    assert_eq!(ask(&client, "dedup.ingest", same).await, Answer::Verdict(false));
    let batch = [
        reading("n1", 1_678_886_400, "cpu"),
        reading("n2", 1_678_886_400, "cpu"),
        reading("n2", 1_678_886_400, "cpu"),
        Bytes::from_static(br#"{"node_id":"n1","timestamp":{"s":1},"category":"cpu"}"#),
        Bytes::from_static(br#"{"node_id":"n1","category":"cpu"}"#),
    ]
    .iter()
    .map(|b| std::str::from_utf8(b).unwrap().to_owned())
    .collect::<Vec<_>>()
    .join("\n");
    let reply = request(&client, "dedup.batch", Bytes::from(batch)).await;
    let lines: Vec<&str> = std::str::from_utf8(&reply.payload).unwrap().lines().collect();
    assert_eq!(lines[..3], ["0", "1", "0"]);
    assert_eq!(lines[3], "!400 \"timestamp\" is not a string or a number");
    assert_eq!(lines[4], "!400 event has no top-level \"timestamp\"");
    match ask(
        &client,
        "dedup.ingest",
        Bytes::from_static(br#"{"event_id":"a1"}"#),
    )
    .await
    {
        Answer::Error(400, why) => assert_eq!(why, "event has no top-level \"node_id\""),
        other => panic!("{other:?}"),
    }
    // The hashed id is what look-ups take.
    let id = spec
        .id_of(&reading("n2", 1_678_886_400, "cpu"), &Default::default())
        .unwrap()
        .into_owned();
    let found = request(&client, &format!("dedup.lookup.{id}"), Bytes::new()).await;
    assert!(found.payload.starts_with(br#"{"remembered":true"#), "{found:?}");
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}
