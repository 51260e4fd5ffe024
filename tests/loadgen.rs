//! The load generator (`examples/loadgen.rs`) as a real process against a
//! real nats-server and sidecar binary: a short bounded run of each mode
//! must check every verdict, report what the sidecar holds, and the CPU per
//! event of the server, the generator and the sidecar.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

/// `target/<profile>/examples/loadgen`, built now so that the test never
/// runs a stale copy (`cargo test --test loadgen` alone builds no examples).
fn loadgen_binary() -> PathBuf {
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "--example", "loadgen"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    // Variables cargo sets for this test would look like a changed build
    // environment to dependencies' build scripts and rebuild them.
    for (key, _) in std::env::vars() {
        let per_crate = [
            "CARGO_PKG_",
            "CARGO_BIN_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_PRIMARY_",
            "CARGO_TARGET_TMPDIR",
        ];
        if per_crate.iter().any(|p| key.starts_with(p)) {
            build.env_remove(key);
        }
    }
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo to build the load generator");
    assert!(status.success(), "`cargo build --example loadgen` failed");
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary in target/<profile>/deps");
    profile_dir.join("examples").join("loadgen")
}

/// Runs the load generator at `bin` with `args` and returns its `--json`
/// report.
fn run(bin: &Path, server: &NatsServer, metrics: &str, args: &[&str]) -> Value {
    let out = Command::new(bin)
        .args(["--url", &server.url(), "--metrics", metrics, "--json"])
        .args(["--server-pid", &server.pid().to_string()])
        .args(args)
        .output()
        .expect("run loadgen");
    assert!(
        out.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("loadgen --json prints one JSON object")
}

fn runs(report: &Value) -> Vec<(String, &Value)> {
    report["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| (r["name"].as_str().expect("name").to_string(), r))
        .collect()
}

/// Every run answered every event, nothing was wrong, and the sidecar
/// remembers exactly the ids it said were new (`accepted_before` from
/// earlier runs). Returns the ids this run's sidecar pass accepted.
fn check(report: &Value, relay_label: &str, accepted_before: u64) -> u64 {
    let ensure = |ok: bool, what: String| assert!(ok, "{what}\nloadgen report: {report:#}");
    let runs = runs(report);
    let names: Vec<&str> = runs.iter().map(|(n, _)| n.as_str()).collect();
    ensure(
        runs.len() == 4,
        format!("raw, relay, JetStream and eventsieve runs: {names:?}"),
    );
    ensure(
        names[1].contains(relay_label),
        format!("relay run not {relay_label}"),
    );
    ensure(names[3].starts_with("eventsieve"), "the sidecar run last".into());
    let count = |r: &Value, key: &str| r[key].as_u64().unwrap_or(u64::MAX);
    for (name, r) in &runs {
        let (events, new, dup) = (
            count(r, "events"),
            count(r, "fresh_new"),
            count(r, "dup_duplicate"),
        );
        ensure(
            count(r, "wrong") == 0 && count(r, "errors") == 0,
            format!("{name}: wrong verdicts or errors"),
        );
        ensure(
            new.checked_add(dup) == Some(events),
            format!("{name}: every event counted once"),
        );
        ensure(
            new > 0 && dup > 0,
            format!("{name}: both new and duplicate events expected"),
        );
        // A short run may take less than one 10 ms tick of CPU: the figures
        // must be there, not above zero.
        for who in ["server", "loadgen"] {
            let us = r[format!("{who}_cpu_us_per_event")].as_f64();
            ensure(us >= Some(0.0), format!("{name}: {who} CPU per event reported"));
        }
        let sidecar = r["sidecar_cpu_us_per_event"].as_f64();
        ensure(
            (sidecar >= Some(0.0)) == name.starts_with("eventsieve"),
            format!("{name}: the sidecar's CPU per event on its own run only"),
        );
    }
    let new = count(runs[3].1, "fresh_new");
    let memory = &report["sidecar_memory"];
    ensure(
        memory["live_ids"].as_f64() == Some((accepted_before + new) as f64),
        format!("the sidecar holds the {accepted_before} + {new} ids it accepted"),
    );
    ensure(
        memory["rss_anon_bytes"].as_f64() > Some(0.0),
        "RssAnon reported".into(),
    );
    for ratio in ["ratio_to_raw", "ratio_to_relay", "ratio_to_jetstream"] {
        ensure(report[ratio].as_f64() > Some(0.0), format!("{ratio} reported"));
    }
    new
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_checks_every_verdict_in_single_and_batch_mode() {
    let server = NatsServer::start();
    let client = server.client().await;
    let data = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let _sidecar = SidecarProcess::spawn(&server, data.path(), &[("EVENTSIEVE_METRICS_ADDR", &metrics)]);
    wait_for_sidecar(&client).await;
    let loadgen = loadgen_binary();

    let bounded = [
        "--seconds",
        "5",
        "--baseline-seconds",
        "1",
        "--inflight",
        "4",
        "--window",
        "1h",
    ];
    let single = tokio::task::block_in_place(|| {
        run(
            &loadgen,
            &server,
            &metrics,
            &[&bounded[..], &["--max-events", "400"]].concat(),
        )
    });
    let accepted = check(&single, "(single, mapped)", 0);
    let batch = tokio::task::block_in_place(|| {
        run(
            &loadgen,
            &server,
            &metrics,
            &[&bounded[..], &["--max-events", "4000", "--batch", "100"]].concat(),
        )
    });
    check(&batch, "(batch of 100, batch)", accepted);
}
