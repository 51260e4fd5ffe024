//! `durability = "replicated"`: sidecar processes sharing the shards
//! through leases in the KV bucket, with the journal in JetStream. Real
//! nats-server, real processes, producers that retry; every verdict is
//! recorded and checked: no id is `true` twice, none that was `true` is
//! forgotten.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::{Client, RequestErrorKind};
use common::*;
use eventsieve::engine::shard::shard_of;
use futures_util::StreamExt;
use tokio::sync::Mutex;

const SHARDS: u32 = 32;

/// A replicated sidecar process named `node`.
fn spawn_node(
    server: &NatsServer,
    data: &std::path::Path,
    node: &str,
    extra: &[(&str, &str)],
) -> SidecarProcess {
    let mut env = vec![
        ("EVENTSIEVE_DURABILITY", "replicated"),
        ("EVENTSIEVE_CLUSTER__NODE_ID", node),
        ("EVENTSIEVE_WINDOW", "1h"),
    ];
    env.extend_from_slice(extra);
    SidecarProcess::spawn(server, data, &env)
}

/// Three replicated sidecar processes `n0`..`n2` on the three-server
/// cluster, journal at R3; their data directories.
fn r3_nodes(servers: &NatsCluster) -> (Vec<SidecarProcess>, Vec<tempfile::TempDir>) {
    let url = servers.url();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let node = format!("n{i}");
            let env = [
                ("EVENTSIEVE_DURABILITY", "replicated"),
                ("EVENTSIEVE_CLUSTER__NODE_ID", node.as_str()),
                ("EVENTSIEVE_CLUSTER__REPLICAS", "3"),
                ("EVENTSIEVE_WINDOW", "1h"),
            ];
            SidecarProcess::spawn_on(&url, dir.path(), &env)
        })
        .collect();
    (nodes, dirs)
}

/// Every lease in the bucket: shard → owner (empty: released).
async fn owners(client: &Client) -> BTreeMap<u32, String> {
    let js = async_nats::jetstream::new(client.clone());
    let Ok(kv) = js.get_key_value("eventsieve").await else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for shard in 0..SHARDS {
        if let Ok(Some(value)) = kv.get(format!("shard.{shard}")).await {
            let lease: serde_json::Value = serde_json::from_slice(&value).unwrap();
            out.insert(shard, lease["owner"].as_str().unwrap().to_owned());
        }
    }
    out
}

/// An id that falls in `shard`, not used before (`tag` makes it unique).
fn id_in(shard: u32, tag: &str) -> String {
    (0u64..)
        .map(|i| format!("{tag}x{i}"))
        .find(|id| shard_of(id, SHARDS) == shard)
        .unwrap()
}

/// Sends `id` until it gets a verdict (retrying after 503, no responders
/// or a timeout, for at most 60 s); the verdict, how many tries it took
/// and how many of them timed out (got no answer at all).
async fn decide(client: &Client, id: &str) -> (bool, u32, u32) {
    decide_event(client, id, event(id)).await
}

