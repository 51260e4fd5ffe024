//! The routing rules at run time: the KV key `rules` (every sidecar
//! watches it, as it watches `window`), `<prefix>.rules.test` (one
//! sidecar answers where events would go, changing nothing), and
//! `eventsieve rules set|get|test`.
//!
//! A set that cannot be used (bad syntax, unknown function, bad subject,
//! duplicate name, over the limits) is refused whole: the set in force
//! stays, the refusal is logged, counted and shown by `eventsieve status`.
//! Deleting the key puts the configuration's set back in force.

use std::sync::Arc;

use async_nats::Message;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::config::{OutputKind, RoutingSpec, Settings};
use crate::nats::kv::watch_key;
use crate::output::jetstream::unbound_subject;
use crate::route::{KeyReader, Router, RuleSet};
use crate::shared::Shared;

/// The KV key of the routing rules set at run time.
pub const RULES_KEY: &str = "rules";

/// Puts the set kept in the bucket (if any) in force before the sidecar
/// serves. `streams`: with `output = "jetstream"`, where every destination
/// must be bound to a stream.
pub async fn load(router: &Router, store: &kv::Store, streams: Option<&jetstream::Context>) {
    match store.entry(RULES_KEY).await {
        Ok(Some(entry)) => apply(router, &entry, streams).await,
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(message = "Cannot read the rules key; routing by the configured rules.", error = %e)
        }
    }
}

/// Follows every change of the key until aborted.
pub async fn watch(router: Arc<Router>, store: kv::Store, streams: Option<jetstream::Context>) {
    let (router, streams) = (&router, streams.as_ref());
    watch_key(&store, RULES_KEY, "rules", |entry| async move {
        apply(router, &entry, streams).await;
    })
    .await;
}

async fn apply(router: &Router, entry: &kv::Entry, streams: Option<&jetstream::Context>) {
    if router.current().revision == entry.revision {
        return;
    }
    let spec = match entry.operation {
        kv::Operation::Put => match RoutingSpec::parse(&String::from_utf8_lossy(&entry.value)) {
            Ok(spec) => spec,
            Err(e) => {
                router.refuse(entry.revision, &e);
                tracing::warn!(message = "Refused the routing rules put in the KV bucket; the rules in force stay.", revision = entry.revision, error = %e);
                return;
            }
        },
        kv::Operation::Delete | kv::Operation::Purge => router.configured().clone(),
    };
    if let Err(e) = bound(router, &spec, streams).await {
        router.refuse(entry.revision, &e);
        tracing::warn!(message = "Refused the routing rules put in the KV bucket; the rules in force stay.", revision = entry.revision, error = %e);
        return;
    }
    match router.install(&spec, entry.revision) {
        Ok(set) => tracing::info!(
            message = "Routing rules in force.",
            revision = set.revision,
            rules = set.len(),
            compiled = set.compiled(),
        ),
        Err(e) => {
            tracing::warn!(message = "Refused the routing rules put in the KV bucket; the rules in force stay.", revision = entry.revision, error = %e)
        }
    }
}

