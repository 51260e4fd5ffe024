//! The KV bucket every sidecar shares (default `eventsieve`): the window
//! set at run time, shard leases, node heartbeats, pane claims. Opened (or
//! created) here, with per-key TTL where the server has it.

use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::kv;

/// Opens `bucket`, creating it with `replicas` replicas if absent.
///
/// # Errors
///
/// Why it can be neither opened nor created (e.g. no JetStream).
pub async fn open_bucket(client: &Client, bucket: &str, replicas: usize) -> Result<kv::Store, String> {
    let js = async_nats::jetstream::new(client.clone());
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket: bucket.to_owned(),
        description: "eventsieve: the window and routing rules set at run time, shard leases, nodes".into(),
        history: 8,
        num_replicas: replicas,
        // Per-key TTL for leases and heartbeats, and a marker when one
        // expires (so that `nats kv watch` shows it): nats-server 2.11+.
        limit_markers: Some(EXPIRY_MARKER_TTL),
        ..Default::default()
    };
    match js.create_key_value(config.clone()).await {
        Ok(store) => Ok(store),
        // An older server: the window works without per-key TTL.
        Err(_) => {
            js.create_key_value(kv::Config {
                limit_markers: None,
                ..config
            })
            .await
        }
    }
    .map_err(|e| format!("cannot open or create KV bucket {bucket:?}: {e}"))
}

/// How long the marker of an expired lease or heartbeat stays in the
/// bucket. The server raises a shorter per-key TTL to this, so it must be
/// below any lease TTL.
pub const EXPIRY_MARKER_TTL: Duration = Duration::from_secs(1);

/// After a watch ends (the server restarted, the stream moved), how long
/// before it is made again.
const REWATCH_AFTER: Duration = Duration::from_secs(1);

/// Hands `apply` the value of `key` in `store` (if any) and then every
/// change of it, until the task is aborted; a watch that fails is made
/// again. `what` names the key in the warnings.
pub async fn watch_key<F, Fut>(store: &kv::Store, key: &str, what: &str, mut apply: F)
where
    F: FnMut(kv::Entry) -> Fut,
    Fut: Future<Output = ()>,
{
    use futures_util::StreamExt;
    loop {
        match store.watch_with_history(key).await {
            Ok(mut entries) => {
                while let Some(entry) = entries.next().await {
                    match entry {
                        Ok(entry) => apply(entry).await,
                        Err(e) => {
                            tracing::warn!(message = "Watching a KV key failed; watching again.", key = what, error = %e);
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(message = "Cannot watch a KV key; retrying.", key = what, error = %e),
        }
        tokio::time::sleep(REWATCH_AFTER).await;
    }
}
