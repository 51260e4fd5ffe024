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
    // `cargo test --test shop` alone does not build examples: an old one
    // would test old code.
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::metadata(root.join("examples/shop.rs")).and_then(|m| m.modified());
    let newest = newest_source(&root.join("src")).max(example.ok()).unwrap();
    assert!(
        built >= newest,
        "{} is older than the sources: build it with `cargo build --example shop` (a whole `cargo test` does)",
        path.display()
    );
    path
}

/// When the newest `.rs` file under `dir` was last changed.
fn newest_source(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let modified = if path.is_dir() {
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            entry.metadata().and_then(|m| m.modified()).ok()
        } else {
            None
        };
        newest = newest.max(modified);
    }
    newest
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
