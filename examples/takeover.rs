//! How long a dead sidecar's shards stay dark in `durability =
//! "replicated"`: starts `--nodes` sidecars (the given binary, its own
//! children) on a running nats-server with JetStream, fills them with
//! `--ids` ids in batches, SIGKILLs the first, and times
//!
//! - from the kill until each of its shards' leases is taken by another
//!   node, and
//! - until each of those shards answers a fresh id with `true` (the
//!   journal replayed).
//!
//! ```text
//! cargo build --release --bin eventsieve --example takeover
//! target/release/examples/takeover --url nats://127.0.0.1:4222 \
//!     --bin target/release/eventsieve [--nodes 3] [--ids 1000000]
//! ```
//!
//! The nats-server must map `dedup.ingest.*` with `partition(32,1)` (as
//! `nats/server.conf` does) and have no `eventsieve` bucket or
//! `EVENTSIEVE_JOURNAL` stream from an earlier run.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::Client;
use bytes::Bytes;
use eventsieve::engine::shard::shard_of;

const SHARDS: u32 = 32;

struct Args {
    url: String,
    bin: String,
    nodes: usize,
    ids: u64,
}

fn args() -> Args {
    let mut a = Args {
        url: "nats://127.0.0.1:4222".into(),
        bin: "target/release/eventsieve".into(),
        nodes: 3,
        ids: 1_000_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = value,
            "--bin" => a.bin = value,
            "--nodes" => a.nodes = value.parse().expect("--nodes N"),
            "--ids" => a.ids = value.parse().expect("--ids N"),
            other => panic!("unknown flag {other}; see the header of examples/takeover.rs"),
        }
    }
    a
}

fn spawn(a: &Args, i: usize, dir: &std::path::Path) -> Child {
    Command::new(&a.bin)
        .arg("run")
        .env("EVENTSIEVE_NATS__URL", &a.url)
        .env("EVENTSIEVE_DURABILITY", "replicated")
        .env("EVENTSIEVE_CLUSTER__NODE_ID", format!("t{i}"))
        .env("EVENTSIEVE_DATA_DIR", dir.join(format!("t{i}")))
        .env("EVENTSIEVE_METRICS_ADDR", "")
        .env("EVENTSIEVE_WINDOW", "1h")
        .env("EVENTSIEVE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the sidecar binary (--bin)")
}

async fn owners(kv: &async_nats::jetstream::kv::Store) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    for shard in 0..SHARDS {
        if let Ok(Some(v)) = kv.get(format!("shard.{shard}")).await {
            let lease: serde_json::Value = serde_json::from_slice(&v).unwrap_or_default();
            out.insert(shard, lease["owner"].as_str().unwrap_or_default().to_owned());
        }
    }
    out
}

/// Whether a fresh id of `shard` is accepted now.
async fn answers(client: &Client, shard: u32, tag: u64) -> bool {
    let id = (0u64..)
        .map(|i| format!("probe{tag}x{i}"))
        .find(|id| shard_of(id, SHARDS) == shard)
        .unwrap();
    let event = format!(r#"{{"event_id":"{id}"}}"#);
    let request = client.request(format!("dedup.ingest.{id}"), event.into());
    matches!(
        tokio::time::timeout(Duration::from_millis(500), request).await,
        Ok(Ok(m)) if &m.payload[..] == br#"{"accepted":true}"#
    )
}

#[tokio::main]
async fn main() {
    let a = args();
    let dir = std::env::temp_dir().join(format!("eventsieve-takeover-{}", std::process::id()));
    let client = async_nats::connect(&a.url)
        .await
        .expect("connect to nats-server (--url)");
    let mut children: Vec<Child> = (0..a.nodes).map(|i| spawn(&a, i, &dir)).collect();
    let js = async_nats::jetstream::new(client.clone());
    let started = Instant::now();
    let kv = loop {
        if let Ok(kv) = js.get_key_value("eventsieve").await {
            let o = owners(&kv).await;
            if o.len() == SHARDS as usize && o.values().all(|v| !v.is_empty()) {
                break kv;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "shards not leased within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Until the shares are even (nodes starting together hand shards over
    // for a round or two).
    let fair = SHARDS as usize / a.nodes;
    loop {
        let o = owners(&kv).await;
        let even = (0..a.nodes).all(|i| o.values().filter(|v| **v == format!("t{i}")).count() >= fair);
        if even {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "shares not even within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Fill: batches of 1000 new ids, 16 in flight.
    let fill = Instant::now();
    let batches = a.ids.div_ceil(1000);
    let sent = futures_util::future::join_all((0..16).map(|w| {
        let client = client.clone();
        async move {
            let mut accepted = 0u64;
            for b in (w..batches).step_by(16) {
                let body: String = (b * 1000..((b + 1) * 1000).min(a.ids))
                    .map(|i| format!("{{\"event_id\":\"id{i}\"}}\n"))
                    .collect();
                // Again until no line is refused (503 while shards move):
                // the lines accepted before come back as duplicates.
                loop {
                    let reply = client.request("dedup.batch", Bytes::from(body.clone())).await;
                    if let Ok(m) = reply {
                        accepted += m.payload.split(|&c| c == b'\n').filter(|l| *l == b"1").count() as u64;
                        if !m.payload.contains(&b'!') {
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            accepted
        }
    }))
    .await;
    let accepted: u64 = sent.iter().sum();
    println!(
        "filled {accepted} ids in {:.1} s ({:.0} ids/s)",
        fill.elapsed().as_secs_f64(),
        accepted as f64 / fill.elapsed().as_secs_f64()
    );

    let before = owners(&kv).await;
    let victim: Vec<u32> = before
        .iter()
        .filter(|(_, o)| *o == "t0")
        .map(|(s, _)| *s)
        .collect();
    let share = accepted * victim.len() as u64 / u64::from(SHARDS);
    children[0].kill().expect("SIGKILL the first sidecar");
    children[0].wait().ok();
    let killed = Instant::now();
    println!("killed t0, which held shards {victim:?} (about {share} of the ids)");
    let mut leased = None;
    let mut tag = 0;
    loop {
        let now = owners(&kv).await;
        if leased.is_none()
            && victim
                .iter()
                .all(|s| now.get(s).is_some_and(|o| !o.is_empty() && o != "t0"))
        {
            leased = Some(killed.elapsed());
        }
        if leased.is_some() {
            tag += 1;
            let mut all = true;
            for &s in &victim {
                all &= answers(&client, s, tag).await;
            }
            if all {
                break;
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "not taken over within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served = killed.elapsed();
    let leased = leased.expect("set before served");
    println!(
        "leases taken {:.2} s after the SIGKILL; every shard answering {:.2} s after it ({:.2} s of replay and subscription)",
        leased.as_secs_f64(),
        served.as_secs_f64(),
        (served - leased).as_secs_f64()
    );
    for child in children.iter_mut().skip(1) {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
