//! `dedup.batch` against a real nats-server: a verdict per line in order,
//! bad lines isolated, republish (one message per shard, or per event),
//! and sub-batches forwarded between two sidecars that split the shards.

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_nats::Client;
use common::*;
use eventsieve::config::{BatchOutput, Durability};
use eventsieve::engine::batch::{self, Entry};
use eventsieve::engine::shard::shard_of;
use eventsieve::output::COUNT_HEADER;
use eventsieve::service;
use futures_util::StreamExt;

async fn ask_batch(client: &Client, subject: &str, lines: &[Vec<u8>]) -> Vec<Entry> {
    let reply = request(client, subject, lines.join(&b'\n')).await;
    assert!(reply.headers.is_none(), "a batch reply has no error headers");
    batch::decode(&reply.payload).expect("reply in the batch format")
}

fn line(id: &str) -> Vec<u8> {
    event(id).to_vec()
}

/// The events in one output message: the lines of a per-shard message
/// (whose count header must match), or the message itself.
fn events_in(m: &async_nats::Message) -> Vec<Vec<u8>> {
    let count = m.headers.as_ref().and_then(|h| h.get(COUNT_HEADER));
    match count {
        None => vec![m.payload.to_vec()],
        Some(count) => {
            let lines: Vec<Vec<u8>> = m.payload.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
            assert_eq!(count.as_str(), lines.len().to_string(), "the count header");
            lines
        }
    }
}

/// Output messages until they hold `n` events: (shard, events) per message.
async fn receive(out: &mut async_nats::Subscriber, n: usize) -> Vec<(u32, Vec<Vec<u8>>)> {
    let mut messages = Vec::new();
    let mut events = 0;
    while events < n {
        let m = tokio::time::timeout(Duration::from_secs(5), out.next())
            .await
            .unwrap_or_else(|_| panic!("{events} of {n} events republished"))
            .unwrap();
        let shard = m.subject.rsplit('.').next().unwrap().parse().unwrap();
        let lines = events_in(&m);
        events += lines.len();
        messages.push((shard, lines));
    }
    assert_eq!(events, n, "no more events than sent");
    messages
}

/// A sidecar, a client subscribed to its output, and one single event
/// accepted through it; returns that event's output message.
async fn sidecar_with_output(
    server: &NatsServer,
    id: &str,
) -> (
    tempfile::TempDir,
    service::Running,
    Client,
    async_nats::Subscriber,
    async_nats::Message,
) {
    let (data, running) = start_sidecar(server, "1h", Durability::Local).await;
    let client = server.client().await;
    let mut out = client.subscribe("events.unique.*").await.unwrap();
    client.flush().await.unwrap();
    let subject = format!("dedup.ingest.{id}");
    assert_eq!(ask(&client, &subject, event(id)).await, Answer::Verdict(true));
    let single = tokio::time::timeout(Duration::from_secs(5), out.next())
        .await
        .unwrap()
        .unwrap();
    (data, running, client, out, single)
}

