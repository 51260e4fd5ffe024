//! `tier = "tiered"`: ids sealed out of the tables into files on disk stay
//! exact duplicates through restarts, forgets, damaged files and crashes.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::Client;
use common::*;
use eventsieve::config::{Durability, Settings, Tier};
use eventsieve::service;

/// The smallest hot tier: 600 000 ids take more than it (the table
/// segments alone take about 7 MiB), so they are sealed.
const HOT_BYTES: u64 = 8 << 20;
const IDS: usize = 600_000;

fn tiered(server: &NatsServer, data: &Path) -> Settings {
    let mut s = settings(server, data, "1h", Durability::Local);
    s.config.tier = Tier::Tiered;
    s.config.hot_bytes = HOT_BYTES;
    s
}

/// The ids of `ids` answered new when sent again, in batches (4 in
/// flight).
async fn new_again<'a>(client: &Client, ids: &'a [String]) -> Vec<&'a String> {
    let verdicts = batch_verdicts_of(client, ids, 4).await;
    ids.iter()
        .zip(verdicts)
        .filter(|(_, v)| *v == b'1')
        .map(|(id, _)| id)
        .collect()
}

/// The value of the metric `name` in `text`.
fn metric(text: &str, name: &str) -> u64 {
    sample(text, name) as u64
}

fn metrics_of(running: &service::Running) -> String {
    running.metrics().render(running.dedup(), Instant::now())
}

/// Waits until the sidecar has sealed and its tables are back under
/// `hot_bytes`, with each of the `ids` ids sent sealed or in the tables
/// (those born within a time unit of the tables before the cut are in
/// both); returns the metrics and how many are sealed.
async fn sealed(running: &service::Running, ids: u64) -> (String, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = metrics_of(running);
        let dedup = running.dedup();
        let sealed = metric(&text, "eventsieve_sealed_ids");
        let in_tables = dedup.live(eventsieve::engine::unix_ms()) as u64;
        if sealed > 0
            && (dedup.table_bytes() as u64) < HOT_BYTES
            && sealed + in_tables >= ids
            && sealed <= ids
        {
            return (text, sealed);
        }
        assert!(
            Instant::now() < deadline,
            "not sealed within 30 s ({sealed} sealed, {in_tables} in the tables):\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sealed_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_ids_stay_duplicates_through_forget_restart_and_a_damaged_file() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let s = tiered(&server, data.path());
    let running = service::start(s.clone()).await.unwrap();
    let client = server.client().await;
    let ids: Vec<String> = (0..IDS).map(|i| format!("t{i}")).collect();
    assert_eq!(new_again(&client, &ids).await.len(), IDS, "all new");

    let (_, sealed) = sealed(&running, IDS as u64).await;
    assert!(sealed >= IDS as u64 / 4, "{sealed} sealed");
    let text = metrics_of(&running);
    let per_id = metric(&text, "eventsieve_sealed_memory_bytes") as f64 / sealed as f64;
    assert!(per_id < 1.5, "{per_id} bytes of RAM per sealed id");
    // `eventsieve status` reads the same figures.
    let status = request(&client, "dedup.status", bytes::Bytes::new()).await;
    let status: serde_json::Value = serde_json::from_slice(&status.payload).unwrap();
    assert_eq!(status["sealed"]["ids"], sealed, "{status}");
    assert!(
        status["sealed"]["disk_bytes"].as_u64().unwrap() > sealed * 28,
        "{status}"
    );

    // Every id again: duplicates, the sealed ones answered from the files.
    assert!(new_again(&client, &ids).await.is_empty(), "all duplicates");
    let text = metrics_of(&running);
    assert!(metric(&text, "eventsieve_sealed_hits_total") >= sealed, "{text}");

    // A sealed id is looked up, forgotten, and accepted again; another is
    // forgotten and left.
    let looked = request(&client, "dedup.lookup.t7", bytes::Bytes::new()).await;
    assert!(
        looked.payload.starts_with(br#"{"remembered":true"#),
        "{:?}",
        looked.payload
    );
    for id in ["t7", "t8"] {
        let forgot = request(&client, &format!("dedup.forget.{id}"), bytes::Bytes::new()).await;
        assert!(
            forgot.payload.starts_with(br#"{"forgotten":true"#),
            "{:?}",
            forgot.payload
        );
    }
    assert_eq!(
        ask(&client, "dedup.ingest.t7", event("t7")).await,
        Answer::Verdict(true)
    );
    running.shutdown().await.unwrap();

    // A byte of a sealed file's first block damaged while stopped: found
    // by the next start's first lookup in it, and rebuilt.
    let dir = data.path().join("sealed");
    let file = sealed_files(&dir)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "sealed"))
        .expect("a sealed file");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();

    let running = service::start(s).await.unwrap();
    assert_eq!(
        new_again(&client, &ids).await,
        ["t8"],
        "after a restart: all duplicates but the id forgotten and not sent since"
    );
    // Its lookups were answered 503 (sent again) until it was rebuilt from
    // the journal (without the two forgotten ids' first arrivals).
    let rebuilt = eventsieve::journal::sealed::Generation::open(&file).unwrap();
    assert!(
        rebuilt.entries().unwrap().all(|e| e.is_ok()),
        "every block of the rebuilt file reads"
    );
    assert!(std::fs::read(&file).unwrap() != bytes, "rebuilt");
    assert!(
        metric(&metrics_of(&running), "eventsieve_not_ready_total") > 0,
        "lookups answered 503 meanwhile"
    );
    running.shutdown().await.unwrap();
}

/// A `.tmp` file in the sealed directory `dir` that is a seal (`seal`) or
/// a merge in progress: a seal's span starts at the newest file's cut, a
/// merge's at an older one's.
fn writing(dir: &Path, seal: bool) -> bool {
    let span = |p: &Path| -> Option<(u64, u64)> {
        let (from, cut) = p.file_stem()?.to_str()?.split_once('-')?;
        Some((from.parse().ok()?, cut.parse().ok()?))
    };
    let files = sealed_files(dir);
    let newest_cut = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "sealed"))
        .filter_map(|p| span(p))
        .map(|(_, cut)| cut)
        .max()
        .unwrap_or(0);
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "tmp"))
        .filter_map(|p| span(p))
        .any(|(from, _)| (from == newest_cut) == seal)
}