/// [`decide`] for the event `body` of `id`.
async fn decide_event(client: &Client, id: &str, body: bytes::Bytes) -> (bool, u32, u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut tries, mut timeouts) = (0, 0);
    loop {
        tries += 1;
        let request = client.request(format!("dedup.ingest.{id}"), body.clone());
        match tokio::time::timeout(Duration::from_secs(2), request).await {
            Ok(Ok(reply)) => match parse_answer(&reply) {
                Answer::Verdict(v) => return (v, tries, timeouts),
                Answer::Error(503, _) => {}
                Answer::Error(code, reason) => panic!("{id}: {code} {reason}"),
            },
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {}
            Ok(Err(_)) | Err(_) => timeouts += 1,
        }
        assert!(
            Instant::now() < deadline,
            "{id}: no verdict within 60 s ({tries} tries)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every verdict each id got.
#[derive(Default)]
struct Ledger {
    verdicts: Mutex<HashMap<String, Vec<bool>>>,
    retried: AtomicUsize,
    /// Requests that got no answer at all (timed out).
    unanswered: AtomicUsize,
}

impl Ledger {
    async fn send(&self, client: &Client, id: &str) {
        let (verdict, tries, timeouts) = decide(client, id).await;
        if tries > 1 {
            self.retried.fetch_add(1, Ordering::Relaxed);
        }
        self.unanswered.fetch_add(timeouts as usize, Ordering::Relaxed);
        self.record(id, verdict).await;
    }

    async fn record(&self, id: &str, verdict: bool) {
        self.verdicts
            .lock()
            .await
            .entry(id.to_owned())
            .or_default()
            .push(verdict);
    }

    /// The invariant checker after a fault: every id answered `true` or
    /// `false` is asked again and must be a duplicate (kept). Returns how
    /// many verdicts were `true` and `false`, and the ids not kept with
    /// what they were told (must be none).
    async fn kept(&self, client: &Client) -> (usize, usize, Vec<(String, Vec<bool>)>) {
        let verdicts = self.verdicts.lock().await.clone();
        let mut lost = Vec::new();
        for (id, v) in &verdicts {
            if decide(client, id).await.0 {
                lost.push((id.clone(), v.clone()));
            }
        }
        let trues = verdicts.values().flatten().filter(|v| **v).count();
        let falses = verdicts.values().flatten().count() - trues;
        (trues, falses, lost)
    }

    /// No id was `true` twice; every id was `true` once unless a crash
    /// swallowed its first reply (then its retry says `false`).
    async fn check(&self) -> (usize, usize) {
        let verdicts = self.verdicts.lock().await;
        let mut accepted = 0;
        let mut never = 0;
        for (id, v) in verdicts.iter() {
            let trues = v.iter().filter(|&&b| b).count();
            assert!(trues <= 1, "{id} was accepted {trues} times: {v:?}");
            accepted += trues;
            never += usize::from(trues == 0);
        }
        (accepted, never)
    }
}

/// Producers running in the background: 16 tasks send fresh ids
/// `<tag><n>` and, a little later, each one again, until stopped (at most
/// 1 000 000 ids); every verdict goes to `ledger`.
struct Load {
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    const PRODUCERS: usize = 16;
    const MAX: usize = 1_000_000;

    fn start(client: &Client, tag: &'static str) -> Self {
        let ledger = Arc::new(Ledger::default());
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        let (client, l, s) = (client.clone(), ledger.clone(), stop.clone());
        let task = tokio::spawn(async move {
            futures_util::stream::iter(0..Self::PRODUCERS)
                .for_each_concurrent(Self::PRODUCERS, |_| {
                    let (client, ledger, stop, next) = (client.clone(), l.clone(), s.clone(), next.clone());
                    async move {
                        while !stop.load(Ordering::Relaxed) {
                            let n = next.fetch_add(1, Ordering::Relaxed);
                            if n >= Self::MAX {
                                break;
                            }
                            ledger.send(&client, &format!("{tag}{n}")).await;
                            // A repeat of an id sent a moment ago: around a
                            // crash too, it must say `false`.
                            if n >= 40 {
                                ledger.send(&client, &format!("{tag}{}", n - 40)).await;
                            }
                        }
                    }
                })
                .await;
        });
        Self { ledger, stop, task }
    }

    /// Stops the producers once each has its current id's verdict.
    async fn finish(self) -> Arc<Ledger> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.ledger
    }
}

/// Waits until every shard is leased and answers; returns the owners.
async fn wait_all_served(client: &Client, limit: Duration) -> BTreeMap<u32, String> {
    let deadline = Instant::now() + limit;
    loop {
        let owners = owners(client).await;
        if owners.len() == SHARDS as usize && owners.values().all(|o| !o.is_empty()) {
            // Leased; now each shard must answer (its journal replayed).
            let mut all = true;
            for shard in 0..SHARDS {
                let id = id_in(shard, "probe");
                let request = client.request(format!("dedup.ingest.{id}"), event(&id));
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(2), request).await,
                    Ok(Ok(reply)) if matches!(parse_answer(&reply), Answer::Verdict(_))
                );
                all &= ok;
            }
            if all {
                return owners;
            }
        }
        assert!(
            Instant::now() < deadline,
            "shards not all served within {limit:?}: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn per_node(owners: &BTreeMap<u32, String>) -> BTreeMap<String, usize> {
    let mut count = BTreeMap::new();
    for owner in owners.values() {
        *count.entry(owner.clone()).or_default() += 1;
    }
    count
}

/// Sends one fresh id per shard of `shards` until each has answered with
/// a verdict; returns when the last one did.
async fn wait_shards_answer(client: &Client, shards: &[u32], tag: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending: Vec<u32> = shards.to_vec();
    let mut round = 0;
    while !pending.is_empty() {
        round += 1;
        let mut still = Vec::new();
        for &shard in &pending {
            let id = id_in(shard, &format!("{tag}{round}s"));
            let request = client.request(format!("dedup.ingest.{id}"), event(&id));
            match tokio::time::timeout(Duration::from_millis(500), request).await {
                Ok(Ok(reply)) if matches!(parse_answer(&reply), Answer::Verdict(true)) => {}
                _ => still.push(shard),
            }
        }
        pending = still;
        assert!(
            Instant::now() < deadline,
            "shards {pending:?} not served again within 30 s"
        );
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Instant::now()
}

/// Ids accepted before the crash, so that a takeover has a journal to
/// replay (`examples/takeover.rs` measures it at 1 M ids in a release build).
const PRELOAD: usize = 50_000;

/// Sends `ids` in batches of 1000 (sending the lines answered an error
/// again); returns the distinct verdict entries seen (`1` new, `0`
/// duplicate).
async fn batch_verdicts(client: &Client, ids: &[String]) -> Vec<u8> {
    let mut seen = batch_verdicts_of(client, ids, 1).await;
    seen.sort_unstable();
    seen.dedup();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sidecars_shards_are_taken_over_and_no_id_is_accepted_twice() {
    let server = NatsServer::start();
    let client = server.client().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Option<SidecarProcess>> = (0..3)
        .map(|i| Some(spawn_node(&server, dirs[i].path(), &format!("n{i}"), &[])))
        .collect();
    let owners = wait_all_served(&client, Duration::from_secs(60)).await;
    let counts = per_node(&owners);
    assert_eq!(counts.len(), 3, "every node holds shards: {counts:?}");
    assert!(
        counts.values().all(|&c| (10..=11).contains(&c)),
        "a fair share each: {counts:?}"
    );

    // Ids accepted before the crash, in a batch: the dead node's share of
    // them must be remembered by whoever takes its shards.
    let before: Vec<String> = (0..PRELOAD).map(|i| format!("pre{i}")).collect();
    assert_eq!(
        batch_verdicts(&client, &before).await,
        [b'1'],
        "all new before the crash"
    );

    let load = Load::start(&client, "live");
    let ledger = load.ledger.clone();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let victim_shards: Vec<u32> = owners
        .iter()
        .filter(|(_, o)| *o == "n0")
        .map(|(s, _)| *s)
        .collect();
    let killed = Instant::now();
    nodes[0].take().unwrap().kill();
    let served = wait_shards_answer(&client, &victim_shards, "after").await;
    let gap = served - killed;
    println!("shards of the killed node served again {gap:?} after the SIGKILL (lease_ttl 3 s)");
    // The lease expires 2-3 s after the kill; a round later it is taken.
    assert!(gap < Duration::from_secs(8), "takeover took {gap:?}");

    tokio::time::sleep(Duration::from_secs(1)).await;
    load.finish().await;
    let counts = per_node(&owners_settled(&client).await);
    assert_eq!(counts.len(), 2, "the survivors hold every shard: {counts:?}");
    assert!(counts.values().all(|&c| c == 16), "evenly: {counts:?}");

    let (accepted, never) = ledger.check().await;
    println!(
        "{accepted} ids accepted under load, {never} answered false on their first verdict (reply lost in the crash), {} needed retries",
        ledger.retried.load(Ordering::Relaxed)
    );
    assert!(accepted > 500, "load made progress: {accepted}");
    // Nothing accepted is forgotten: every id, before and during, is a
    // duplicate now.
    assert_eq!(
        batch_verdicts(&client, &before).await,
        [b'0'],
        "the ids of before the crash are remembered"
    );
    for id in ledger.verdicts.lock().await.keys() {
        assert!(!decide(&client, id).await.0, "{id} was forgotten");
    }
    for node in nodes.iter_mut().flatten() {
        node.signal_term();
    }
}

/// Batches running in the background while shards move: each of 40 lines,
/// 20 fresh ids spread over the shards, each twice (the repeat after all
/// the first copies). A line answered with an error is sent again in the
/// next batch, until it gets a verdict; every verdict goes to the ledger.
struct BatchLoad {
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<usize>,
}

impl BatchLoad {
    fn start(client: &Client, tag: &'static str) -> Self {
        let ledger = Arc::new(Ledger::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (client, l, s) = (client.clone(), ledger.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let (mut next, mut errors) = (0usize, 0usize);
            let mut retry: Vec<String> = Vec::new();
            while !s.load(Ordering::Relaxed) || !retry.is_empty() {
                let mut lines = std::mem::take(&mut retry);
                if !s.load(Ordering::Relaxed) && next < 200_000 {
                    let fresh: Vec<String> = (next..next + 20).map(|n| format!("{tag}{n}")).collect();
                    next += 20;
                    lines.extend(fresh.iter().cloned());
                    lines.extend(fresh);
                }
                let body = lines.iter().map(|id| event(id)).collect::<Vec<_>>().join(&b'\n');
                let request = client.request("dedup.batch", body.into());
                let reply = match tokio::time::timeout(Duration::from_secs(5), request).await {
                    Ok(Ok(reply)) => reply,
                    _ => {
                        // No answer: every line is tried again.
                        l.unanswered.fetch_add(1, Ordering::Relaxed);
                        retry = lines;
                        continue;
                    }
                };
                let entries = eventsieve::engine::batch::decode(&reply.payload).unwrap();
                assert_eq!(entries.len(), lines.len());
                for (id, entry) in lines.into_iter().zip(entries) {
                    match entry {
                        eventsieve::engine::batch::Entry::New => l.record(&id, true).await,
                        eventsieve::engine::batch::Entry::Duplicate => l.record(&id, false).await,
                        eventsieve::engine::batch::Entry::Error { code, reason } => {
                            assert!(code >= 500, "{id}: {code} {reason}");
                            errors += 1;
                            retry.push(id);
                        }
                    }
                }
                if !retry.is_empty() {
                    // A shard is moving: give it a moment.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            errors
        });
        Self { ledger, stop, task }
    }

    /// Stops the batches once every line has a verdict; how many lines
    /// were answered with an error (and sent again).
    async fn finish(self) -> (Arc<Ledger>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.task.await.unwrap();
        (self.ledger, errors)
    }
}

/// The leases once no shard is released or missing (after a move).
async fn owners_settled(client: &Client) -> BTreeMap<u32, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let owners = owners(client).await;
        if owners.len() == SHARDS as usize && owners.values().all(|o| !o.is_empty()) {
            return owners;
        }
        assert!(Instant::now() < deadline, "leases not settled: {owners:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends SIGSTOP or SIGCONT to `child` (by its PID).
fn signal(child: &SidecarProcess, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &child.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_paused_past_its_lease_accepts_nothing_when_it_wakes() {
    let server = NatsServer::start();
    let client = server.client().await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let paused = spawn_node(&server, dirs[0].path(), "n0", &[]);
    let other = spawn_node(&server, dirs[1].path(), "n1", &[]);
    let owners = wait_all_served(&client, Duration::from_secs(60)).await;
    let shard = *owners.iter().find(|(_, o)| *o == "n0").unwrap().0;
    let early = id_in(shard, "early");
    assert!(decide(&client, &early).await.0);

    signal(&paused, "-STOP");
    // Its leases expire; the other node takes its shards.
    let deadline = Instant::now() + Duration::from_secs(30);
    while owners_settled(&client).await[&shard] != "n1" {
        assert!(
            Instant::now() < deadline,
            "shard {shard} not taken from the paused node"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_shards_answer(&client, &[shard], "taken").await;
    assert!(
        !decide(&client, &early).await.0,
        "the new owner replayed the journal"
    );

    // Requests for the shard reach both: the paused node is still
    // subscribed, and holds them until it wakes.
    let mut replies = client.subscribe("fenced.replies.>").await.unwrap();
    let ids: Vec<String> = (0..50).map(|i| id_in(shard, &format!("during{i}"))).collect();
    for id in &ids {
        client
            .publish_with_reply(
                format!("dedup.ingest.{id}"),
                format!("fenced.replies.{id}"),
                event(id),
            )
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&paused, "-CONT");
    let mut got: HashMap<String, Vec<Answer>> = HashMap::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while let Ok(Some(m)) = tokio::time::timeout_at(until, replies.next()).await {
        let id = m.subject.rsplit('.').next().unwrap().to_owned();
        got.entry(id).or_default().push(parse_answer(&m));
    }
    let mut refused = 0;
    for id in &ids {
        let answers = got.get(id).cloned().unwrap_or_default();
        let trues = answers.iter().filter(|a| **a == Answer::Verdict(true)).count();
        assert_eq!(trues, 1, "{id}: exactly one node accepts it: {answers:?}");
        for a in &answers {
            match a {
                Answer::Verdict(true) => {}
                Answer::Error(503, _) => refused += 1,
                other => panic!("{id}: the woken node answered {other:?}"),
            }
        }
    }
    println!(
        "the woken node refused {refused} of {} requests it held; accepted none",
        ids.len()
    );
    assert!(
        refused > 0,
        "the woken node answered the requests it held (with 503)"
    );

    // It rejoins: the shards are shared again, and nothing was lost.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = per_node(&owners_settled(&client).await);
        if counts.get("n0") == Some(&16) && counts.get("n1") == Some(&16) {
            break;
        }
        assert!(Instant::now() < deadline, "not shared again: {counts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_all_served(&client, Duration::from_secs(30)).await;
    for id in ids.iter().chain([&early]) {
        assert!(!decide(&client, id).await.0, "{id} was forgotten");
    }
    other.terminate();
    paused.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_move_to_a_joining_sidecar_and_off_a_leaving_one_with_every_request_answered() {
    let server = NatsServer::start();
    let client = server.client().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = spawn_node(&server, dirs[0].path(), "n0", &[]);
    let second = spawn_node(&server, dirs[1].path(), "n1", &[]);
    let counts = per_node(&wait_all_served(&client, Duration::from_secs(60)).await);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [16, 16],
        "{counts:?}"
    );

    let load = Load::start(&client, "move");
    let ledger = load.ledger.clone();
    // And batches whose lines repeat ids across shards while they move.
    let batches = BatchLoad::start(&client, "bmove");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A third joins: the two hand shards over until each has its share.
    let third = spawn_node(&server, dirs[2].path(), "n2", &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = per_node(&owners_settled(&client).await);
        if counts.len() == 3 && counts.values().all(|&c| (10..=11).contains(&c)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no fair share after the join: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // One leaves gracefully: it hands its shards over before it exits.
    let left = Instant::now();
    assert!(first.terminate().success(), "a graceful stop exits 0");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = per_node(&owners_settled(&client).await);
        if counts.len() == 2 && counts.values().all(|&c| c == 16) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no fair share after the leave: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "shards of the leaving node owned again {:?} after its SIGTERM",
        left.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.finish().await;

    let (accepted, never) = ledger.check().await;
    let unanswered = ledger.unanswered.load(Ordering::Relaxed);
    println!(
        "{accepted} ids accepted while shards moved; {} needed a retry (503 or no responder); {unanswered} requests unanswered",
        ledger.retried.load(Ordering::Relaxed)
    );
    assert_eq!(
        never, 0,
        "no reply was lost: every id was accepted on its first verdict"
    );
    assert_eq!(unanswered, 0, "a graceful handover answers every request");
    for id in ledger.verdicts.lock().await.keys() {
        assert!(!decide(&client, id).await.0, "{id} was forgotten");
    }
    // Every batch line got a verdict in the end: no id accepted twice, the
    // repeat of an id never `false` unless the id is kept.
    let (batched, errors) = batches.finish().await;
    let (accepted, _) = batched.check().await;
    let ids = batched.verdicts.lock().await.len();
    let (_, falses, lost) = batched.kept(&client).await;
    println!(
        "batches while shards moved: {ids} ids, {accepted} accepted, {falses} lines told false, {errors} lines answered an error and sent again; {} ids told a verdict but not kept",
        lost.len()
    );
    assert!(accepted > 100, "the batches made progress: {accepted}");
    assert!(lost.is_empty(), "told a verdict, not kept: {lost:?}");

    // What an operator sees: each node's heartbeat in the bucket ...
    let js = async_nats::jetstream::new(client.clone());
    let kv = js.get_key_value("eventsieve").await.unwrap();
    let beat: serde_json::Value = serde_json::from_slice(&kv.get("node.n1").await.unwrap().unwrap()).unwrap();
    assert_eq!(beat["shards"].as_array().unwrap().len(), 16, "{beat}");
    for field in [
        "heartbeat",
        "ready",
        "verdicts_per_s",
        "ids",
        "bytes_per_id",
        "host",
        "pid",
    ] {
        assert!(!beat[field].is_null(), "{field} in {beat}");
    }
    assert!(
        kv.get("node.n0").await.unwrap().is_none(),
        "the node that left took its heartbeat with it"
    );
    // ... and `eventsieve status`: each node, then each shard's lease.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_eventsieve"))
        .arg("status")
        .env("EVENTSIEVE_NATS__URL", server.url())
        .env("EVENTSIEVE_DURABILITY", "replicated")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    println!("{text}");
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" n1 ") || l.contains(" n2 "))
        .collect();
    assert_eq!(
        rows.len(),
        SHARDS as usize,
        "a lease row per shard, owned by n1 or n2:\n{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("n1 ") && l.contains("shards")),
        "{text}"
    );
    second.terminate();
    third.terminate();
}

/// `output = "jetstream"` on three replicated sidecars: one is SIGKILLed
/// and restarted three times under load. Every id producers got a verdict
/// for is in the output stream exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_jetstream_output_each_id_reaches_the_stream_once_across_sigkills() {
    let server = NatsServer::start();
    let client = server.client().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let env = [("EVENTSIEVE_OUTPUT", "jetstream")];
    let mut nodes: Vec<SidecarProcess> = (0..3)
        .map(|i| spawn_node(&server, dirs[i].path(), &format!("n{i}"), &env))
        .collect();
    wait_all_served(&client, Duration::from_secs(60)).await;

    let load = Load::start(&client, "out");
    let ledger = load.ledger.clone();
    for (i, dir) in dirs.iter().enumerate() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Each node in turn dies and comes back under its own name.
        nodes.remove(i).kill();
        nodes.insert(i, spawn_node(&server, dir.path(), &format!("n{i}"), &env));
        wait_all_served(&client, Duration::from_secs(60)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.finish().await;
    let (accepted, never) = ledger.check().await;

    let copies = output_copies(&client).await;
    for (id, n) in &copies {
        assert_eq!(*n, 1, "{id} is in the stream {n} times");
    }
    for id in ledger.verdicts.lock().await.keys() {
        assert_eq!(
            copies.get(id),
            Some(&1),
            "{id} must be in the stream exactly once"
        );
    }
    println!(
        "3 SIGKILLs: {accepted} ids accepted, {never} answered false after a lost reply; each once in the stream"
    );
    for node in nodes {
        node.terminate();
    }
}

/// Three nats-servers (journal and bucket with three replicas) and three
/// sidecars spread over them; one server is SIGKILLed under load and
/// verdicts go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_go_on_when_one_of_three_nats_servers_dies() {
    let mut servers = NatsCluster::start();
    servers.wait_for_jetstream().await;
    let client = servers.client().await;
    let (nodes, _dirs) = r3_nodes(&servers);
    wait_all_served(&client, Duration::from_secs(60)).await;
    let js = async_nats::jetstream::new(client.clone());
    let journal = js.get_stream("EVENTSIEVE_JOURNAL").await.unwrap();
    assert_eq!(journal.cached_info().config.num_replicas, 3);
    let mut bucket = js.get_stream("KV_eventsieve").await.unwrap();
    assert_eq!(bucket.info().await.unwrap().config.num_replicas, 3);

    let load = Load::start(&client, "ha");
    let ledger = load.ledger.clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = ledger.verdicts.lock().await.len();
    // The producers' server stays; the last one dies. The streams whose
    // leader it was elect another (nats-server's raft: seconds); leases
    // and journal appends wait for that.
    servers.kill(2);
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(60);
    while ledger.verdicts.lock().await.len() < before + 1000 {
        assert!(
            Instant::now() < deadline,
            "verdicts did not resume within 60 s of the server's death"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resumed = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.finish().await;
    println!(
        "{before} ids decided before the server died; 1000 more within {resumed:?} after; {} needed a retry",
        ledger.retried.load(Ordering::Relaxed)
    );
    wait_all_served(&client, Duration::from_secs(60)).await;
    let (accepted, _) = ledger.check().await;
    assert!(accepted > 1000);
    // Every id answered `true` or `false` is remembered. (Before, an id
    // answered only `false` might not be: its retry found it in the table
    // while the first copy's commit was pending, and that commit then
    // timed out during the election and was undone. Now the retry waits
    // for that commit and gets its error.)
    let (trues, falses, lost) = ledger.kept(&client).await;
    println!(
        "nats-server killed: {} verdicts ({trues} true, {falses} false), {} retried after an error; {} ids told false or true but not kept",
        trues + falses,
        ledger.retried.load(Ordering::Relaxed),
        lost.len()
    );
    assert!(lost.is_empty(), "ids answered but not kept: {lost:?}");
    for node in nodes {
        node.terminate();
    }
}

/// Fault: a journal append that timed out (the stream leader's server
/// paused past the append timeout) failed its commit after twins of its
/// ids had been told `false`. Now every id answered, `true` or `false`, is
/// kept, and none is accepted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_append_that_times_out_leaves_no_false_for_an_id_not_kept() {
    let servers = NatsCluster::start();
    servers.wait_for_jetstream().await;
    let (nodes, _dirs) = r3_nodes(&servers);
    let client = servers.client().await;
    wait_all_served(&client, Duration::from_secs(60)).await;
    let js = async_nats::jetstream::new(client.clone());
    let mut journal = js.get_stream("EVENTSIEVE_JOURNAL").await.unwrap();
    let info = journal.info().await.unwrap();
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a leader");
    let paused: usize = leader.trim_start_matches('n').parse().unwrap();
    // The producers talk to a server that stays up.
    let client = servers.client_of((paused + 1) % 3).await;

    let load = Load::start(&client, "to");
    let ledger = load.ledger.clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Longer than the journal's 5 s append timeout.
    servers.signal(paused, "-STOP");
    tokio::time::sleep(Duration::from_secs(7)).await;
    servers.signal(paused, "-CONT");
    let before = ledger.verdicts.lock().await.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ledger.verdicts.lock().await.len() < before + 1000 {
        assert!(Instant::now() < deadline, "verdicts did not resume");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.finish().await;
    wait_all_served(&client, Duration::from_secs(60)).await;
    let (accepted, never) = ledger.check().await;
    let (trues, falses, lost) = ledger.kept(&client).await;
    println!(
        "journal leader paused 7 s: {} verdicts ({trues} true, {falses} false), {accepted} ids accepted, {never} only told false (reply lost), {} retried after an error; {} ids told a verdict but not kept",
        trues + falses,
        ledger.retried.load(Ordering::Relaxed),
        lost.len()
    );
    assert!(accepted > 1000, "load made progress: {accepted}");
    assert!(lost.is_empty(), "ids answered but not kept: {lost:?}");
    for node in nodes {
        node.terminate();
    }
}

/// A metric's value from a sidecar's Prometheus endpoint.
fn metric(addr: &str, name: &str) -> f64 {
    let text = ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in the metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_the_local_copy_and_a_damaged_copy_is_rebuilt_from_the_journal() {
    let server = NatsServer::start();
    let client = server.client().await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [("EVENTSIEVE_METRICS_ADDR", addr.as_str())];
    let node = spawn_node(&server, &data, "n0", &env);
    wait_all_served(&client, Duration::from_secs(60)).await;
    let ids: Vec<String> = (0..3000).map(|i| format!("kept{i}")).collect();
    let body: Vec<u8> = ids
        .iter()
        .flat_map(|id| [&event(id)[..], b"\n"].concat())
        .collect();
    let reply = request(&client, "dedup.batch", body).await;
    assert!(
        reply
            .payload
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .all(|l| l == b"1")
    );
    assert!(node.terminate().success());

    // The copy holds the whole journal: nothing is read from the stream.
    let node = spawn_node(&server, &data, "n0", &env);
    wait_all_served(&client, Duration::from_secs(60)).await;
    let from_copy = metric(&addr, "eventsieve_takeover_ids_total{source=\"copy\"}");
    let from_journal = metric(&addr, "eventsieve_takeover_ids_total{source=\"journal\"}");
    println!("restart: {from_copy} ids from the local copy, {from_journal} from the journal");
    assert!(
        from_copy >= 3000.0 && from_journal == 0.0,
        "copy {from_copy}, journal {from_journal}"
    );
    for id in &ids {
        assert!(!decide(&client, id).await.0, "{id} was forgotten");
    }
    assert!(node.terminate().success());

    // Damage the copy: every stored copy of one id's fingerprint flipped.
    let inside = eventsieve::engine::fingerprint::Fingerprint::of(b"kept7").to_bytes();
    let path = data.join("data.mdb");
    let mut bytes = std::fs::read(&path).unwrap();
    let copies: Vec<usize> = (0..bytes.len() - 16)
        .filter(|&i| bytes[i..i + 16] == inside)
        .collect();
    assert!(!copies.is_empty(), "the id is in the copy");
    for at in copies {
        for b in &mut bytes[at..at + 16] {
            *b = !*b;
        }
    }
    std::fs::write(&path, &bytes).unwrap();

    // It starts anyway, from the journal, and keeps the damaged store aside.
    let node = spawn_node(&server, &data, "n0", &env);
    wait_all_served(&client, Duration::from_secs(60)).await;
    let from_journal = metric(&addr, "eventsieve_takeover_ids_total{source=\"journal\"}");
    assert!(from_journal >= 3000.0, "rebuilt from the journal: {from_journal}");
    for id in &ids {
        assert!(!decide(&client, id).await.0, "{id} was forgotten");
    }
    let aside: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("data.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged store is kept aside for a look");
    assert!(node.terminate().success());

    // An operator deletes the journal stream: the copy is of a stream that
    // is gone, and is not read (it is moved aside too).
    let js = async_nats::jetstream::new(client.clone());
    js.delete_stream("EVENTSIEVE_JOURNAL").await.unwrap();
    let node = spawn_node(&server, &data, "n0", &env);
    wait_all_served(&client, Duration::from_secs(60)).await;
    assert_eq!(
        metric(&addr, "eventsieve_takeover_ids_total{source=\"copy\"}"),
        0.0
    );
    let aside = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("data.damaged-"))
        .count();
    assert_eq!(aside, 2, "the copy of the deleted stream is kept aside");
    assert!(node.terminate().success());
}

/// Found by the kill test: a node that took a shard by replaying another
/// node's journal messages recorded the journal position in its copy
/// without those messages, so its next takeover of the shard (after a
/// restart, or a handover back) read a copy that lacked them and forgot
/// their ids. Replayed messages now go into the copy too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_built_by_replaying_another_nodes_journal_holds_its_ids() {
    let server = NatsServer::start();
    let client = server.client().await;
    let tmp = tempfile::tempdir().unwrap();
    let first = spawn_node(&server, &tmp.path().join("a"), "a", &[]);
    wait_all_served(&client, Duration::from_secs(60)).await;
    let ids: Vec<String> = (0..3000).map(|i| format!("other{i}")).collect();
    assert_eq!(batch_verdicts(&client, &ids).await, [b'1']);
    first.kill();

    // B replays A's journal, appends a little of its own, and restarts.
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [("EVENTSIEVE_METRICS_ADDR", addr.as_str())];
    let b_dir = tmp.path().join("b");
    let second = spawn_node(&server, &b_dir, "b", &env);
    wait_all_served(&client, Duration::from_secs(60)).await;
    assert!(metric(&addr, "eventsieve_takeover_ids_total{source=\"journal\"}") >= 3000.0);
    assert!(second.terminate().success());
    let second = spawn_node(&server, &b_dir, "b", &env);
    wait_all_served(&client, Duration::from_secs(60)).await;
    let from_copy = metric(&addr, "eventsieve_takeover_ids_total{source=\"copy\"}");
    assert!(
        from_copy >= 3000.0,
        "the copy holds what was replayed into it: {from_copy}"
    );
    assert_eq!(
        batch_verdicts(&client, &ids).await,
        [b'0'],
        "A's ids are remembered"
    );
    assert!(second.terminate().success());
}

/// One aggregate over arrival time: `metric_value` per `metric_name`.
const AGGREGATE_TOML: &str = r#"
[[aggregate]]
group = "metric_name"
value = "metric_value"
pane = "1s"
max_window = "1h"
lateness = "5s"
"#;

/// Sends `metric` events `<tag><n>` for `n` in `range`, each with value
/// `n`, retrying until each has a verdict; the sum of the values answered
/// `true` (each id is sent once, so all are).
async fn send_metrics(client: &Client, tag: &str, range: std::ops::Range<u32>) -> (u64, f64) {
    let (mut count, mut sum) = (0, 0.0);
    let results: Vec<(bool, f64)> = futures_util::stream::iter(range)
        .map(|n| {
            let client = client.clone();
            let id = format!("{tag}{n}");
            async move {
                let body = format!(r#"{{"event_id":"{id}","metric_name":"m","metric_value":{n}}}"#);
                (decide_event(&client, &id, body.into()).await.0, f64::from(n))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for (accepted, value) in results {
        if accepted {
            count += 1;
            sum += value;
        }
    }
    (count, sum)
}

/// The count and sum of `m` over the last 10 minutes, and whether the
/// reply says it is partial.
async fn totals(client: &Client) -> (u64, f64, bool) {
    let reply = request(
        client,
        "dedup.agg.query",
        br#"{"metric_name":"m","window":"10m"}"#.to_vec(),
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    (
        v["count"].as_u64().unwrap_or_else(|| panic!("{v}")),
        v["sum"].as_f64().unwrap(),
        v.get("partial").is_some(),
    )
}

/// Asks for the totals for `limit`: none may count more than `count`
/// (shards moving meanwhile may make a reply partial, never doubled).
async fn never_above(client: &Client, count: u64, limit: Duration) {
    let started = Instant::now();
    while started.elapsed() < limit {
        let got = totals(client).await;
        assert!(got.0 <= count, "counted {} of {count}: {got:?}", got.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`wait_totals_flagged`] without the check of the flag; how long it took.
async fn wait_totals(client: &Client, count: u64, sum: f64) -> Duration {
    wait_totals_flagged(client, count, sum, false).await.0
}

/// Waits until the query counts `count` with no shard missing; returns how
/// long that took and how many replies said they were partial. Fails after
/// 30 s with what it counted last, and when `flagged`, at a reply that
/// counts less without saying it is partial.
async fn wait_totals_flagged(client: &Client, count: u64, sum: f64, flagged: bool) -> (Duration, usize) {
    let started = Instant::now();
    let mut partial = 0;
    loop {
        let got = totals(client).await;
        if got == (count, sum, false) {
            return (started.elapsed(), partial);
        }
        partial += usize::from(got.2);
        assert!(
            !flagged || got.0 >= count || got.2,
            "counted {} of {count} without saying the reply is partial",
            got.0
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "expected count {count} sum {sum}, the query says {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_panes_move_to_a_live_node_and_are_never_counted_twice() {
    let server = NatsServer::start();
    let client = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("eventsieve.toml");
    std::fs::write(&config, AGGREGATE_TOML).unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let spawn = |i: usize| {
        let node = format!("n{i}");
        SidecarProcess::spawn_with(
            &server.url(),
            dirs[i].path(),
            Some(&config),
            &[
                ("EVENTSIEVE_DURABILITY", "replicated"),
                ("EVENTSIEVE_CLUSTER__NODE_ID", &node),
                ("EVENTSIEVE_WINDOW", "1h"),
            ],
        )
    };
    let mut nodes: Vec<Option<SidecarProcess>> = (0..3).map(|i| Some(spawn(i))).collect();
    wait_all_served(&client, Duration::from_secs(60)).await;

    // Every node holds panes of its shards' events.
    let (mut count, mut sum) = send_metrics(&client, "a", 0..3000).await;
    assert_eq!(count, 3000);
    wait_totals(&client, count, sum).await;

    // Killed once its panes were published (a checkpoint a second): a live
    // node adopts them, and nothing is lost.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    nodes[0].take().unwrap().kill();
    let (whole, partial) = wait_totals_flagged(&client, count, sum, true).await;
    println!(
        "the killed node's panes counted again {whole:?} after the SIGKILL; until then {partial} replies said they were partial, none counted less without saying so"
    );
    assert!(partial > 0);

    // Back under its name: its panes are with the adopter, not counted twice.
    nodes[0] = Some(spawn(0));
    owners_settled(&client).await;
    let more = send_metrics(&client, "b", 0..1000).await;
    (count, sum) = (count + more.0, sum + more.1);
    wait_totals(&client, count, sum).await;
    never_above(&client, count, Duration::from_secs(3)).await;
    wait_totals(&client, count, sum).await;

    // Paused past its heartbeat, a node is taken for gone and its panes
    // adopted; woken, it drops them rather than count them twice.
    signal(nodes[2].as_ref().unwrap(), "-STOP");
    tokio::time::sleep(Duration::from_secs(8)).await;
    signal(nodes[2].as_ref().unwrap(), "-CONT");
    // From the moment it wakes, before its first checkpoint, no reply
    // counts its old panes beside the adopter's (it answered with them
    // until that checkpoint before).
    never_above(&client, count, Duration::from_secs(3)).await;
    owners_settled(&client).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    wait_totals(&client, count, sum).await;
    never_above(&client, count, Duration::from_secs(2)).await;
    wait_totals(&client, count, sum).await;

    // Leaving by SIGTERM, a node publishes its last panes first: none lost.
    let more = send_metrics(&client, "c", 0..1000).await;
    (count, sum) = (count + more.0, sum + more.1);
    let mut leaving = nodes[1].take().unwrap();
    leaving.signal_term();
    assert!(
        leaving
            .wait_exit(Duration::from_secs(30))
            .is_some_and(|s| s.success())
    );
    wait_totals(&client, count, sum).await;

    // Under load, SIGKILL: what is lost is at most the killed node's
    // updates since its last checkpoint; nothing is counted twice.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = (0, 0.0, 0u32);
            while !stop.load(Ordering::Relaxed) && sent.2 < 200_000 {
                let (c, s) = send_metrics(&client, "d", sent.2..sent.2 + 200).await;
                sent = (sent.0 + c, sent.1 + s, sent.2 + 200);
            }
            (sent.0, sent.1)
        })
    };
    let load_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (before_kill, _, _) = totals(&client).await;
    let rate = (before_kill - count) as f64 / load_started.elapsed().as_secs_f64();
    nodes[2].take().unwrap().kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (c, s) = producer.await.unwrap();
    (count, sum) = (count + c, sum + s);
    // Counted once adopted (the heartbeat expires with the leases, 3 s;
    // adoption follows within a second or two).
    for _ in 0..40 {
        let (got, got_sum, _) = totals(&client).await;
        assert!(
            got <= count && got_sum <= sum + 1e-6,
            "counted twice: {got} of {count}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (got, got_sum, partial) = totals(&client).await;
    assert!(!partial, "every shard is served again");
    let lost = count - got;
    println!(
        "SIGKILL under load: {rate:.0} events/s accepted by two nodes; {lost} of {count} events lost from the aggregate ({:.2} s of the whole load)",
        lost as f64 / rate
    );
    assert!(
        got <= count && got_sum <= sum + 1e-6,
        "counted twice: {got} of {count}"
    );
    // The killed node had half the load and published every second: it
    // loses at most about one second of its half.
    assert!(
        (lost as f64) < rate,
        "lost {lost} events, more than a checkpoint interval's worth at {rate:.0}/s"
    );
    for node in nodes.iter_mut().flatten() {
        node.signal_term();
    }
}

/// Sends `session`'s events 0.. one after the other, each until it gets a
/// verdict (retrying errors and silence), until `stop`; returns how many.
async fn session_in_order(client: Client, session: usize, stop: Arc<AtomicBool>) -> u64 {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let body = bytes::Bytes::from(format!(
            r#"{{"event_id":"s{session}n{seq}","session_id":"s{session}","seq":{seq}}}"#
        ));
        let asked = client.request(format!("dedup.ingest.s{session}"), body);
        match tokio::time::timeout(Duration::from_secs(5), asked).await {
            Ok(Ok(reply)) if matches!(parse_answer(&reply), Answer::Verdict(_)) => seq += 1,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    seq
}

/// Each session's `seq`s as they reached the output: the core subscriber's
/// messages, or the output stream's, in order.
fn seqs_by_session(events: impl Iterator<Item = bytes::Bytes>, sessions: usize) -> Vec<Vec<u64>> {
    let mut by = vec![Vec::new(); sessions];
    for e in events {
        let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
        let session: usize = v["session_id"].as_str().unwrap()[1..].parse().unwrap();
        by[session].push(v["seq"].as_u64().unwrap());
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_order_holds_across_a_handover_with_core_and_jetstream_output() {
    const SESSIONS: usize = 64;
    for output in ["core", "jetstream"] {
        let server = NatsServer::start();
        let client = server.client().await;
        let mut out = client.subscribe("events.unique.*").await.unwrap();
        client.flush().await.unwrap();
        // Read while the load runs: a subscriber left unread past its
        // buffer (65 536 messages) drops what comes after.
        let sent_all = Arc::new(AtomicBool::new(false));
        let done = sent_all.clone();
        let collected = tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                match tokio::time::timeout(Duration::from_secs(2), out.next()).await {
                    Ok(Some(m)) => got.push(m.payload),
                    Ok(None) => break,
                    // Quiet for 2 s once every producer is done: all in.
                    Err(_) if done.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            got
        });
        let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
        let env = [
            ("EVENTSIEVE_SHARD_KEY", "session_id"),
            ("EVENTSIEVE_OUTPUT", output),
        ];
        let leaving = spawn_node(&server, dirs[0].path(), "n0", &env);
        let staying = spawn_node(&server, dirs[1].path(), "n1", &env);
        let counts = per_node(&owners_settled(&client).await);
        assert_eq!(counts.len(), 2, "both nodes hold shards: {counts:?}");

        let stop = Arc::new(AtomicBool::new(false));
        let producers: Vec<_> = (0..SESSIONS)
            .map(|s| tokio::spawn(session_in_order(client.clone(), s, stop.clone())))
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(leaving.terminate().success(), "a graceful stop exits 0");
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        let mut sent = 0;
        for p in producers {
            sent += p.await.unwrap();
        }
        sent_all.store(true, Ordering::Relaxed);

        let events: Vec<bytes::Bytes> = if output == "core" {
            collected.await.unwrap()
        } else {
            collected.abort();
            let js = async_nats::jetstream::new(client.clone());
            let mut stream = js.get_stream("EVENTSIEVE_OUTPUT").await.unwrap();
            let last = stream.info().await.unwrap().state.last_sequence;
            let mut got = Vec::new();
            for n in 1..=last {
                got.push(stream.get_raw_message(n).await.unwrap().payload);
            }
            got
        };
        let by_session = seqs_by_session(events.into_iter(), SESSIONS);
        for (s, seqs) in by_session.iter().enumerate() {
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "{output}: session s{s} out of order or repeated: {seqs:?}"
            );
            // Every event got a verdict before the next was sent: all are
            // there (a graceful handover publishes what it accepted).
            let expect: Vec<u64> = (0..seqs.len() as u64).collect();
            assert_eq!(seqs, &expect, "{output}: session s{s} has a gap");
        }
        let total: usize = by_session.iter().map(Vec::len).sum();
        assert_eq!(
            total as u64, sent,
            "{output}: every event that got a verdict, once"
        );
        println!("{output}: {sent} events of {SESSIONS} sessions across a handover, each session in order");
        staying.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_places_ids_otherwise_than_the_cluster_does_not_start() {
    let server = NatsServer::start();
    let client = server.client().await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = spawn_node(&server, dirs[0].path(), "n0", &[]);
    owners_settled(&client).await;

    let mut other = std::process::Command::new(env!("CARGO_BIN_EXE_eventsieve"))
        .arg("run")
        .env("EVENTSIEVE_NATS__URL", server.url())
        .env("EVENTSIEVE_DATA_DIR", dirs[1].path())
        .env("EVENTSIEVE_METRICS_ADDR", "")
        .env("EVENTSIEVE_DURABILITY", "replicated")
        .env("EVENTSIEVE_CLUSTER__NODE_ID", "n1")
        .env("EVENTSIEVE_SHARD_KEY", "session_id")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = other.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = other.kill();
            panic!("a node with another shard_key kept running");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut other.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("the cluster places ids by") && stderr.contains("session_id"),
        "{stderr}"
    );
    // The running node is untouched: every shard still its.
    let counts = per_node(&owners_settled(&client).await);
    assert_eq!(counts.get("n0"), Some(&32), "{counts:?}");
    first.terminate();
}

const EMIT_TOML: &str = r#"
[[aggregate]]
group = "metric_name"
value = "metric_value"
pane = "1s"
max_window = "1h"
lateness = "5s"

[[aggregate.emit]]
stat = "count"
window = "5m"
every = "200ms"
subject = "stats.count.{group}"
"#;

/// Per group, the nodes that published it in `messages`.
fn emitters(messages: &[(Instant, String, String)]) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut out: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for (_, group, node) in messages {
        out.entry(group.clone()).or_default().insert(node.clone());
    }
    out
}

/// The messages on `stats.count.>` for `wait`: when, group, node.
async fn emitted(sub: &mut async_nats::Subscriber, wait: Duration) -> Vec<(Instant, String, String)> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline.into(), sub.next()).await {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        out.push((
            Instant::now(),
            v["metric_name"].as_str().unwrap().to_owned(),
            v["node"].as_str().unwrap().to_owned(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emissions_have_one_node_per_group_and_resume_after_a_sigkill() {
    let server = NatsServer::start();
    let client = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("eventsieve.toml");
    std::fs::write(&config, EMIT_TOML).unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Option<SidecarProcess>> = (0..3)
        .map(|i| {
            let node = format!("n{i}");
            Some(SidecarProcess::spawn_with(
                &server.url(),
                dirs[i].path(),
                Some(&config),
                &[
                    ("EVENTSIEVE_DURABILITY", "replicated"),
                    ("EVENTSIEVE_CLUSTER__NODE_ID", &node),
                    ("EVENTSIEVE_WINDOW", "1h"),
                ],
            ))
        })
        .collect();
    wait_all_served(&client, Duration::from_secs(60)).await;
    let groups = 24;
    for n in 0..240u32 {
        let id = format!("e{n}");
        let body = format!(
            r#"{{"event_id":"{id}","metric_name":"g{}","metric_value":{n}}}"#,
            n % groups
        );
        assert!(decide_event(&client, &id, body.into()).await.0);
    }
    let mut sub = client.subscribe("stats.count.>").await.unwrap();
    let before = emitted(&mut sub, Duration::from_millis(1500)).await;
    let by_group = emitters(&before);
    assert_eq!(
        by_group.len(),
        groups as usize,
        "every group published: {by_group:?}"
    );
    for (group, nodes) in &by_group {
        assert_eq!(nodes.len(), 1, "{group}: one emitter, got {nodes:?}");
    }
    let used: std::collections::BTreeSet<&String> = by_group.values().flatten().collect();
    assert!(used.len() >= 2, "groups spread over the nodes: {used:?}");

    // n0 killed: its groups come back from the nodes that take its shards.
    let orphans: Vec<String> = by_group
        .iter()
        .filter(|(_, n)| n.contains("n0"))
        .map(|(g, _)| g.clone())
        .collect();
    assert!(!orphans.is_empty(), "n0 emitted some groups: {by_group:?}");
    let killed = Instant::now();
    nodes[0].take().unwrap().kill();
    let after = emitted(&mut sub, Duration::from_secs(12)).await;
    let mut back = Duration::ZERO;
    for group in &orphans {
        let first = after
            .iter()
            .find(|(_, g, node)| g == group && node != "n0")
            .unwrap_or_else(|| panic!("{group} was not published again within 12 s of the SIGKILL"));
        back = back.max(first.0 - killed);
    }
    println!(
        "the killed node's groups were published again {back:?} after the SIGKILL (lease TTL 3 s, every 200 ms)"
    );
    assert!(back < Duration::from_secs(8), "{back:?}");
    // Settled: one emitter per group again, among the live nodes.
    let settled: Vec<_> = after
        .into_iter()
        .filter(|(at, _, _)| *at > killed + back + Duration::from_secs(1))
        .collect();
    for (group, nodes) in emitters(&settled) {
        assert_eq!(
            nodes.len(),
            1,
            "{group}: one emitter after the takeover, got {nodes:?}"
        );
        assert!(!nodes.contains("n0"));
    }
}
