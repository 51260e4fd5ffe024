//! The built `eventsieve` binary as a real process: crash safety under
//! SIGKILL, clean shutdown under SIGTERM, and configuration errors.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::{Client, RequestErrorKind};
use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use tokio::sync::Mutex;

/// What happened to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Answered(Answer),
    /// The subscription was gone (after drain or crash): no responder.
    NoResponders,
    /// Sent, never answered.
    TimedOut,
}

async fn send(client: &Client, id: &str) -> Outcome {
    let request = client.request(format!("dedup.ingest.{id}"), event(id));
    match tokio::time::timeout(Duration::from_secs(5), request).await {
        Ok(Ok(reply)) => Outcome::Answered(parse_answer(&reply)),
        Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => Outcome::NoResponders,
        Ok(Err(_)) | Err(_) => Outcome::TimedOut,
    }
}

/// Sends fresh ids `p<n>` with 64 in flight until `stop` is set or `max`
/// ids were sent; returns every outcome.
async fn load(client: Client, stop: Arc<AtomicBool>, max: usize) -> Vec<(String, Outcome)> {
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    futures_util::stream::iter(0..64)
        .for_each_concurrent(64, |_| {
            let (client, stop, next, results) = (client.clone(), stop.clone(), next.clone(), results.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= max {
                        break;
                    }
                    let id = format!("p{n}");
                    let outcome = send(&client, &id).await;
                    results.lock().await.push((id, outcome));
                }
            }
        })
        .await;
    Arc::try_unwrap(results).unwrap().into_inner()
}

