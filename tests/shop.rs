//! The e-commerce walkthrough of the README, as CI runs it: the sidecar
//! binary with `config/shop.toml` (protobuf input, session order, fraud
//! and payments rules, moving averages and top products) and the shop
//! example in its short mode (4 s, fixed seed), which checks its counts,
//! the fraud alerts and a moving average against what it sent.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// `target/<profile>/examples/shop`, which `cargo test` builds with the
/// tests.
fn shop_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let path = profile_dir.join("examples").join("shop");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --example shop` (cargo test builds it)",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_pipeline_runs_end_to_end_and_its_checks_pass() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/shop.toml");
    let sidecar = SidecarProcess::spawn_with(&server.url(), data.path(), Some(&config), &[]);
    wait_for_sidecar(&server.client().await).await;
    let url = server.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(shop_example())
            .args(["--url", &url, "--short"])
            .output()
            .unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "shop failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("shop: every check passed"), "{stdout}");
    for check in [
        "fraud alerts, each once",
        "control's emitted moving average",
        "events out of",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with("ok") && l.contains(check)),
            "{check}:\n{stdout}"
        );
    }
    sidecar.terminate();
    drop(server);
}