/// With `streams` (`output = "jetstream"`): that every subject of `spec`
/// is bound to a stream.
async fn bound(
    router: &Router,
    spec: &RoutingSpec,
    streams: Option<&jetstream::Context>,
) -> Result<(), String> {
    let Some(js) = streams else { return Ok(()) };
    let set = router.check(spec, 0)?;
    match unbound_subject(js, &set).await {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// `<prefix>.rules.test`: `{"events": [..], "rules": "<TOML or JSON>",
/// "subject": ".."}` (without `rules`: the set in force; without
/// `subject`: `<prefix>.ingest`); each event an object or its text.
/// Answers where each would go.
///
/// # Errors
///
/// A request that is not of that form, or a set that cannot be used.
pub(super) fn rules_request(ctx: &Shared, message: &Message) -> Result<Value, String> {
    let request: Value = serde_json::from_slice(&message.payload)
        .map_err(|e| format!("expected {{\"events\": [...], \"rules\": \"...\"}}: {e}"))?;
    let router = &ctx.router;
    let set = match request.get("rules") {
        None | Some(Value::Null) => router.current(),
        Some(Value::String(text)) => Arc::new(router.check(&RoutingSpec::parse(text)?, 0)?),
        Some(_) => return Err("\"rules\" must be the rule set's text".into()),
    };
    let events = request
        .get("events")
        .and_then(Value::as_array)
        .ok_or("\"events\" must be a list")?;
    let subject = match request.get("subject") {
        None | Some(Value::Null) => ctx.subjects.ingest(),
        Some(Value::String(subject)) => subject.clone(),
        Some(_) => return Err("\"subject\" must be a subject".into()),
    };
    Ok(json!({
        "revision": set.revision,
        "results": test(&set, (&router.key, &subject), events.iter().map(|e| match e {
            Value::String(text) => text.clone().into_bytes(),
            other => other.to_string().into_bytes(),
        })),
    }))
}

/// Where each of `events`, come in on `subject`, would go under `set`.
fn test(
    set: &RuleSet,
    (key, subject): (&KeyReader, &str),
    events: impl Iterator<Item = Vec<u8>>,
) -> Vec<Value> {
    events.map(|event| set.explain(&event, subject, key)).collect()
}

/// `eventsieve rules get`: the set kept in the bucket, or that none is.
///
/// # Errors
///
/// If the bucket cannot be reached.
pub async fn rules_get(settings: &Settings) -> Result<String, String> {
    let (_, store) = super::bucket(settings).await?;
    match store.entry(RULES_KEY).await.map_err(|e| e.to_string())? {
        Some(entry) if entry.operation == kv::Operation::Put => Ok(format!(
            "# kv:{}/{RULES_KEY} revision {}\n{}",
            settings.config.kv_bucket,
            entry.revision,
            String::from_utf8_lossy(&entry.value)
        )),
        _ => Ok(format!(
            "# no rules in kv:{}/{RULES_KEY}: the sidecars route by their configuration",
            settings.config.kv_bucket
        )),
    }
}

/// `eventsieve rules set FILE`: checks the set as the sidecars will, then
/// puts it in the bucket; returns what it did.
///
/// # Errors
///
/// The set's first problem (nothing is written), or the bucket's.
pub async fn rules_set(settings: &Settings, text: &str) -> Result<String, String> {
    let set = check(settings, text)?;
    let (client, store) = super::bucket(settings).await?;
    if settings.config.output == OutputKind::Jetstream
        && let Some(why) = unbound_subject(&jetstream::new(client), &set).await
    {
        return Err(why);
    }
    let revision = store
        .put(RULES_KEY, Bytes::from(text.to_owned()))
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "rules set: {} rules ({} compiled) in kv:{}/{RULES_KEY} revision {revision}",
        set.len(),
        set.compiled(),
        settings.config.kv_bucket
    ))
}

/// `eventsieve rules test FILE EVENTS`: where each event (one JSON object
/// a line) would go under the set in `text`; changes nothing.
///
/// # Errors
///
/// The set's first problem.
pub fn rules_test(
    settings: &Settings,
    text: &str,
    events: &str,
    subject: Option<&str>,
) -> Result<Vec<String>, String> {
    let set = check(settings, text)?;
    let engine = settings.engine();
    let key = KeyReader {
        spec: engine.key,
        limits: engine.limits,
        format: engine.format,
    };
    let lines = events.lines().filter(|l| !l.trim().is_empty());
    let ingest = format!("{}.ingest", settings.config.subject_prefix);
    let subject = subject.unwrap_or(&ingest);
    Ok(test(&set, (&key, subject), lines.map(|l| l.as_bytes().to_vec()))
        .iter()
        .map(Value::to_string)
        .collect())
}

/// The set in `text` checked as a sidecar of `settings` checks it.
fn check(settings: &Settings, text: &str) -> Result<RuleSet, String> {
    let spec = RoutingSpec::parse(text)?;
    let config = &settings.config;
    RuleSet::build(&spec, &config.output_subject, config.shards, 0, &|_| {
        Arc::default()
    })
}