async fn wait_accepted(results_hint: &AtomicUsize, at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while results_hint.load(Ordering::Relaxed) < at_least {
        assert!(Instant::now() < deadline, "load made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ids that got `true`.
fn accepted(results: &[(String, Outcome)]) -> Vec<String> {
    results
        .iter()
        .filter(|(_, o)| *o == Outcome::Answered(Answer::Verdict(true)))
        .map(|(id, _)| id.clone())
        .collect()
}

/// A sidecar binary on `server` with its store in `data`, answering.
async fn spawn_ready(server: &NatsServer, data: &std::path::Path, client: &Client) -> SidecarProcess {
    let sidecar = SidecarProcess::spawn(server, data, &[]);
    wait_for_sidecar(client).await;
    sidecar
}

/// Every id that got `true` must now be a duplicate.
async fn assert_all_remembered(client: &Client, accepted: &[String]) {
    assert!(!accepted.is_empty());
    let answers: Vec<(String, Outcome)> = futures_util::stream::iter(accepted.iter().cloned())
        .map(|id| async move {
            let o = send(client, &id).await;
            (id, o)
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for (id, outcome) in answers {
        assert_eq!(
            outcome,
            Outcome::Answered(Answer::Verdict(false)),
            "{id} was accepted before and must be a duplicate"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_accepted_id() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let client = server.client().await;
    let sidecar = spawn_ready(&server, data.path(), &client).await;

    let stop = Arc::new(AtomicBool::new(false));
    let progress = server.client().await;
    let load_task = tokio::spawn(load(client.clone(), stop.clone(), 200_000));
    // Let some thousands be accepted, then crash mid-stream.
    let accepted_so_far = Arc::new(AtomicUsize::new(0));
    {
        let counter = accepted_so_far.clone();
        let mut out = progress.subscribe("events.unique.*").await.unwrap();
        tokio::spawn(async move {
            while out.next().await.is_some() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    wait_accepted(&accepted_so_far, 3_000).await;
    sidecar.kill();
    stop.store(true, Ordering::Relaxed);
    let results = load_task.await.unwrap();
    let accepted = accepted(&results);
    assert!(accepted.len() >= 3_000, "{} accepted", accepted.len());

    let restarted = spawn_ready(&server, data.path(), &client).await;
    assert_all_remembered(&client, &accepted).await;
    assert_eq!(restarted.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_everything_in_flight_and_exits_0() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let client = server.client().await;
    let sidecar = spawn_ready(&server, data.path(), &client).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load_task = tokio::spawn(load(client.clone(), stop.clone(), 200_000));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = tokio::task::spawn_blocking(move || sidecar.terminate())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM");
    stop.store(true, Ordering::Relaxed);
    let results = load_task.await.unwrap();
    let timed_out: Vec<&String> = results
        .iter()
        .filter(|(_, o)| *o == Outcome::TimedOut)
        .map(|(id, _)| id)
        .collect();
    assert!(timed_out.is_empty(), "unanswered: {timed_out:?}");
    let accepted = accepted(&results);
    assert!(accepted.len() > 100, "{} accepted", accepted.len());

    let restarted = spawn_ready(&server, data.path(), &client).await;
    assert_all_remembered(&client, &accepted).await;
    assert_eq!(restarted.terminate().code(), Some(0));
}

/// Fault: with the server gone, SIGTERM logged "Shutting down" and the
/// sidecar then waited for a reconnection for over 15 minutes. Shutdown is
/// bounded by `shutdown_timeout`, commits what is pending, and exits
/// non-zero because it could not confirm its answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nats_gone_exits_within_the_shutdown_timeout_and_keeps_accepted_ids() {
    let mut server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let client = server.client().await;
    let mut sidecar = SidecarProcess::spawn(&server, data.path(), &[("EVENTSIEVE_SHUTDOWN_TIMEOUT", "2s")]);
    wait_for_sidecar(&client).await;
    let ids: Vec<String> = (0..200).map(|i| format!("g{i}")).collect();
    for id in &ids {
        assert_eq!(send(&client, id).await, Outcome::Answered(Answer::Verdict(true)));
    }
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    sidecar.signal_term();
    let status = tokio::task::spawn_blocking(move || {
        let status = sidecar.wait_exit(Duration::from_secs(20));
        (status, sidecar)
    })
    .await
    .unwrap();
    let status = status
        .0
        .expect("sidecar exited within 20 s of SIGTERM (shutdown_timeout 2 s)");
    let took = started.elapsed();
    assert!(
        !status.success(),
        "shutdown that could not finish answering is an error: {status:?}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // Nothing acknowledged was lost: a new server, the same store.
    let server = NatsServer::start();
    let client = server.client().await;
    let restarted = spawn_ready(&server, data.path(), &client).await;
    assert_all_remembered(&client, &ids).await;
    assert_eq!(restarted.terminate().code(), Some(0));
}

/// A second SIGTERM ends a shutdown that is still waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    let mut server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let client = server.client().await;
    let mut sidecar = SidecarProcess::spawn(&server, data.path(), &[("EVENTSIEVE_SHUTDOWN_TIMEOUT", "10m")]);
    wait_for_sidecar(&client).await;
    server.kill();
    sidecar.signal_term();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        sidecar.wait_exit(Duration::ZERO).is_none(),
        "still shutting down (waiting for NATS)"
    );
    sidecar.signal_term();
    let status = sidecar
        .wait_exit(Duration::from_secs(3))
        .expect("exited within 3 s of the second SIGTERM");
    assert!(!status.success(), "{status:?}");
}

#[test]
fn invalid_configuration_exits_2_naming_the_field() {
    let cases = [
        ("EVENTSIEVE_WINDOW", "8d", "window"),
        ("EVENTSIEVE_DURABILITY", "disk", "durability"),
        ("EVENTSIEVE_SHARDS", "0", "shards"),
    ];
    for (var, value, field) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_eventsieve"))
            .arg("run")
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(stderr.contains(field), "{var}={value}: {stderr}");
    }
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_eventsieve"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for sub in ["run", "config", "shard"] {
        assert!(help.contains(sub), "{help}");
    }
}

/// Fault: `eventsieve config` printed the NATS password and token, and a
/// password in the URL reached the log when the connection failed (the
/// client logs the servers it tries). Secrets are printed as `<redacted>`,
/// and credentials leave the URL before the client sees it.
#[test]
fn secrets_never_reach_the_output_or_the_log() {
    let data = tempfile::tempdir().unwrap();
    let secrets = [
        ("EVENTSIEVE_NATS__PASSWORD", "hunter3"),
        ("EVENTSIEVE_NATS__TOKEN", "t0ken3"),
    ];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eventsieve"))
        .arg("config")
        .env("EVENTSIEVE_NATS__USER", "bob")
        .envs(secrets)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && printed.contains("bob"), "{printed}");
    assert!(
        printed.contains("<redacted>") && !printed.contains("hunter3") && !printed.contains("t0ken3"),
        "{printed}"
    );

    // Debug logging, a server that refuses: every line the process writes.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eventsieve"))
        .arg("run")
        .env("EVENTSIEVE_NATS__URL", "nats://alice:hunter2@127.0.0.1:1")
        .env("EVENTSIEVE_DATA_DIR", data.path())
        .env("EVENTSIEVE_METRICS_ADDR", "")
        .env("EVENTSIEVE_LOG", "debug")
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    assert!(
        all.contains("cannot connect") && all.contains("127.0.0.1:1"),
        "{all}"
    );
    assert!(!all.contains("hunter2"), "the password was printed: {all}");
}

/// A store of `n` ids accepted now, written through the library in chunks
/// of 1000 as group commits would; the fingerprint of one id in it.
fn store_with_ids(dir: &std::path::Path, n: u64) -> [u8; 16] {
    use eventsieve::engine::{Record, fingerprint::Fingerprint, unix_ms};
    use eventsieve::journal::{Journal, LmdbStore, StoreMeta};
    let meta = StoreMeta {
        shards: 32,
        window_ms: 7 * 86_400_000,
        shard_key: String::new(),
    };
    let mut store = LmdbStore::open(dir, meta, false).unwrap();
    let now = unix_ms();
    let fp = |i: u64| Fingerprint::of(format!("c{i}").as_bytes());
    for start in (0..n).step_by(1000) {
        let records: Vec<Record> = (start..(start + 1000).min(n))
            .map(|i| Record {
                shard: eventsieve::engine::shard::shard_of(&format!("c{i}"), 32),
                born_ms: now,
                fingerprint: fp(i),
            })
            .collect();
        store.append(&records).unwrap();
    }
    store.sync().unwrap();
    fp(n / 2).to_bytes()
}

fn eventsieve(args: &[&str], data: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_eventsieve"))
        .args(args)
        .env("EVENTSIEVE_DATA_DIR", data)
        .env("EVENTSIEVE_NATS__URL", "nats://127.0.0.1:1")
        .env("EVENTSIEVE_METRICS_ADDR", "")
        .output()
        .unwrap()
}

/// Fault: bytes changed in `data.mdb` made the next start crash with
/// SIGSEGV and no message, or start and accept stored ids again. Now each
/// chunk has a checksum, `eventsieve store verify` checks them in a process
/// of its own, and `run` does that check before it opens the store.
#[test]
fn a_damaged_store_stops_the_start_with_a_message_naming_it() {
    let data = tempfile::tempdir().unwrap();
    let inside = store_with_ids(data.path(), 200_000);
    let dir = data.path().display().to_string();

    let out = eventsieve(&["store", "verify", "--data-dir", &dir], data.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("200000 ids"), "{stdout}");

    // 16 bytes inside a chunk (every copy: LMDB's free pages may hold an
    // older one): a silent re-accept before.
    let path = data.path().join("data.mdb");
    let mut bytes = std::fs::read(&path).unwrap();
    let copies: Vec<usize> = (0..bytes.len() - 16)
        .filter(|&i| bytes[i..i + 16] == inside)
        .collect();
    assert!(!copies.is_empty(), "a stored fingerprint");
    for at in copies {
        for b in &mut bytes[at..at + 16] {
            *b = !*b;
        }
    }
    std::fs::write(&path, &bytes).unwrap();
    let out = eventsieve(&["store", "verify", "--data-dir", &dir], data.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("damaged") && stderr.contains(&dir), "{stderr}");
    let out = eventsieve(&["run"], data.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("damaged") && stderr.contains(&dir), "{stderr}");

    // 64 KiB of zeros in the middle of a fresh store: a SIGSEGV before.
    let data = tempfile::tempdir().unwrap();
    store_with_ids(data.path(), 200_000);
    let dir = data.path().display().to_string();
    let path = data.path().join("data.mdb");
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2 / 4096 * 4096;
    bytes[mid..mid + 65_536].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let out = eventsieve(&["run"], data.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exits with a message, not a signal: {stderr}"
    );
    assert!(
        stderr.contains(&dir) && !stderr.contains("cannot connect"),
        "{stderr}"
    );
}

/// Peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kb * 1024
}

/// Fault: in-flight requests were bounded in messages (65 536 of up to
/// 1 MiB), so a flood of large batches grew the sidecar to gigabytes and
/// the server cut it off. Now the bytes held are bounded
/// (`max_inflight_bytes`): what does not fit is answered 503 at once, one
/// entry per line, and every request gets an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_batches_is_answered_within_the_byte_budget() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let client = server.client().await;
    let budget = 8 << 20;
    let sidecar = SidecarProcess::spawn(
        &server,
        data.path(),
        &[("EVENTSIEVE_MAX_INFLIGHT_BYTES", &budget.to_string())],
    );
    wait_for_sidecar(&client).await;
    let before = peak_rss(sidecar.pid());
    // 48 batches of 4 500 lines of about 220 bytes: about 1 MB each, all
    // at once (below nats-server's 64 MB of pending bytes per client, past
    // which the server itself would cut the sidecar off).
    let lines = 4_500;
    let bodies: Vec<Bytes> = (0..48)
        .map(|b| {
            let mut body = Vec::with_capacity(lines * 230);
            for i in 0..lines {
                body.extend_from_slice(
                    format!(r#"{{"event_id":"f{b}x{i}","pad":"{}"}}"#, "p".repeat(180)).as_bytes(),
                );
                body.push(b'\n');
            }
            Bytes::from(body)
        })
        .collect();
    let replies = futures_util::future::join_all(bodies.iter().map(|body| {
        let client = client.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(60),
                client.request("dedup.batch", body.clone()),
            )
            .await
            .expect("answered within 60 s")
            .expect("answered")
        }
    }))
    .await;
    let (mut decided, mut refused) = (0, 0);
    for reply in &replies {
        let entries = eventsieve::engine::batch::decode(&reply.payload).expect("a batch reply");
        assert_eq!(entries.len(), lines, "one entry per line");
        match &entries[0] {
            eventsieve::engine::batch::Entry::Error { code: 503, reason } => {
                assert!(reason.contains("overloaded"), "{reason}");
                refused += 1;
            }
            eventsieve::engine::batch::Entry::New => decided += 1,
            other => panic!("unexpected entry {other:?}"),
        }
    }
    let grew = peak_rss(sidecar.pid()).saturating_sub(before);
    println!(
        "flood: {decided} batches decided, {refused} refused, peak RSS grew {} MiB",
        grew >> 20
    );
    assert!(decided > 0 && refused > 0, "{decided} decided, {refused} refused");
    assert_eq!(sidecar.terminate().code(), Some(0));
}

/// Fault: with `shards = 65536` the highest shard's ids were not recovered
/// (the store's range bound wrapped), and an idle sidecar took gigabytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_highest_of_65536_shards_keeps_its_ids_across_a_restart() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let client = server.client().await;
    let id = (0u64..)
        .map(|i| format!("h{i}"))
        .find(|id| eventsieve::engine::shard::shard_of(id, 65_536) == 65_535)
        .unwrap();
    let env = [("EVENTSIEVE_SHARDS", "65536")];
    let sidecar = SidecarProcess::spawn(&server, data.path(), &env);
    wait_for_sidecar(&client).await;
    let rss = peak_rss(sidecar.pid());
    assert!(
        rss < 256 << 20,
        "an idle sidecar with 65536 shards peaked at {} MiB",
        rss >> 20
    );
    assert_eq!(
        ask(&client, "dedup.ingest", event(&id)).await,
        Answer::Verdict(true)
    );
    assert_eq!(sidecar.terminate().code(), Some(0));

    let sidecar = SidecarProcess::spawn(&server, data.path(), &env);
    wait_for_sidecar(&client).await;
    assert_eq!(
        ask(&client, "dedup.ingest", event(&id)).await,
        Answer::Verdict(false),
        "{id} (shard 65535) remembered after the restart"
    );
    assert_eq!(sidecar.terminate().code(), Some(0));
}

/// `output = "jetstream"`: five SIGKILLs of the sidecar while 32 producers
/// each retry an id (timeout, no responder, 503) until it gets a verdict.
/// Every id ends up in the output stream exactly once, whether its verdict
/// was `true` or, after a crash between commit and reply, `false`.
/// 32 producers each retrying an id (timeout, no responder, 503) until it
/// gets a verdict, `ids` in all, while the sidecar (with `env`) is
/// SIGKILLed `kills` times; the verdicts.
async fn retry_through_kills(
    server: &NatsServer,
    data: &std::path::Path,
    env: &[(&str, &str)],
    ids: usize,
    kills: usize,
) -> Vec<(String, bool)> {
    let client = server.client().await;
    let mut sidecar = SidecarProcess::spawn(server, data, env);
    wait_for_sidecar(&client).await;

    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let producers = {
        let (client, next, done) = (client.clone(), next.clone(), done.clone());
        tokio::spawn(async move {
            let verdicts = Arc::new(Mutex::new(Vec::new()));
            futures_util::stream::iter(0..32)
                .for_each_concurrent(32, |_| {
                    let (client, next, done, verdicts) =
                        (client.clone(), next.clone(), done.clone(), verdicts.clone());
                    async move {
                        loop {
                            let n = next.fetch_add(1, Ordering::Relaxed);
                            if n >= ids {
                                break;
                            }
                            let id = format!("x{n}");
                            let deadline = Instant::now() + Duration::from_secs(60);
                            let verdict = loop {
                                assert!(Instant::now() < deadline, "{id}: no verdict in 60 s");
                                let request = client.request(format!("dedup.ingest.{id}"), event(&id));
                                // No answer (crash, no responder): try again.
                                if let Ok(Ok(reply)) =
                                    tokio::time::timeout(Duration::from_secs(1), request).await
                                {
                                    match parse_answer(&reply) {
                                        Answer::Verdict(v) => break v,
                                        Answer::Error(503, _) => {}
                                        other => panic!("{id}: {other:?}"),
                                    }
                                }
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            };
                            verdicts.lock().await.push((id, verdict));
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
                .await;
            Arc::try_unwrap(verdicts).unwrap().into_inner()
        })
    };
    for kill in 1..=kills {
        wait_accepted(&done, kill * ids / (kills + 2)).await;
        sidecar.kill();
        sidecar = SidecarProcess::spawn(server, data, env);
        wait_for_sidecar(&client).await;
    }
    let verdicts = producers.await.unwrap();
    sidecar.terminate();
    verdicts
}

/// With routing rules and `output = "jetstream"`: ids ending in 0 also go
/// to `fraud.orders` (a stream of its own). Across three SIGKILLs, every
/// id is in the output stream once and each of those in the fraud stream
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_copies_reach_their_streams_exactly_once_across_sigkills() {
    const IDS: usize = 2_000;
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "FRAUD".into(),
        subjects: vec!["fraud.orders".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "eventsieve".into(),
            history: 8,
            ..Default::default()
        })
        .await
        .unwrap();
    let rules =
        "[[rule]]\nname = \"tens\"\nwhen = 'key.endsWith(\"0\")'\nto = [\"fraud.orders\"]\ncontinue = true\n";
    kv.put("rules", Bytes::from(rules)).await.unwrap();
    let env = [("EVENTSIEVE_OUTPUT", "jetstream")];
    let verdicts = retry_through_kills(&server, data.path(), &env, IDS, 3).await;
    assert_eq!(verdicts.len(), IDS);

    let copies = output_copies(&client).await;
    let mut fraud = js.get_stream("FRAUD").await.unwrap();
    let last = fraud.info().await.unwrap().state.last_sequence;
    let mut fraud_copies = std::collections::HashMap::new();
    for seq in 1..=last {
        let m = fraud.get_raw_message(seq).await.unwrap();
        let msg_id = m
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .unwrap()
            .to_string();
        let id = msg_id
            .strip_suffix(":fraud.orders")
            .expect("a routed copy's id")
            .to_owned();
        assert_eq!(m.payload, event(&id), "byte for byte");
        *fraud_copies.entry(id).or_insert(0) += 1;
    }
    for (id, _) in &verdicts {
        assert_eq!(
            copies.get(id),
            Some(&1),
            "{id} must be in the output stream exactly once"
        );
        let want = id.ends_with('0').then_some(&1);
        assert_eq!(fraud_copies.get(id), want, "{id} in the fraud stream");
    }
    assert_eq!(copies.len(), IDS, "nothing else in the output stream");
    assert_eq!(fraud_copies.len(), IDS / 10, "nothing else in the fraud stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_output_holds_each_id_exactly_once_across_sigkills() {
    const IDS: usize = 4_000;
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let client = server.client().await;
    let env = [("EVENTSIEVE_OUTPUT", "jetstream")];
    let verdicts = retry_through_kills(&server, data.path(), &env, IDS, 5).await;
    assert_eq!(verdicts.len(), IDS);
    let retried_false = verdicts.iter().filter(|(_, v)| !v).count();

    let copies = output_copies(&client).await;
    for (id, _) in &verdicts {
        assert_eq!(
            copies.get(id),
            Some(&1),
            "{id} must be in the stream exactly once"
        );
    }
    assert_eq!(copies.len(), IDS, "nothing else in the stream");
    eprintln!("{IDS} ids, 5 SIGKILLs: {retried_false} answered false on a retry, each once in the stream");
}

/// The pid of a child of `parent` (from /proc), if it has one.
fn child_of(parent: u32) -> Option<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{parent}/task")).ok()?;
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .next()
}

/// Fault: a store whose check never finished (a damaged file sent it in
/// circles) hung the start with nothing in the log, and the check lived on
/// when `run` was killed. Here the check's read of `data.mdb` never
/// returns (a FIFO stands in for a disk that hangs): `store verify` gives
/// up after its timeout, `run` stops with the damaged-store message, and a
/// check whose `run` is killed dies with it.
#[test]
fn a_store_check_that_never_finishes_is_bounded_and_dies_with_its_parent() {
    let data = tempfile::tempdir().unwrap();
    store_with_ids(data.path(), 1_000);
    let dir = data.path().display().to_string();
    let path = data.path().join("data.mdb");
    std::fs::remove_file(&path).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&path).status().unwrap();
    assert!(made.success(), "mkfifo");

    let started = std::time::Instant::now();
    let out = eventsieve(
        &["store", "verify", "--timeout", "2s", "--data-dir", &dir],
        data.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("did not finish") && stderr.contains(&dir),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eventsieve"))
        .arg("run")
        .env("EVENTSIEVE_DATA_DIR", data.path())
        .env("EVENTSIEVE_NATS__URL", "nats://127.0.0.1:1")
        .env("EVENTSIEVE_METRICS_ADDR", "")
        .env("EVENTSIEVE_VERIFY_STORE_TIMEOUT", "2s")
        .env("EVENTSIEVE_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("did not finish") && stderr.contains(&dir),
        "{stderr}"
    );
    assert!(
        format!("{stdout}{stderr}").contains("Checking the store"),
        "the check is logged: {stdout}{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );

    // `run` killed while its check hangs: the check dies too.
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_eventsieve"))
        .arg("run")
        .env("EVENTSIEVE_DATA_DIR", data.path())
        .env("EVENTSIEVE_NATS__URL", "nats://127.0.0.1:1")
        .env("EVENTSIEVE_METRICS_ADDR", "")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let check = loop {
        if let Some(pid) = child_of(run.id()) {
            break pid;
        }
        assert!(std::time::Instant::now() < deadline, "no check process started");
        std::thread::sleep(Duration::from_millis(20));
    };
    run.kill().unwrap();
    run.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{check}")).exists()
        && !std::fs::read_to_string(format!("/proc/{check}/stat")).is_ok_and(|s| s.contains(") Z "))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the check {check} outlived its killed parent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An 8 MiB tmpfs, unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
    _parent: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> Self {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test puts the store on an 8 MiB tmpfs: run it as root (or with CAP_SYS_ADMIN), as CI does"
        );
        Self {
            path,
            _parent: parent,
        }
    }

    /// Writes a file until the filesystem is full; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 16 * 1024];
        while file.write_all(&block).and_then(|()| file.sync_all()).is_ok() {}
        let small = [0u8; 512];
        while file.write_all(&small).is_ok() {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.path).status();
    }
}

/// Fault: on a full disk, batches of fresh ids each sent twice got `!500`
/// for the first copies and `0` for the second, and single events for ids
/// of a batch whose commit was failing got `false`: 2 600 answers of
/// `false` for ids that were never kept. Now every id answered `false` (or
/// `true`) is kept once space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_answers_false_for_an_id_not_kept() {
    let server = NatsServer::start();
    let client = server.client().await;
    let disk = SmallDisk::mount();
    let data = disk.path.join("store");
    let sidecar = spawn_ready(&server, &data, &client).await;
    assert_eq!(
        send(&client, "warm").await,
        Outcome::Answered(Answer::Verdict(true))
    );
    let filler = disk.fill();

    // Every answer each id got: `Some(verdict)` or `None` for an error.
    let mut answers: std::collections::HashMap<String, Vec<Option<bool>>> = Default::default();
    for round in 0..8 {
        let ids: Vec<String> = (0..500).map(|i| format!("d{round}x{i}")).collect();
        let lines: Vec<Bytes> = ids.iter().chain(&ids).map(|id| event(id)).collect();
        let body = lines.join(&b'\n');
        let batch = request(&client, "dedup.batch", body);
        let singles = futures_util::future::join_all(ids.iter().step_by(5).map(|id| send(&client, id)));
        let (reply, singles) = tokio::join!(batch, singles);
        let entries = eventsieve::engine::batch::decode(&reply.payload).unwrap();
        for (id, entry) in ids.iter().chain(&ids).zip(entries) {
            let answer = match entry {
                eventsieve::engine::batch::Entry::New => Some(true),
                eventsieve::engine::batch::Entry::Duplicate => Some(false),
                eventsieve::engine::batch::Entry::Error { .. } => None,
            };
            answers.entry(id.clone()).or_default().push(answer);
        }
        for (id, outcome) in ids.iter().step_by(5).zip(singles) {
            let answer = match outcome {
                Outcome::Answered(Answer::Verdict(v)) => Some(v),
                _ => None,
            };
            answers.entry(id.clone()).or_default().push(answer);
        }
    }
    std::fs::remove_file(&filler).unwrap();

    let all: Vec<&Option<bool>> = answers.values().flatten().collect();
    let (trues, falses) = (
        all.iter().filter(|a| ***a == Some(true)).count(),
        all.iter().filter(|a| ***a == Some(false)).count(),
    );
    let errors = all.len() - trues - falses;
    let mut not_kept = Vec::new();
    for (id, got) in &answers {
        let told = got.iter().any(Option::is_some);
        if told && send(&client, id).await != Outcome::Answered(Answer::Verdict(false)) {
            not_kept.push((id.clone(), got.clone()));
        }
    }
    println!(
        "full disk: {} answers ({trues} true, {falses} false, {errors} errors); {} ids told a verdict but not kept",
        all.len(),
        not_kept.len()
    );
    assert!(errors > 100, "the disk was full: {errors} errors");
    assert!(not_kept.is_empty(), "answered, not kept: {not_kept:?}");
    // With room again, the ids that got errors are new, and then kept.
    assert_eq!(
        send(&client, "d0x1").await,
        Outcome::Answered(Answer::Verdict(true))
    );
    assert_eq!(
        send(&client, "d0x1").await,
        Outcome::Answered(Answer::Verdict(false))
    );
    drop(sidecar);
}