fn assert_error(entry: &Entry, code: u16, reason: &str) {
    match entry {
        Entry::Error { code: c, reason: r } => {
            assert_eq!(*c, code, "{r}");
            assert!(r.contains(reason), "{r:?} should mention {reason:?}");
        }
        other => panic!("expected {code} error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_gets_one_verdict_per_line_in_order_and_bad_lines_change_nothing() {
    let server = NatsServer::start();
    let (_data, running, client, mut out, _) = sidecar_with_output(&server, "b0").await;

    let lines = vec![
        line("b1"),
        line("b2"),
        line("b1"),
        b"not json".to_vec(),
        Vec::new(),
        line("b0"),
        br#"{"event_id":"b-3"}"#.to_vec(),
        br#"{"event_id":"b3","x":[1,2,3]}"#.to_vec(),
    ];
    let entries = ask_batch(&client, "dedup.batch", &lines).await;
    assert_eq!(entries.len(), lines.len());
    assert_eq!(entries[0], Entry::New);
    assert_eq!(entries[1], Entry::New);
    assert_eq!(entries[2], Entry::Duplicate, "a repeat within the batch");
    assert_error(&entries[3], 400, "not valid JSON");
    assert_error(&entries[4], 400, "");
    assert_eq!(
        entries[5],
        Entry::Duplicate,
        "accepted earlier by a single request"
    );
    assert_error(&entries[6], 400, "a-z, A-Z and 0-9");
    assert_eq!(entries[7], Entry::New);

    // Exactly the three new lines are republished, byte for byte.
    let mut seen = HashSet::new();
    for (_, events) in receive(&mut out, 3).await {
        for e in events {
            assert!(seen.insert(e));
        }
    }
    let want: HashSet<Vec<u8>> = [0, 1, 7].iter().map(|&i| lines[i].clone()).collect();
    assert_eq!(seen, want);
    assert_silent(&mut out, "nothing else republished").await;

    // Single requests agree with the batch; the bad line's id stayed new.
    for (id, want) in [("b1", false), ("b2", false), ("b3", false), ("b", true)] {
        assert_eq!(
            ask(&client, &format!("dedup.ingest.{id}"), event(id)).await,
            Answer::Verdict(want),
            "{id}"
        );
    }
    // A trailing newline adds no entry; a lone newline is one empty line;
    // an empty batch gets an empty reply.
    let reply = client
        .request("dedup.batch", "{\"event_id\":\"b4\"}\n".into())
        .await
        .unwrap();
    assert_eq!(batch::decode(&reply.payload).unwrap(), [Entry::New]);
    let reply = client.request("dedup.batch", "\n".into()).await.unwrap();
    let entries = batch::decode(&reply.payload).unwrap();
    assert_eq!(entries.len(), 1);
    assert_error(&entries[0], 400, "");
    let reply = client.request("dedup.batch", "".into()).await.unwrap();
    assert!(reply.payload.is_empty());
    assert_eq!(running.metrics().batches.load(Relaxed), 4);
    running.shutdown().await.unwrap();
}

/// One batch of 300 lines over the 32 shards: 200 distinct ids (100 of them
/// twice), bad lines between them, ids with `\r\n` endings and extra
/// fields. The output is one message per shard that had a new line: its
/// new lines byte for byte, in request order, with the count header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_republished_as_one_message_per_shard_in_request_order() {
    let server = NatsServer::start();
    let (_data, running, client, mut out, single) = sidecar_with_output(&server, "p7").await;
    assert!(single.headers.is_none(), "a single event: one message, no header");
    assert_eq!(single.payload, event("p7"));

    let mut lines: Vec<Vec<u8>> = Vec::new();
    for i in 0..200 {
        lines.push(format!(r#"{{"event_id":"p{i}", "n": {i}, "s": "a b\tc"}}"#).into_bytes());
        if i % 2 == 0 {
            lines.push(line(&format!("p{}", i / 2)));
        }
        if i % 40 == 0 {
            lines.push(b"{\"event_id\": 5}".to_vec());
        }
    }
    let body: Vec<u8> = lines
        .iter()
        .enumerate()
        .flat_map(|(i, l)| [l.as_slice(), if i % 3 == 0 { b"\r\n" } else { b"\n" }].concat())
        .collect();
    let reply = request(&client, "dedup.batch", body).await;
    let entries = batch::decode(&reply.payload).unwrap();
    assert_eq!(entries.len(), lines.len());
    // The expected output: the lines that got `1`, grouped by shard in
    // request order.
    let mut want: std::collections::BTreeMap<u32, Vec<Vec<u8>>> = Default::default();
    for (l, e) in lines.iter().zip(&entries) {
        if *e == Entry::New {
            let id: serde_json::Value = serde_json::from_slice(l).unwrap();
            let shard = shard_of(id["event_id"].as_str().unwrap(), 32);
            want.entry(shard).or_default().push(l.clone());
        }
    }
    assert_eq!(
        want.values().map(Vec::len).sum::<usize>(),
        199,
        "p7 was already there"
    );
    let got = receive(&mut out, 199).await;
    assert_eq!(got.len(), want.len(), "one message per shard");
    let got: std::collections::BTreeMap<u32, Vec<Vec<u8>>> = got.into_iter().collect();
    assert_eq!(got, want);
    assert_silent(&mut out, "duplicates and bad lines are not republished").await;

    // A batch of one line so long that no header fits beside it under the
    // server's max_payload (1 MiB): republished bare, as a single event.
    let mut huge = br#"{"event_id":"huge","pad":""#.to_vec();
    huge.resize((1 << 20) - 16, b'x');
    huge.extend_from_slice(br#""}"#);
    assert_eq!(
        ask_batch(&client, "dedup.batch", &[huge.clone()]).await,
        [Entry::New]
    );
    let m = tokio::time::timeout(Duration::from_secs(5), out.next())
        .await
        .unwrap()
        .unwrap();
    assert!(m.headers.is_none());
    assert_eq!(m.payload, huge);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_output_per_event_republishes_each_new_line_alone() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut s = settings(&server, data.path(), "1h", Durability::Memory);
    s.config.batch_output = BatchOutput::PerEvent;
    let running = service::start(s).await.unwrap();
    let client = server.client().await;
    let mut out = client.subscribe("events.unique.*").await.unwrap();
    client.flush().await.unwrap();
    let lines: Vec<Vec<u8>> = (0..64).map(|i| line(&format!("q{}", i % 40))).collect();
    let entries = ask_batch(&client, "dedup.batch", &lines).await;
    assert_eq!(entries.iter().filter(|e| **e == Entry::New).count(), 40);
    let mut got = Vec::new();
    for _ in 0..40 {
        let m = tokio::time::timeout(Duration::from_secs(5), out.next())
            .await
            .expect("republished")
            .unwrap();
        assert!(m.headers.is_none(), "no count header per event");
        got.push(m.payload.to_vec());
    }
    got.sort();
    let mut want = lines[..40].to_vec();
    want.sort();
    assert_eq!(got, want);
    assert_silent(&mut out, "one message per new line").await;
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_verdicts_survive_a_restart() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let s = settings(&server, data.path(), "1h", Durability::Local);
    let running = service::start(s.clone()).await.unwrap();
    let client = server.client().await;
    let lines: Vec<Vec<u8>> = (0..2000).map(|i| line(&format!("d{i}"))).collect();
    let entries = ask_batch(&client, "dedup.batch", &lines).await;
    assert!(entries.iter().all(|e| *e == Entry::New));
    running.shutdown().await.unwrap();

    let running = service::start(s).await.unwrap();
    let entries = ask_batch(&client, "dedup.batch", &lines).await;
    assert!(entries.iter().all(|e| *e == Entry::Duplicate), "{entries:?}");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_forward_sub_batches_and_merge_verdicts_in_order() {
    let server = NatsServer::start();
    let (_dirs, first, second) = start_two_sidecars(&server).await;
    let client = server.client().await;
    let mut out = client.subscribe("events.unique.*").await.unwrap();
    client.flush().await.unwrap();

    // 400 ids over all 32 shards, each twice, interleaved with bad lines.
    let ids: Vec<String> = (0..400).map(|i| format!("f{i}")).collect();
    let mut lines = Vec::new();
    for id in ids.iter().chain(ids.iter()) {
        lines.push(line(id));
        if lines.len() % 50 == 0 {
            lines.push(b"{}".to_vec());
        }
    }
    let entries = ask_batch(&client, "dedup.batch", &lines).await;
    assert_eq!(entries.len(), lines.len());
    let mut first_seen = HashSet::new();
    for (l, e) in lines.iter().zip(&entries) {
        if l.as_slice() == b"{}" {
            assert_error(e, 400, "no top-level");
        } else if first_seen.insert(l.clone()) {
            assert_eq!(*e, Entry::New, "{}", String::from_utf8_lossy(l));
        } else {
            assert_eq!(*e, Entry::Duplicate, "{}", String::from_utf8_lossy(l));
        }
    }
    let forwarded = first.metrics().forwarded.load(Relaxed) + second.metrics().forwarded.load(Relaxed);
    assert!(
        forwarded >= 300,
        "about half the lines are forwarded, got {forwarded}"
    );
    let republished: HashSet<Vec<u8>> = receive(&mut out, ids.len())
        .await
        .into_iter()
        .flat_map(|(_, events)| events)
        .collect();
    assert_eq!(republished.len(), ids.len(), "each id once");
    assert_silent(&mut out, "each new line republished once").await;

    // A sub-batch reaching a node that does not own its shard is not forwarded again.
    let shard_of_f0 = eventsieve::engine::shard::shard_of("f0", 32);
    let wrong = if shard_of_f0 < 16 { 16 } else { 0 };
    let entries = ask_batch(&client, &format!("dedup.internal.batch.{wrong}"), &[line("f0")]).await;
    assert_error(&entries[0], 503, "not owned");

    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

/// Fault: `dedup.ingest._batch` was mapped by the server to
/// `dedup.shard.<n>._batch`, handled as a forwarded sub-batch and answered
/// `1\n1\n`. Public subjects carry single events only, whatever their last
/// token; sub-batches travel on `<prefix>.internal.batch.<n>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_subjects_never_reach_internal_handling() {
    let server = NatsServer::start();
    let (_data, running) = start_sidecar(&server, "1h", Durability::Local).await;
    let client = server.client().await;
    let mut out = client.subscribe("events.unique.*").await.unwrap();
    client.flush().await.unwrap();

    let two_lines = [line("m1"), line("m2")].concat();
    for subject in [
        "dedup.ingest._batch",
        "dedup.shard.3._batch",
        "dedup.ingest._fence",
        "dedup.shard.3._fence",
        "dedup.ingest.internal",
    ] {
        let reply = request(&client, subject, two_lines.clone()).await;
        match parse_answer(&reply) {
            Answer::Error(400, reason) => assert!(reason.contains("JSON"), "{subject}: {reason}"),
            other => panic!("{subject}: expected 400, got {other:?}"),
        }
        // A request carrying the fence payload is still a request: answered.
        let reply = request(&client, subject, &b"eventsieve-fence"[..]).await;
        assert!(
            matches!(parse_answer(&reply), Answer::Error(400, _)),
            "{subject}: a fence-like request must get its 400"
        );
    }
    assert_silent(&mut out, "nothing accepted through internal handling").await;
    for id in ["m1", "m2"] {
        assert_eq!(
            ask(&client, &format!("dedup.ingest.{id}"), event(id)).await,
            Answer::Verdict(true),
            "{id} was never accepted"
        );
    }
    running.shutdown().await.unwrap();
}
