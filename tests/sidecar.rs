//! The sidecar against a real nats-server: verdicts, bad input, republish,
//! concurrency, forwarding, discovery, and the NATS partition mapping.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use eventsieve::config::Durability;
use eventsieve::service;
use futures_util::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_partition_mapping_matches_the_shard_function() {
    let server = NatsServer::start();
    let client = server.client().await;
    let mut sub = client.subscribe("dedup.shard.*.*").await.unwrap();
    client.flush().await.unwrap();
    let vectors = [
        ("abc", 11),
        ("evt123", 22),
        ("X9", 26),
        ("0", 15),
        ("zzzzzzzzzzzzzzzz", 5),
    ];
    for (id, _) in vectors {
        client
            .publish(format!("dedup.ingest.{id}"), Bytes::new())
            .await
            .unwrap();
    }
    for (id, shard) in vectors {
        let message = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(message.subject.as_str(), format!("dedup.shard.{shard}.{id}"));
        assert_eq!(eventsieve::engine::shard::shard_of(id, 32), shard);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_on_mapped_and_fallback_subjects_and_window_expiry() {
    let server = NatsServer::start();
    let (_data, running) = start_sidecar(&server, "1s", Durability::Local).await;
    let client = server.client().await;

    assert_eq!(
        ask(&client, "dedup.ingest.a1", event("a1")).await,
        Answer::Verdict(true)
    );
    assert_eq!(
        ask(&client, "dedup.ingest.a1", event("a1")).await,
        Answer::Verdict(false)
    );
    assert_eq!(
        ask(&client, "dedup.ingest", event("a1")).await,
        Answer::Verdict(false),
        "fallback sees the same state"
    );
    assert_eq!(
        ask(&client, "dedup.ingest", event("b2")).await,
        Answer::Verdict(true)
    );
    assert_eq!(
        ask(&client, "dedup.ingest.b2", event("b2")).await,
        Answer::Verdict(false)
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        ask(&client, "dedup.ingest.a1", event("a1")).await,
        Answer::Verdict(true),
        "forgotten after the window"
    );
    assert_eq!(
        ask(&client, "dedup.ingest", event("b2")).await,
        Answer::Verdict(true)
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_400_with_its_reason_and_changes_nothing() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut s = settings(&server, data.path(), "1h", Durability::Local);
    s.config.max_event_bytes = 300;
    let running = service::start(s).await.unwrap();
    let client = server.client().await;
    let mut out = client.subscribe("events.unique.>").await.unwrap();
    client.flush().await.unwrap();

    let big = format!(r#"{{"event_id":"k1","pad":"{}"}}"#, "x".repeat(300));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "not valid JSON"),
        (b"\xff\xfe".to_vec(), "not valid UTF-8 JSON"),
        (b"[1,2]".to_vec(), "not a JSON object"),
        (br#"{"id":"k1"}"#.to_vec(), "no top-level"),
        (br#"{"event_id":42}"#.to_vec(), "not a string"),
        (br#"{"event_id":""}"#.to_vec(), "is empty"),
        (br#"{"event_id":"k-1"}"#.to_vec(), "a-z, A-Z and 0-9"),
        (
            format!(r#"{{"event_id":"{}"}}"#, "k".repeat(257)).into_bytes(),
            "longer than 256 bytes",
        ),
        (br#"{"event_id":"k1","event_id":"k2"}"#.to_vec(), "more than once"),
        (big.into_bytes(), "larger than 300 bytes"),
        (br#"{"inner":{"event_id":"k1"}}"#.to_vec(), "no top-level"),
    ];
    for (body, reason) in cases {
        for subject in ["dedup.ingest", "dedup.ingest.k1"] {
            match ask(&client, subject, body.clone()).await {
                Answer::Error(400, got) => assert!(got.contains(reason), "{subject} {body:?}: {got}"),
                other => panic!("{subject} {body:?}: expected 400, got {other:?}"),
            }
        }
    }
    assert!(running.metrics().answered() >= 22);
    // Nothing was stored or republished: k1 is still new, and the only
    // event on the output is the valid one.
    assert_eq!(
        ask(&client, "dedup.ingest.k1", event("k1")).await,
        Answer::Verdict(true)
    );
    let first = tokio::time::timeout(Duration::from_secs(5), out.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.payload, event("k1"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), out.next())
            .await
            .is_err()
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_accepted_event_is_republished_once_unchanged() {
    let server = NatsServer::start();
    let (_data, running) = start_sidecar(&server, "1h", Durability::Local).await;
    let client = server.client().await;
    let mut out = client.subscribe("events.unique.*").await.unwrap();
    client.flush().await.unwrap();

    let mut sent = HashMap::new();
    for i in 0..300u32 {
        let id = format!("r{}", i % 200);
        // Odd spacing and key order: the output must be these exact bytes.
        let body = Bytes::from(format!("{{ \"n\" : {i},\"event_id\":\"{id}\" }}"));
        if let Answer::Verdict(true) = ask(&client, &format!("dedup.ingest.{id}"), body.clone()).await {
            assert!(sent.insert(id, body).is_none(), "accepted twice");
        }
    }
    assert_eq!(sent.len(), 200);
    let mut seen = HashSet::new();
    while seen.len() < 200 {
        let m = tokio::time::timeout(Duration::from_secs(5), out.next())
            .await
            .expect("all republished")
            .unwrap();
        let id = String::from_utf8_lossy(&m.payload)
            .split('"')
            .nth(5)
            .unwrap()
            .to_string();
        assert_eq!(m.payload, sent[&id], "republished byte for byte");
        let shard = eventsieve::engine::shard::shard_of(&id, 32);
        assert_eq!(m.subject.as_str(), format!("events.unique.{shard}"));
        assert!(seen.insert(id), "republished twice");
    }
    assert_silent(&mut out, "no duplicate republished").await;
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_accept_each_id_exactly_once() {
    let server = NatsServer::start();
    let (_data, running) = start_sidecar(&server, "1h", Durability::Local).await;
    let checker = server.client().await;
    let mut out = checker.subscribe("events.unique.*").await.unwrap();
    checker.flush().await.unwrap();

    // 8 producers × 10 000 events; producer p sends ids [p*2500, p*2500 + 10000).
    let mut producers = Vec::new();
    for p in 0..8u32 {
        let client = server.client().await;
        producers.push(tokio::spawn(async move {
            let ids: Vec<u32> = (p * 2_500..p * 2_500 + 10_000).collect();
            let answers: Vec<(u32, Answer)> = futures_util::stream::iter(ids)
                .map(|i| {
                    let client = client.clone();
                    async move {
                        let subject = if i % 2 == 0 {
                            format!("dedup.ingest.c{i}")
                        } else {
                            "dedup.ingest".into()
                        };
                        (i, ask(&client, &subject, event(&format!("c{i}"))).await)
                    }
                })
                .buffer_unordered(64)
                .collect()
                .await;
            answers
        }));
    }
    let mut accepted: HashMap<u32, u32> = HashMap::new();
    for p in producers {
        for (i, answer) in p.await.unwrap() {
            match answer {
                Answer::Verdict(true) => *accepted.entry(i).or_default() += 1,
                Answer::Verdict(false) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let distinct = 7 * 2_500 + 10_000;
    assert_eq!(accepted.len(), distinct, "every id accepted");
    assert!(accepted.values().all(|&n| n == 1), "no id accepted twice");
    let mut republished = 0;
    while republished < distinct {
        tokio::time::timeout(Duration::from_secs(10), out.next())
            .await
            .expect("republished")
            .unwrap();
        republished += 1;
    }
    assert_silent(&mut out, "output count = distinct ids").await;
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_durability_answers_without_a_store() {
    let server = NatsServer::start();
    let (data, running) = start_sidecar(&server, "1h", Durability::Memory).await;
    let client = server.client().await;
    assert_eq!(
        ask(&client, "dedup.ingest.m1", event("m1")).await,
        Answer::Verdict(true)
    );
    assert_eq!(
        ask(&client, "dedup.ingest.m1", event("m1")).await,
        Answer::Verdict(false)
    );
    running.shutdown().await.unwrap();
    assert!(
        !data.path().join("data.mdb").exists(),
        "memory mode writes no store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_split_over_two_sidecars_forward_and_unowned_shards_get_503() {
    let server = NatsServer::start();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (low, high) = split_settings(&server, d1.path(), d2.path());
    let first = service::start(low).await.unwrap();
    let client = server.client().await;
    // Only shards 0-15 have an owner: an id of shard 26 ("X9") has none.
    assert_eq!(eventsieve::engine::shard::shard_of("X9", 32), 26);
    match ask(&client, "dedup.ingest", event("X9")).await {
        Answer::Error(503, reason) => assert!(reason.contains("dedup.shard.26.X9"), "{reason}"),
        other => panic!("expected 503, got {other:?}"),
    }
    let second = service::start(high).await.unwrap();
    // Through the fallback subject, whichever sidecar takes it, the owner decides.
    for _ in 0..3 {
        for id in ["X9", "abc", "evt123", "0"] {
            let _ = ask(&client, "dedup.ingest", event(id)).await;
        }
    }
    for id in ["X9", "abc", "evt123", "0", "zzzzzzzzzzzzzzzz"] {
        let want = id == "zzzzzzzzzzzzzzzz";
        assert_eq!(
            ask(&client, "dedup.ingest", event(id)).await,
            Answer::Verdict(want),
            "{id}"
        );
        assert_eq!(
            ask(&client, &format!("dedup.ingest.{id}"), event(id)).await,
            Answer::Verdict(false),
            "{id}"
        );
    }
    assert!(
        first
            .metrics()
            .forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
            || second
                .metrics()
                .forwarded
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
    );
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_nats_micro_discovery() {
    let server = NatsServer::start();
    let (_data, running) = start_sidecar(&server, "1h", Durability::Local).await;
    let client = server.client().await;
    let _ = ask(&client, "dedup.ingest.d1", event("d1")).await;
    let ping = client.request("$SRV.PING", Bytes::new()).await.unwrap();
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
    assert_eq!(ping["name"], "eventsieve");
    let id = ping["id"].as_str().unwrap().to_string();
    let info = client
        .request(format!("$SRV.INFO.eventsieve.{id}"), Bytes::new())
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["type"], "io.nats.micro.v1.info_response");
    assert_eq!(info["endpoints"][0]["subject"], "dedup.ingest");
    let stats = client
        .request("$SRV.STATS.eventsieve", Bytes::new())
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    assert_eq!(stats["type"], "io.nats.micro.v1.stats_response");
    assert_eq!(stats["endpoints"][0]["data"]["accepted"], 1);

    // Fault: INFO listed two endpoints and STATS one other ("verdicts")
    // with a processing time of 0. Now both list every request subject by
    // the same names, each with its own counts and measured time.
    let _ = ask(&client, "dedup.ingest.d1", event("d1")).await;
    let _ = request(&client, "dedup.ingest.bad", Bytes::from_static(b"not json")).await;
    let _ = request(&client, "dedup.batch", event("d2")).await;
    let _ = request(&client, "dedup.lookup.d1", Bytes::new()).await;
    let _ = request(&client, "dedup.status", Bytes::new()).await;
    let _ = request(&client, "dedup.window", Bytes::from_static(b"never")).await;
    let named = |v: &serde_json::Value| -> Vec<String> {
        v["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let info = request(&client, "$SRV.INFO.eventsieve", Bytes::new()).await;
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    let stats = request(&client, "$SRV.STATS.eventsieve", Bytes::new()).await;
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    assert_eq!(named(&info), named(&stats));
    for name in [
        "ingest",
        "shards",
        "batch",
        "sub_batches",
        "lookup",
        "forget",
        "window",
        "status",
    ] {
        assert!(named(&info).iter().any(|n| n == name), "{name} in {info}");
    }
    let endpoint = |name: &str| {
        stats["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap()
            .clone()
    };
    let shards = endpoint("shards");
    assert_eq!(shards["subject"], "dedup.shard.*.*");
    assert_eq!(shards["num_requests"], 3, "{shards}");
    assert_eq!(shards["num_errors"], 1, "the event that is not JSON: {shards}");
    assert!(shards["processing_time"].as_u64().unwrap() > 0, "{shards}");
    for (name, errors) in [("batch", 0), ("lookup", 0), ("status", 0), ("window", 1)] {
        let e = endpoint(name);
        assert_eq!(
            (e["num_requests"].as_u64(), e["num_errors"].as_u64()),
            (Some(1), Some(errors)),
            "{e}"
        );
    }
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_leaving_a_queue_group_under_load_drops_no_request() {
    let server = NatsServer::start();
    let (_dirs, leaving, staying) = start_two_sidecars(&server).await;
    let client = server.client().await;

    // 32 producers on the queue-group subject while one member shuts down.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producers: Vec<_> = (0..32)
        .map(|p| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut answered, mut timed_out, mut no_responders) = (0, 0, 0);
                for n in 0..20_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let id = format!("q{p}n{n}");
                    let request = client.request("dedup.ingest", event(&id));
                    match tokio::time::timeout(Duration::from_secs(5), request).await {
                        Ok(Ok(_)) => answered += 1,
                        Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
                            no_responders += 1
                        }
                        Ok(Err(_)) | Err(_) => timed_out += 1,
                    }
                }
                (answered, timed_out, no_responders)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    leaving.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut answered, mut timed_out) = (0, 0);
    for p in producers {
        let (a, t, n) = p.await.unwrap();
        assert_eq!(n, 0, "the staying member is always there");
        answered += a;
        timed_out += t;
    }
    assert!(answered > 1000, "{answered} answered");
    assert_eq!(
        timed_out, 0,
        "requests routed to the leaving member were all answered"
    );
    staying.shutdown().await.unwrap();
}

/// A journal whose commits panic.
struct PanickingJournal;

impl eventsieve::journal::Journal for PanickingJournal {
    fn append(&mut self, _: &[eventsieve::engine::Record]) -> Result<(), eventsieve::journal::JournalError> {
        panic!("journal bug in append");
    }
    fn forget(&mut self, _: &[eventsieve::engine::Record]) -> Result<(), eventsieve::journal::JournalError> {
        panic!("journal bug in forget");
    }
    fn scan(
        &self,
        _: &[u32],
        _: u64,
        _: &mut dyn FnMut(eventsieve::engine::Record),
    ) -> Result<usize, eventsieve::journal::JournalError> {
        Ok(0)
    }
    fn expire(&mut self, _: u64) -> Result<usize, eventsieve::journal::JournalError> {
        Ok(0)
    }
    fn expired_before(&self) -> u64 {
        0
    }
    fn sync(&mut self) -> Result<(), eventsieve::journal::JournalError> {
        Ok(())
    }
    fn location(&self) -> String {
        "test".into()
    }
}

/// Fault: a panic in the commit task was swallowed, and the request waiting
/// for that commit was never answered. Now the request gets 503, the
/// service stops, and `shutdown` reports the panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_commit_writer_is_answered_and_surfaces_from_shutdown() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let s = settings(&server, data.path(), "1h", Durability::Local);
    let running = service::start_with(s, Some(Box::new(PanickingJournal)))
        .await
        .unwrap();
    let client = server.client().await;
    match ask(&client, "dedup.ingest.w1", event("w1")).await {
        Answer::Error(503, reason) => assert!(reason.contains("retry"), "{reason}"),
        other => panic!("expected 503, got {other:?}"),
    }
    let err = tokio::time::timeout(Duration::from_secs(15), running.shutdown())
        .await
        .expect("shutdown completes")
        .expect_err("the writer's panic is an error");
    assert!(err.to_string().contains("journal bug in append"), "{err}");
}

/// One GET of the metrics endpoint; the body.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to metrics");
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    text
}

/// Fault: each scrape walked every table under its shard lock on the
/// runtime's workers, so 64 scrapers stalled verdicts for seconds. Now the
/// walk happens at most once per `CENSUS_EVERY` (10 s) however many
/// scrape, off the
/// runtime, and verdicts keep being answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scrapers_walk_the_tables_at_most_once_per_census_interval() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut s = settings(&server, data.path(), "1h", Durability::Local);
    s.metrics_addr = Some(addr);
    let running = service::start(s).await.unwrap();
    let client = server.client().await;
    let accepted = 2_000;
    let ids: Vec<String> = (0..accepted).map(|i| format!("s{i}")).collect();
    let answers: Vec<Answer> = futures_util::stream::iter(ids.iter())
        .map(|id| ask(&client, "dedup.ingest", event(id)))
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(answers.iter().all(|a| *a == Answer::Verdict(true)));

    let started = std::time::Instant::now();
    let scrapers = futures_util::stream::iter(0..64)
        .map(|_| async move {
            for _ in 0..10 {
                let text = scrape(addr).await;
                assert!(text.contains("eventsieve_table_live_ids"));
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>();
    let verdicts = futures_util::stream::iter(0..500)
        .map(|i| {
            let client = client.clone();
            async move { ask(&client, "dedup.ingest", event(&format!("s{}", i % accepted))).await }
        })
        .buffer_unordered(16)
        .collect::<Vec<Answer>>();
    let ((), duplicates) = tokio::join!(
        async {
            scrapers.await;
        },
        verdicts
    );
    assert!(
        duplicates.iter().all(|a| *a == Answer::Verdict(false)),
        "verdicts answered during the scrapes"
    );
    let elapsed = started.elapsed().as_secs_f64();

    let every = eventsieve::observe::metrics::CENSUS_EVERY.as_secs_f64();
    let walks = sample(&scrape(addr).await, "eventsieve_table_census_walks_total");
    assert!(
        walks <= (elapsed / every).ceil() + 1.0,
        "640 scrapes in {elapsed:.1} s made {walks} table walks"
    );
    // Once the interval has passed, the next scrape walks again: exact.
    tokio::time::sleep(eventsieve::observe::metrics::CENSUS_EVERY + Duration::from_millis(100)).await;
    let text = scrape(addr).await;
    assert_eq!(sample(&text, "eventsieve_table_census_walks_total"), walks + 1.0);
    assert_eq!(sample(&text, "eventsieve_table_live_ids"), accepted as f64);
    running.shutdown().await.unwrap();
}

/// Fault: after a nats-server restart the first verdict came 0.04 to 3.1 s
/// after the server was back, the client's default backoff growing to 4 s
/// between attempts. With `nats.reconnect_delay_max` (250 ms) the sidecar
/// answers within about that. Two outages of 6 s each (long enough for the
/// default backoff to reach its 4 s pauses); a fresh client asks from the
/// moment the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_resumes_within_about_a_second_after_the_server_restarts() {
    let mut server = NatsServer::start();
    let (_data, running) = start_sidecar(&server, "1h", Durability::Local).await;
    let client = server.client().await;
    assert_eq!(
        ask(&client, "dedup.ingest.r0", event("r0")).await,
        Answer::Verdict(true)
    );
    drop(client);
    for round in 1..=2 {
        server.kill();
        tokio::time::sleep(Duration::from_secs(6)).await;
        server.restart();
        let back = std::time::Instant::now();
        let client = async_nats::connect(server.url()).await.unwrap();
        let id = format!("r{round}");
        let answered = loop {
            let asked = client.request(format!("dedup.ingest.{id}"), event(&id));
            match tokio::time::timeout(Duration::from_millis(500), asked).await {
                Ok(Ok(reply)) => break parse_answer(&reply),
                _ if back.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => panic!("no verdict within 10 s of the restart"),
            }
        };
        let took = back.elapsed();
        eprintln!("round {round}: first verdict {took:?} after the server was back");
        assert_eq!(answered, Answer::Verdict(true));
        assert!(
            took < Duration::from_millis(1500),
            "round {round}: first verdict {took:?} after the server was back"
        );
    }
    let client = server.client().await;
    assert_eq!(
        ask(&client, "dedup.ingest.r0", event("r0")).await,
        Answer::Verdict(false),
        "ids from before the outages are remembered"
    );
    running.shutdown().await.unwrap();
}

/// `max_table_bytes`: a million ids of a 1 h window need about 20 MB of
/// tables (8 MB of them the 65 536 segments' own structures, taken once
/// every segment has had an id); with a 12 MiB budget the window in force
/// is halved until they fit, the oldest ids going first, and verdicts stay
/// exact inside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_budget_shrinks_the_window_and_verdicts_stay_exact_inside_it() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut s = settings(&server, data.path(), "1h", Durability::Memory);
    s.config.max_table_bytes = 12 << 20;
    let running = service::start(s).await.unwrap();
    let client = server.client().await;
    let batch = |round: usize| -> Vec<u8> {
        let lines: Vec<Bytes> = (0..1000).map(|i| event(&format!("m{round}x{i}"))).collect();
        lines.join(&b'\n')
    };
    for round in 0..1000 {
        let reply = request(&client, "dedup.batch", batch(round)).await;
        assert!(
            reply.payload.iter().step_by(2).all(|&b| b == b'1'),
            "round {round}: all new"
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let now = eventsieve::engine::unix_ms;
    while running.dedup().memory_bytes() > 12 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "tables still {} bytes, window in force {} ms, {} shrinks",
            running.dedup().memory_bytes(),
            running.dedup().window_in_force(now()),
            running
                .metrics()
                .window_shrinks
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let in_force = running.dedup().window_in_force(now());
    assert!(in_force < 3_600_000, "window in force {in_force} ms");
    assert!(
        running
            .metrics()
            .window_shrinks
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    // Inside the window in force: exact. The first ids went first.
    let fresh = batch(1000);
    let reply = request(&client, "dedup.batch", fresh.clone()).await;
    assert!(reply.payload.iter().step_by(2).all(|&b| b == b'1'));
    let again = request(&client, "dedup.batch", fresh).await;
    assert!(
        again.payload.iter().step_by(2).all(|&b| b == b'0'),
        "duplicates inside the window"
    );
    assert_eq!(
        ask(&client, "dedup.ingest.m0x0", event("m0x0")).await,
        Answer::Verdict(true),
        "the oldest id was dropped"
    );
    running.shutdown().await.unwrap();
}
