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
fn spawn_node(server: &NatsServer, data: &std::path::Path, node: &str, extra: &[(&str, &str)]) -> SidecarProcess {
    let mut env = vec![
        ("EVENTSIEVE_DURABILITY", "replicated"),
        ("EVENTSIEVE_CLUSTER__NODE_ID", node),
        ("EVENTSIEVE_WINDOW", "1h"),
    ];
    env.extend_from_slice(extra);
    SidecarProcess::spawn(server, data, &env)
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
/// or a timeout, for at most 60 s); the verdict and how many tries it took.
async fn decide(client: &Client, id: &str) -> (bool, u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tries = 0;
    loop {
        tries += 1;
        let request = client.request(format!("dedup.ingest.{id}"), event(id));
        match tokio::time::timeout(Duration::from_secs(2), request).await {
            Ok(Ok(reply)) => match parse_answer(&reply) {
                Answer::Verdict(v) => return (v, tries),
                Answer::Error(503, _) => {}
                Answer::Error(code, reason) => panic!("{id}: {code} {reason}"),
            },
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {}
            Ok(Err(_)) | Err(_) => {}
        }
        assert!(Instant::now() < deadline, "{id}: no verdict within 60 s ({tries} tries)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every verdict each id got.
#[derive(Default)]
struct Ledger {
    verdicts: Mutex<HashMap<String, Vec<bool>>>,
    retried: AtomicUsize,
}

impl Ledger {
    async fn send(&self, client: &Client, id: &str) {
        let (verdict, tries) = decide(client, id).await;
        if tries > 1 {
            self.retried.fetch_add(1, Ordering::Relaxed);
        }
        self.verdicts.lock().await.entry(id.to_owned()).or_default().push(verdict);
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

/// `producers` tasks send fresh ids `<tag><n>` and, a little later, each
/// one again, until `stop` or `max` ids; every verdict goes to `ledger`.
async fn produce(client: Client, ledger: Arc<Ledger>, stop: Arc<AtomicBool>, tag: &'static str, max: usize, producers: usize) {
    let next = Arc::new(AtomicUsize::new(0));
    futures_util::stream::iter(0..producers)
        .for_each_concurrent(producers, |_| {
            let (client, ledger, stop, next) = (client.clone(), ledger.clone(), stop.clone(), next.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= max {
                        break;
                    }
                    ledger.send(&client, &format!("{tag}{n}")).await;
                    // A repeat of an id sent a moment ago: around a crash
                    // too, it must say `false`.
                    if n >= 40 {
                        ledger.send(&client, &format!("{tag}{}", n - 40)).await;
                    }
                }
            }
        })
        .await;
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
        assert!(Instant::now() < deadline, "shards not all served within {limit:?}: {owners:?}");
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
        assert!(Instant::now() < deadline, "shards {pending:?} not served again within 30 s");
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Instant::now()
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
    assert!(counts.values().all(|&c| (10..=11).contains(&c)), "a fair share each: {counts:?}");

    // Ids accepted before the crash, in a batch: the dead node's share of
    // them must be remembered by whoever takes its shards.
    let before: Vec<String> = (0..3000).map(|i| format!("pre{i}")).collect();
    let body: Vec<u8> = before.iter().flat_map(|id| [&event(id)[..], b"\n"].concat()).collect();
    let reply = request(&client, "dedup.batch", body).await;
    let entries: Vec<&[u8]> = reply.payload.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    assert_eq!(entries.len(), before.len());
    assert!(entries.iter().all(|e| *e == b"1"), "all new before the crash");

    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(produce(client.clone(), ledger.clone(), stop.clone(), "live", 1_000_000, 16));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let victim_shards: Vec<u32> = owners.iter().filter(|(_, o)| *o == "n0").map(|(s, _)| *s).collect();
    let killed = Instant::now();
    nodes[0].take().unwrap().kill();
    let served = wait_shards_answer(&client, &victim_shards, "after").await;
    let gap = served - killed;
    println!("shards of the killed node served again {gap:?} after the SIGKILL (lease_ttl 3 s)");
    // The lease expires 2-3 s after the kill; a round later it is taken.
    assert!(gap < Duration::from_secs(8), "takeover took {gap:?}");

    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
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
    for id in before.iter().chain(ledger.verdicts.lock().await.keys()) {
        assert!(!decide(&client, id).await.0, "{id} was forgotten");
    }
    for node in nodes.iter_mut().flatten() {
        node.signal_term();
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
