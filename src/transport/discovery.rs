//! NATS micro service discovery: answers `$SRV.PING`, `$SRV.INFO` and
//! `$SRV.STATS` (plain, `.eventsieve` and `.eventsieve.<id>`) with the
//! `io.nats.micro.v1` schemas, so `nats micro ls` and `nats micro stats`
//! find the sidecar.
//!
//! async-nats's `service` module would wrap every endpoint request in its own
//! stats bookkeeping (a lock per request); the verdict path stays plain
//! subscriptions, and these responses are built from the service's own
//! counters instead.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::Client;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::nats::Subjects;
use crate::observe::metrics::{Endpoint, Metrics};

pub const NAME: &str = "eventsieve";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Subscribes and answers discovery requests until the task is aborted.
///
/// # Errors
///
/// If a subscription cannot be made.
pub async fn spawn(
    client: Client,
    subjects: &Subjects,
    id: String,
    owned: Vec<u32>,
    aggregates: bool,
    metrics: Arc<Metrics>,
) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
    let listed = listed(subjects, aggregates);
    let mut subs = Vec::new();
    for subject in [
        "$SRV.*".to_string(),
        format!("$SRV.*.{NAME}"),
        format!("$SRV.*.{NAME}.{id}"),
    ] {
        subs.push(client.subscribe(subject).await?);
    }
    let mut all = futures_util::stream::select_all(subs);
    let started = rfc3339(SystemTime::now());
    Ok(tokio::spawn(async move {
        while let Some(message) = all.next().await {
            let Some(reply) = message.reply else { continue };
            let verb = message.subject.split('.').nth(1).unwrap_or("");
            let head = |kind: &str| {
                json!({
                    "type": format!("io.nats.micro.v1.{kind}"),
                    "name": NAME,
                    "id": id,
                    "version": VERSION,
                    "metadata": {},
                })
            };
            let body = match verb {
                "PING" => head("ping_response"),
                "INFO" => {
                    let mut v = head("info_response");
                    v["description"] = "Deduplicates events by event_id over a rolling window".into();
                    v["endpoints"] = Value::Array(endpoints(&listed, &owned));
                    v
                }
                "STATS" => {
                    let mut v = head("stats_response");
                    v["started"] = started.clone().into();
                    v["endpoints"] = Value::Array(stats(&listed, &metrics));
                    v
                }
                _ => continue,
            };
            let _ = client.publish(reply, body.to_string().into()).await;
        }
    }))
}

/// Every request subject the service answers: endpoint, subject, queue
/// group ("" for none).
fn listed(s: &Subjects, aggregates: bool) -> Vec<(Endpoint, String, String)> {
    let mut out = vec![
        (Endpoint::Ingest, s.ingest(), s.ingest()),
        (Endpoint::Shards, s.all_shard_events(), String::new()),
        (Endpoint::Batch, s.batch(), s.batch()),
        (Endpoint::SubBatches, s.all_sub_batches(), String::new()),
        (Endpoint::Lookup, s.lookup(), String::new()),
        (Endpoint::Forget, s.forget(), String::new()),
        (Endpoint::Window, s.window().to_owned(), String::new()),
        (Endpoint::Status, s.status().to_owned(), String::new()),
        (
            Endpoint::RulesTest,
            s.rules_test(),
            format!("{}.rules", s.prefix()),
        ),
    ];
    if aggregates {
        out.push((
            Endpoint::Aggregates,
            format!("{}.agg.*", s.prefix()),
            String::new(),
        ));
    }
    out
}

/// The endpoints for `INFO`.
fn endpoints(listed: &[(Endpoint, String, String)], owned: &[u32]) -> Vec<Value> {
    listed
        .iter()
        .map(|(endpoint, subject, queue)| {
            let metadata = match endpoint {
                Endpoint::Shards => {
                    json!({ "owned": owned.iter().map(u32::to_string).collect::<Vec<_>>().join(",") })
                }
                _ => json!({}),
            };
            json!({
                "name": endpoint.name(),
                "subject": subject,
                "queue_group": queue,
                "metadata": metadata,
            })
        })
        .collect()
}

/// The endpoints for `STATS`: the same names as `INFO`, each with its
/// requests, error replies and processing time (receipt to reply, ns).
fn stats(listed: &[(Endpoint, String, String)], m: &Metrics) -> Vec<Value> {
    use std::sync::atomic::Ordering::Relaxed;
    listed
        .iter()
        .map(|(endpoint, subject, queue)| {
            let served = &m.endpoints[*endpoint as usize];
            let (requests, nanos) = (served.requests.load(Relaxed), served.nanos.load(Relaxed));
            let data = match endpoint {
                Endpoint::Shards | Endpoint::Ingest | Endpoint::Batch => json!({
                    "accepted": m.accepted.load(Relaxed),
                    "duplicates": m.duplicates.load(Relaxed),
                    "not_ready": m.not_ready.load(Relaxed),
                }),
                _ => json!({}),
            };
            json!({
                "name": endpoint.name(),
                "subject": subject,
                "queue_group": queue,
                "num_requests": requests,
                "num_errors": served.errors.load(Relaxed),
                "last_error": "",
                "processing_time": nanos,
                "average_processing_time": nanos.checked_div(requests).unwrap_or(0),
                "data": data,
            })
        })
        .collect()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a time after the epoch.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}
