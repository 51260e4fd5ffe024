//! Per-shard order: accepted events reach the output in the order their
//! shard decided them, on every path (single events, batches, forwarded
//! ones, `output = "jetstream"`).

mod common;

use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use common::*;
use eventsieve::config::{Durability, OutputKind};
use eventsieve::engine::shard::shard_of;
use eventsieve::service;
use futures_util::StreamExt;

const SHARD: u32 = 5;

/// `count` ids of shard 5, from `from` on, with their send order.
fn ids_of_shard(prefix: &str, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|id| shard_of(id, 32) == SHARD)
        .take(count)
        .collect()
}

fn event(id: &str, seq: usize) -> Vec<u8> {
    format!(r#"{{"event_id":"{id}","seq":{seq}}}"#).into_bytes()
}

/// The `seq` of every event `sub` got within `wait` of the last one.
async fn sequence(sub: &mut async_nats::Subscriber, expect: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < expect {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), sub.next()).await else {
            break;
        };
        for line in m.payload.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_slice(line).unwrap();
            out.push(v["seq"].as_u64().unwrap());
        }
    }
    out
}

/// How many neighbours are out of order.
fn inversions(seqs: &[u64]) -> usize {
    seqs.windows(2).filter(|w| w[0] > w[1]).count()
}

/// Asserts that every line of a batch reply is new.
fn assert_all_new(reply: &async_nats::Message) {
    let entries = eventsieve::engine::batch::decode(&reply.payload).unwrap();
    assert!(
        entries
            .iter()
            .all(|e| *e == eventsieve::engine::batch::Entry::New),
        "{entries:?}"
    );
}

/// Publishes every request in order on one connection, all in flight at
/// once, and returns the replies in request order.
async fn in_flight(client: &Client, requests: Vec<(String, Bytes)>) -> Vec<async_nats::Message> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(format!("{inbox}.*")).await.unwrap();
    for (i, (subject, body)) in requests.iter().enumerate() {
        client
            .publish_with_reply(subject.clone(), format!("{inbox}.{i}"), body.clone())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let mut got: Vec<Option<async_nats::Message>> = vec![None; requests.len()];
    for _ in 0..requests.len() {
        let m = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .expect("every request answered within 10 s")
            .unwrap();
        let i: usize = m.subject.rsplit('.').next().unwrap().parse().unwrap();
        got[i] = Some(m);
    }
    got.into_iter().map(Option::unwrap).collect()
}