/// Sends fresh ids `<prefix><n>` in batches of 1000 until a request fails
/// (the sidecar was killed) or `stop`; returns those answered new.
async fn load_until_killed(
    client: Client,
    prefix: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<String> {
    let mut accepted = Vec::new();
    for batch in 0.. {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let ids: Vec<String> = (0..1000)
            .map(|i| format!("{prefix}{}", batch * 1000 + i))
            .collect();
        let body: Vec<u8> = ids
            .iter()
            .flat_map(|id| [&event(id)[..], b"\n"].concat())
            .collect();
        let reply = client.request("dedup.batch", body.into());
        let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(5), reply).await else {
            break;
        };
        let entries = reply.payload.split(|&b| b == b'\n').filter(|l| !l.is_empty());
        accepted.extend(
            ids.into_iter()
                .zip(entries)
                .filter(|(_, e)| *e == b"1")
                .map(|(id, _)| id),
        );
    }
    accepted
}

/// Runs load against the sidecar binary until the sealed directory shows a
/// seal (or a merge) being written, then SIGKILLs it; returns the ids
/// answered new.
async fn kill_while_writing(
    server: &NatsServer,
    sidecar: SidecarProcess,
    dir: &Path,
    seal: bool,
    prefix: &'static str,
) -> Vec<String> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(load_until_killed(server.client().await, prefix, stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(90);
    while !writing(dir, seal) {
        assert!(
            Instant::now() < deadline,
            "no {} written within 90 s",
            if seal { "seal" } else { "merge" }
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    sidecar.kill();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_seal_and_during_a_merge_loses_no_accepted_id() {
    sigkill_during_seal_and_merge("false").await;
}

/// The same with `sealed_summary`: the summary a crash left naming other
/// files than the directory's is built again at the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_seal_and_during_a_merge_with_a_summary_loses_no_accepted_id() {
    sigkill_during_seal_and_merge("true").await;
}

async fn sigkill_during_seal_and_merge(summary: &str) {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("sealed");
    let env = [
        ("EVENTSIEVE_TIER", "tiered"),
        ("EVENTSIEVE_HOT_BYTES", "8388608"),
        ("EVENTSIEVE_WINDOW", "1h"),
        ("EVENTSIEVE_SEALED_SUMMARY", summary),
    ];
    let client = server.client().await;
    let mut accepted = Vec::new();
    for (seal, prefix) in [(true, "s"), (false, "m")] {
        let sidecar = SidecarProcess::spawn(&server, data.path(), &env);
        wait_for_sidecar(&client).await;
        accepted.extend(kill_while_writing(&server, sidecar, &dir, seal, prefix).await);
        let killed_at = std::time::SystemTime::now();
        let sidecar = SidecarProcess::spawn(&server, data.path(), &env);
        wait_for_sidecar(&client).await;
        assert!(!accepted.is_empty());
        let lost = new_again(&client, &accepted).await;
        assert!(
            lost.is_empty(),
            "{} accepted ids forgotten, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        // (The new process may be writing a `.tmp` of its own by now: a
        // merge done again, a summary saved.)
        let left: Vec<PathBuf> = sealed_files(&dir)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "tmp"))
            .filter(|p| {
                std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < killed_at)
            })
            .collect();
        assert!(left.is_empty(), "the cut-short file was removed: {left:?}");
        sidecar.kill();
    }
}

/// A replicated tiered sidecar process `node`, its metrics on `addr`,
/// with `sealed_summary` = `summary`.
fn replicated_node(
    server: &NatsServer,
    data: &Path,
    node: &str,
    addr: &str,
    summary: &str,
) -> SidecarProcess {
    let env = [
        ("EVENTSIEVE_SEALED_SUMMARY", summary),
        ("EVENTSIEVE_DURABILITY", "replicated"),
        ("EVENTSIEVE_CLUSTER__NODE_ID", node),
        ("EVENTSIEVE_TIER", "tiered"),
        ("EVENTSIEVE_HOT_BYTES", "8388608"),
        ("EVENTSIEVE_WINDOW", "1h"),
        ("EVENTSIEVE_METRICS_ADDR", addr),
    ];
    SidecarProcess::spawn(server, data, &env)
}

/// The metric `name` of the sidecar serving metrics on `addr` (0 while
/// it cannot be read).
fn scraped(addr: &str, name: &str) -> f64 {
    let text = ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the metric `name` on `addr` is at least `at_least`.
async fn wait_metric(addr: &str, name: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while scraped(addr, name) < at_least {
        assert!(
            Instant::now() < deadline,
            "{name} on {addr} not at {at_least} within 60 s: {}",
            scraped(addr, name)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The adopted files in the sealed directory `dir`.
fn adopted_files(dir: &Path) -> Vec<PathBuf> {
    sealed_files(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("adopted-"))
        })
        .collect()
}

/// Replicated: a node that takes over shards of a SIGKILLed one finds in
/// the journal stream ids from before its own seals' cut; it seals them
/// (an adopted file per shard) instead of losing them from its tables. A
/// node that comes back with its sealed files, and the last node left,
/// answer every id accepted anywhere as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_nodes_keep_sealed_ids_through_a_sigkill_takeover_and_a_return() {
    let server = NatsServer::start();
    let client = server.client().await;
    let tmp = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let (a_addr, b_addr) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    // B keeps a summary over its files, A each file's filters: each is
    // taken over from once.
    let a = replicated_node(&server, &a_dir, "a", &a_addr, "false");
    let b = replicated_node(&server, &b_dir, "b", &b_addr, "true");
    let leases = "eventsieve_leases_held";
    let deadline = Instant::now() + Duration::from_secs(60);
    while scraped(&a_addr, leases) + scraped(&b_addr, leases) < 32.0
        || scraped(&a_addr, leases) == 0.0
        || scraped(&b_addr, leases) == 0.0
    {
        assert!(Instant::now() < deadline, "the shards not shared within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Enough ids for each node's tables to pass hot_bytes and seal.
    let first: Vec<String> = (0..1_200_000).map(|i| format!("r{i}")).collect();
    let verdicts = batch_verdicts_of(&client, &first, 4).await;
    assert!(verdicts.iter().all(|v| *v == b'1'), "every first id new");
    wait_metric(&a_addr, "eventsieve_seals_total", 1.0).await;
    wait_metric(&b_addr, "eventsieve_seals_total", 1.0).await;

    // B takes A's shards: A's ids from before B's cut come from the
    // journal stream into B's adopted files.
    // (A node starved of CPU may have let shards go to B already; those
    // B took then, with nothing yet sealed to adopt.)
    let a_held = scraped(&a_addr, leases);
    a.kill();
    wait_metric(&b_addr, leases, 32.0).await;
    wait_for_sidecar(&client).await;
    // (Verdicts wait for every takeover to finish: a shard is leased
    // before its journal is replayed.)
    let lost = new_again(&client, &first).await;
    assert!(
        lost.is_empty(),
        "{} ids forgotten after the takeover, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let adopted = adopted_files(&b_dir.join("sealed"));
    println!(
        "A held {a_held} shards when killed; B adopted {} files",
        adopted.len()
    );
    assert!(a_held == 0.0 || !adopted.is_empty(), "B adopted A's sealed ids");

    // A comes back with its copy and sealed files, takes shards back, and
    // more ids arrive; then B is killed and A holds everything.
    let a = replicated_node(&server, &a_dir, "a", &a_addr, "false");
    wait_metric(&a_addr, leases, 1.0).await;
    let second: Vec<String> = (0..600_000).map(|i| format!("q{i}")).collect();
    let verdicts = batch_verdicts_of(&client, &second, 4).await;
    assert!(verdicts.iter().all(|v| *v == b'1'), "every second id new");
    b.kill();
    wait_metric(&a_addr, leases, 32.0).await;
    wait_for_sidecar(&client).await;
    let all: Vec<String> = first.into_iter().chain(second).collect();
    let lost = new_again(&client, &all).await;
    assert!(
        lost.is_empty(),
        "{} ids forgotten after the second takeover, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    a.kill();
}
