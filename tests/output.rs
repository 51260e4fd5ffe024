//! `output = "jetstream"` against a real nats-server: every new event in
//! the stream once, with `Nats-Msg-Id` = its `event_id`, before its reply;
//! an event the stream does not take is answered 503 and its id forgotten.

mod common;

use async_nats::jetstream::{self, stream};
use common::*;
use eventsieve::config::{Durability, OutputKind};
use eventsieve::engine::batch::{self, Entry};
use eventsieve::service;

/// Every message of `stream`: its `Nats-Msg-Id` and payload, in order.
async fn contents(js: &jetstream::Context, name: &str) -> Vec<(String, Vec<u8>)> {
    let mut stream = js.get_stream(name).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        let id = m
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .expect("Nats-Msg-Id")
            .to_string();
        out.push((id, m.payload.to_vec()));
    }
    out
}

async fn start_jetstream_sidecar(server: &NatsServer, data: &std::path::Path) -> service::Running {
    let mut s = settings(server, data, "1h", Durability::Local);
    s.config.output = OutputKind::Jetstream;
    service::start(s).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_new_event_is_in_the_stream_once_with_its_id_before_the_reply() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let running = start_jetstream_sidecar(&server, data.path()).await;
    let client = server.client().await;
    let js = jetstream::new(client.clone());

    for id in ["j1", "j2", "j1"] {
        let _ = ask(&client, &format!("dedup.ingest.{id}"), event(id)).await;
    }
    let lines: Vec<Vec<u8>> = ["j2", "j3", "j4", "j3"]
        .iter()
        .map(|id| event(id).to_vec())
        .collect();
    let reply = request(&client, "dedup.batch", lines.join(&b'\n')).await;
    let entries = batch::decode(&reply.payload).unwrap();
    assert_eq!(
        entries,
        [Entry::Duplicate, Entry::New, Entry::New, Entry::Duplicate]
    );
    // The replies came after the acknowledgements: the stream holds them now.
    let held = contents(&js, "EVENTSIEVE_OUTPUT").await;
    let ids: Vec<&str> = held.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["j1", "j2", "j3", "j4"]);
    for (id, payload) in &held {
        assert_eq!(*payload, event(id).to_vec(), "byte for byte");
    }
    let info = js
        .get_stream("EVENTSIEVE_OUTPUT")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(
        info.config.subjects,
        ["events.unique.*"],
        "created over the output subjects"
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_stream_does_not_take_is_answered_503_and_forgotten() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let running = start_jetstream_sidecar(&server, data.path()).await;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let config = js
        .get_stream("EVENTSIEVE_OUTPUT")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    js.delete_stream("EVENTSIEVE_OUTPUT").await.unwrap();

    match ask(&client, "dedup.ingest.k1", event("k1")).await {
        Answer::Error(503, reason) => assert!(reason.contains("output stream"), "{reason}"),
        other => panic!("expected 503, got {other:?}"),
    }
    let reply = request(&client, "dedup.batch", [event("k2"), event("k2")].join(&b'\n')).await;
    let entries = batch::decode(&reply.payload).unwrap();
    assert!(
        matches!(&entries[0], Entry::Error { code: 503, .. }),
        "{entries:?}"
    );
    // The repeat of an event that was not kept gets its error, not `0`
    // (a producer drops an event told it is a duplicate).
    assert!(
        matches!(&entries[1], Entry::Error { code: 503, .. }),
        "a repeat within the batch: {entries:?}"
    );

    // With the stream back, both ids are new: nothing was remembered.
    js.create_stream(stream::Config {
        name: config.name.clone(),
        subjects: config.subjects.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        ask(&client, "dedup.ingest.k1", event("k1")).await,
        Answer::Verdict(true)
    );
    let reply = request(&client, "dedup.batch", event("k2")).await;
    assert_eq!(batch::decode(&reply.payload).unwrap(), [Entry::New]);
    let ids: Vec<String> = contents(&js, "EVENTSIEVE_OUTPUT")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, ["k1", "k2"]);
    running.shutdown().await.unwrap();
}