/// Sends every single event at once (all in flight on one connection),
/// then every batch at once; asserts every one was accepted.
async fn send_all(client: &Client, singles: &[String], batches: &[Vec<String>], first_seq: usize) {
    let asks = singles
        .iter()
        .enumerate()
        .map(|(i, id)| (format!("dedup.ingest.{id}"), Bytes::from(event(id, i))))
        .collect();
    for reply in in_flight(client, asks).await {
        assert_eq!(&reply.payload[..], br#"{"accepted":true}"#);
    }
    let mut seq = first_seq;
    let asks = batches
        .iter()
        .map(|ids| {
            let mut body = Vec::new();
            for id in ids {
                body.extend(event(id, seq));
                body.push(b'\n');
                seq += 1;
            }
            ("dedup.batch".to_string(), Bytes::from(body))
        })
        .collect();
    for reply in in_flight(client, asks).await {
        assert_all_new(&reply);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_s_events_leave_in_the_order_they_were_sent_singles_and_batches_in_flight() {
    let server = NatsServer::start();
    let (_data, running) = start_sidecar(&server, "1h", Durability::Local).await;
    let client = server.client().await;
    let mut out = client.subscribe(format!("events.unique.{SHARD}")).await.unwrap();
    client.flush().await.unwrap();

    let singles = ids_of_shard("s", 2000);
    let batched = ids_of_shard("b", 2000);
    let batches: Vec<Vec<String>> = batched.chunks(100).map(<[String]>::to_vec).collect();
    send_all(&client, &singles, &batches, 0).await;

    let got = sequence(&mut out, 4000).await;
    assert_eq!(got.len(), 4000);
    let (singles_out, batches_out) = got.split_at(2000);
    assert_eq!(inversions(singles_out), 0, "single events in send order");
    assert_eq!(inversions(batches_out), 0, "batches in send order");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_jetstream_output_the_stream_holds_a_shard_s_events_in_send_order() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut s = settings(&server, data.path(), "1h", Durability::Local);
    s.config.output = OutputKind::Jetstream;
    let running = service::start(s).await.unwrap();
    let client = server.client().await;

    let singles = ids_of_shard("s", 1000);
    let batched = ids_of_shard("b", 1000);
    let batches: Vec<Vec<String>> = batched.chunks(50).map(<[String]>::to_vec).collect();
    send_all(&client, &singles, &batches, 0).await;

    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream("EVENTSIEVE_OUTPUT").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    assert_eq!(last, 2000, "each event once");
    let mut seqs = Vec::new();
    for n in 1..=last {
        let m = stream.get_raw_message(n).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        seqs.push(v["seq"].as_u64().unwrap());
    }
    let (singles_out, batches_out) = seqs.split_at(1000);
    assert_eq!(inversions(singles_out), 0, "single events in send order");
    assert_eq!(inversions(batches_out), 0, "batches in send order");
    running.shutdown().await.unwrap();
}

/// Settings of two sidecars that split the shards, placing events by
/// `session_id`.
fn by_session(
    server: &NatsServer,
    low: &std::path::Path,
    high: &std::path::Path,
) -> (eventsieve::config::Settings, eventsieve::config::Settings) {
    let (mut first, mut second) = split_settings(server, low, high);
    for s in [&mut first, &mut second] {
        s.config.shard_key = "session_id".into();
    }
    (first, second)
}

fn session_event(session: usize, seq: usize) -> Vec<u8> {
    format!(r#"{{"event_id":"s{session}n{seq}","session_id":"s{session}","seq":{seq}}}"#).into_bytes()
}

/// What `out` got until `total` events came (or 5 s of silence): each
/// message with its events (lines).
async fn output(
    out: &mut async_nats::Subscriber,
    total: usize,
) -> Vec<(async_nats::Message, Vec<serde_json::Value>)> {
    let (mut got, mut messages) = (0, Vec::new());
    while got < total {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), out.next()).await else {
            break;
        };
        let events: Vec<serde_json::Value> = m
            .payload
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        got += events.len();
        messages.push((m, events));
    }
    messages
}

/// Each session's (`s<n>`) values of `field`, in the order `messages`
/// carried them; asserts there are `total` events.
fn values_by_session(
    messages: &[(async_nats::Message, Vec<serde_json::Value>)],
    sessions: usize,
    field: &str,
    total: usize,
) -> Vec<Vec<u64>> {
    let mut by_session: Vec<Vec<u64>> = vec![Vec::new(); sessions];
    for e in messages.iter().flat_map(|(_, events)| events) {
        let session: usize = e["session_id"].as_str().unwrap()[1..].parse().unwrap();
        by_session[session].push(e[field].as_u64().unwrap());
    }
    let got: usize = by_session.iter().map(Vec::len).sum();
    assert_eq!(got, total, "every event once");
    by_session
}

/// A sidecar on `server` placing events by `session_id` and ordering its
/// sessions by `by` (`time_unit` "" for a sequence number) within `hold`;
/// a client subscribed to its output.
async fn ordered_sidecar(
    server: &NatsServer,
    data: &std::path::Path,
    (by, time_unit, hold): (&str, &str, &str),
) -> (service::Running, Client, async_nats::Subscriber) {
    let mut s = settings(server, data, "1h", Durability::Local);
    s.config.shard_key = "session_id".into();
    s.config.ordering.session = "session_id".into();
    s.config.ordering.by = by.into();
    s.config.ordering.time_unit = time_unit.into();
    s.config.ordering.hold = hold.into();
    let running = service::start(s.config.validate().unwrap()).await.unwrap();
    let consumer = server.client().await;
    let out = consumer.subscribe("events.unique.*").await.unwrap();
    consumer.flush().await.unwrap();
    (running, consumer, out)
}

/// Asserts that the reorder buffer let no event go late and holds none.
fn assert_none_late_none_held(running: &service::Running) {
    let text = running
        .metrics()
        .render(running.dedup(), std::time::Instant::now());
    assert!(text.contains("eventsieve_out_of_order_total 0\n"), "none late");
    assert!(
        text.contains("eventsieve_reorder_held_events 0\n"),
        "nothing left held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_keep_their_order_through_two_sidecars_from_sixteen_producers() {
    const SESSIONS: usize = 1000;
    const EVENTS: usize = 50;
    const PRODUCERS: usize = 16;
    let server = NatsServer::start();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (low, high) = by_session(&server, dirs[0].path(), dirs[1].path());
    let first = service::start(low).await.unwrap();
    let second = service::start(high).await.unwrap();
    let consumer = server.client().await;
    let mut out = consumer.subscribe("events.unique.*").await.unwrap();
    consumer.flush().await.unwrap();

    // Each producer: its sessions' first half as single events, all in
    // flight at once, then the second half in batches of 100 lines, all in
    // flight at once, to its own pinned batch subject.
    let producers = (0..PRODUCERS).map(|p| {
        let server_client = server.client();
        async move {
            let client = server_client.await;
            let sessions: Vec<usize> = (p..SESSIONS).step_by(PRODUCERS).collect();
            let singles = (0..EVENTS / 2)
                .flat_map(|seq| sessions.iter().map(move |&s| (s, seq)))
                .map(|(s, seq)| (format!("dedup.ingest.s{s}"), Bytes::from(session_event(s, seq))))
                .collect();
            for reply in in_flight(&client, singles).await {
                assert_eq!(&reply.payload[..], br#"{"accepted":true}"#);
            }
            let lines: Vec<Vec<u8>> = (EVENTS / 2..EVENTS)
                .flat_map(|seq| sessions.iter().map(move |&s| session_event(s, seq)))
                .collect();
            let batches = lines
                .chunks(100)
                .map(|chunk| {
                    let body: Vec<u8> = chunk.iter().flat_map(|l| [&l[..], b"\n"].concat()).collect();
                    (format!("dedup.batch.p{p}"), Bytes::from(body))
                })
                .collect();
            for reply in in_flight(&client, batches).await {
                assert_all_new(&reply);
            }
        }
    });
    futures_util::future::join_all(producers).await;

    let messages = output(&mut out, SESSIONS * EVENTS).await;
    let by_session = values_by_session(&messages, SESSIONS, "seq", SESSIONS * EVENTS);
    let want: Vec<u64> = (0..EVENTS as u64).collect();
    for (s, seqs) in by_session.iter().enumerate() {
        assert_eq!(seqs, &want, "session s{s} in send order");
    }

    // Sent where the session's shard is not: forwarded, accepted, placed by
    // the session.
    let client = server.client().await;
    let stray = Bytes::from(r#"{"event_id":"stray1","session_id":"s7","seq":50}"#);
    let mut s7 = consumer
        .subscribe(format!("events.unique.{}", shard_of("s7", 32)))
        .await
        .unwrap();
    consumer.flush().await.unwrap();
    let elsewhere = (0..)
        .map(|i| format!("t{i}"))
        .find(|t| (shard_of(t, 32) < 16) != (shard_of("s7", 32) < 16))
        .unwrap();
    assert_eq!(
        ask(&client, &format!("dedup.ingest.{elsewhere}"), stray.clone()).await,
        Answer::Verdict(true)
    );
    let Ok(Some(got)) = tokio::time::timeout(Duration::from_secs(10), s7.next()).await else {
        let said = |running: &service::Running| {
            let text = running
                .metrics()
                .render(running.dedup(), std::time::Instant::now());
            let wanted = ["verdicts_total", "forward", "publish_errors", "slow_consumer"];
            let lines = text
                .lines()
                .filter(|l| !l.starts_with('#') && wanted.iter().any(|w| l.contains(w)));
            lines.collect::<Vec<_>>().join("\n")
        };
        panic!(
            "the forwarded event, accepted, not on its shard's output within 10 s; the subscriber got {:?}\nfirst:\n{}\nsecond:\n{}",
            consumer.statistics(),
            said(&first),
            said(&second)
        );
    };
    assert_eq!(got.payload, stray);
    // Look-ups name the session too.
    assert_eq!(
        &request(&client, "dedup.lookup.s7.stray1", Bytes::new())
            .await
            .payload[..8],
        br#"{"rememb"#
    );
    let answer = ask(&client, "dedup.lookup.stray1", Bytes::new()).await;
    assert!(
        matches!(&answer, Answer::Error(400, why) if why.contains("session_id")),
        "{answer:?}"
    );
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ordering_two_producers_per_session_with_jitter_come_out_in_seq_order() {
    const SESSIONS: usize = 200;
    const EVENTS: usize = 20;
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let (running, _consumer, mut out) = ordered_sidecar(&server, data.path(), ("seq", "", "500ms")).await;

    // Event k of a session is due at 10 ms × k plus up to 150 ms of jitter,
    // sent by producer k % 2: one may overtake the one before it by up to
    // 150 ms, well within the hold.
    let producers = [server.client().await, server.client().await];
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut jitter = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % 150
    };
    let started = tokio::time::Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for session in 0..SESSIONS {
        for seq in 0..EVENTS {
            let client = producers[seq % 2].clone();
            let at = started + Duration::from_millis(10 * seq as u64 + jitter());
            let body = Bytes::from(session_event(session, seq));
            sends.spawn(async move {
                tokio::time::sleep_until(at).await;
                let reply = client
                    .request(format!("dedup.ingest.s{session}"), body)
                    .await
                    .unwrap();
                assert_eq!(&reply.payload[..], br#"{"accepted":true}"#);
            });
        }
    }
    while let Some(done) = sends.join_next().await {
        done.unwrap();
    }

    let messages = output(&mut out, SESSIONS * EVENTS).await;
    assert!(
        messages.iter().all(|(_, events)| events.len() == 1),
        "single events go out one a message"
    );
    let by_session = values_by_session(&messages, SESSIONS, "seq", SESSIONS * EVENTS);
    let want: Vec<u64> = (0..EVENTS as u64).collect();
    let overtaken = by_session.iter().filter(|seqs| **seqs != want).count();
    assert_eq!(overtaken, 0, "sessions out of seq order: {overtaken}");
    assert_none_late_none_held(&running);
    running.shutdown().await.unwrap();
}

/// With `[ordering]` by a timestamp every event is held; what the buffer
/// releases goes out as the events came in: a batch's events (of one
/// shard, together with other batches' released in the same tick) as
/// batch messages, a single event alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_timestamp_ordering_batched_events_leave_as_batches_in_time_order() {
    const SESSIONS: usize = 50;
    const EVENTS: usize = 40;
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let (running, _consumer, mut out) = ordered_sidecar(&server, data.path(), ("ts", "ms", "300ms")).await;

    let line = |session: usize, ts: usize, single: bool| {
        format!(r#"{{"event_id":"s{session}t{ts}","session_id":"s{session}","ts":{ts},"single":{single}}}"#)
    };
    // Every session's events in 20 batches of 100 lines, each batch's lines
    // in reverse time order (and a session's events spread over batches),
    // all in flight at once; then one single event per session, later.
    let mut lines: Vec<String> = (0..EVENTS)
        .flat_map(|ts| (0..SESSIONS).map(move |session| line(session, 1000 + ts, false)))
        .collect();
    for chunk in lines.chunks_mut(100) {
        chunk.reverse();
    }
    let batches = lines
        .chunks(100)
        .map(|chunk| ("dedup.batch".to_string(), Bytes::from(chunk.join("\n"))))
        .collect();
    let client = server.client().await;
    for reply in in_flight(&client, batches).await {
        assert_all_new(&reply);
    }
    let singles = (0..SESSIONS)
        .map(|session| {
            (
                format!("dedup.ingest.s{session}"),
                Bytes::from(line(session, 2000, true)),
            )
        })
        .collect();
    for reply in in_flight(&client, singles).await {
        assert_eq!(&reply.payload[..], br#"{"accepted":true}"#);
    }

    let messages = output(&mut out, SESSIONS * (EVENTS + 1)).await;
    let mut batch_messages = 0;
    for (m, events) in &messages {
        let counted = m
            .headers
            .as_ref()
            .and_then(|h| h.get(eventsieve::output::COUNT_HEADER));
        if events.iter().any(|e| e["single"] == true) {
            assert!(
                counted.is_none() && events.len() == 1,
                "a single event alone: {m:?}"
            );
        } else {
            batch_messages += 1;
        }
        if let Some(count) = counted {
            assert_eq!(count.as_str(), events.len().to_string(), "the count header");
        }
    }
    let by_session = values_by_session(&messages, SESSIONS, "ts", SESSIONS * (EVENTS + 1));
    let mut want: Vec<u64> = (1000..1000 + EVENTS as u64).collect();
    want.push(2000);
    for (s, seen) in by_session.iter().enumerate() {
        assert_eq!(seen, &want, "session s{s} in time order");
    }
    // One message per event would be 2 000; a batch message per shard
    // and release is a few dozen to a few hundred.
    assert!(
        batch_messages <= SESSIONS * EVENTS / 4,
        "{batch_messages} messages for {} batched events",
        SESSIONS * EVENTS
    );
    assert_none_late_none_held(&running);
    running.shutdown().await.unwrap();
}

/// Sessions ordered by `seq`, in batches: the next `seq` of a session goes
/// at once, with the rest of its batch as the batch came; one held behind
/// a gap goes when the gap fills. Every session's events leave in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_seq_ordering_batches_pass_at_once_and_gaps_hold_only_what_is_behind_them() {
    const SESSIONS: usize = 50;
    const EVENTS: usize = 40;
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let (running, _consumer, mut out) = ordered_sidecar(&server, data.path(), ("seq", "", "5s")).await;

    // Batch k holds seq k of every session, sent one after another; seq 7
    // of the even sessions comes last, so their 8..39 wait for it.
    let late = |session: usize, seq: usize| seq == 7 && session.is_multiple_of(2);
    let mut batches: Vec<Vec<Vec<u8>>> = (0..EVENTS)
        .map(|seq| {
            (0..SESSIONS)
                .filter(|&s| !late(s, seq))
                .map(|s| session_event(s, seq))
                .collect()
        })
        .collect();
    batches.push(
        (0..SESSIONS)
            .filter(|&s| late(s, 7))
            .map(|s| session_event(s, 7))
            .collect(),
    );
    let client = server.client().await;
    for lines in &batches {
        let body = Bytes::from(lines.join(&b'\n'));
        assert_all_new(&request(&client, "dedup.batch", body).await);
    }

    let messages = output(&mut out, SESSIONS * EVENTS).await;
    let by_session = values_by_session(&messages, SESSIONS, "seq", SESSIONS * EVENTS);
    let want: Vec<u64> = (0..EVENTS as u64).collect();
    for (s, seen) in by_session.iter().enumerate() {
        assert_eq!(seen, &want, "session s{s} in seq order");
    }
    // As batches: at most one message per shard and batch.
    let messages = messages.len();
    assert!(messages <= 32 * batches.len(), "{messages} messages");
    assert_none_late_none_held(&running);
    running.shutdown().await.unwrap();
}
