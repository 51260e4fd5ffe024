//! What operators change and read while the sidecar serves, one command a
//! file, each with its responder and its CLI side (as mini-redis keeps a
//! command in one file):
//!
//! | module | role |
//! |---|---|
//! | [`window`] | the window set at run time: state, keeping, `<prefix>.window`, `eventsieve window` |
//! | [`status`] | each node's status: `<prefix>.status`, `eventsieve status` |
//! | [`rules`] | the routing rules: the KV key `rules`, `<prefix>.rules.test`, `eventsieve rules` |
//!
//! The window and status subjects reach every sidecar (no queue group);
//! the requester gathers the replies ([`gather`]); one sidecar answers a
//! rules test. [`serve`] answers them until the stop, then fences them so
//! that every request routed here is answered.

pub mod rules;
pub mod schema;
pub mod status;
pub mod window;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, Message};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::watch;

use async_nats::jetstream::kv;

use crate::config::Settings;
use crate::nats::kv::open_bucket;
use crate::observe::metrics::{Endpoint, Metrics};
use crate::shared::Shared;
use crate::transport::fence::{self, Answer, Plain};
use crate::transport::subscription::{publish, reply_error};

pub use status::status_command;
pub use window::{KeptIn, Source, WINDOW_FILE, WINDOW_KEY, Window, WindowValue, window_command};

/// Answers `<prefix>.window`, `<prefix>.status` and `<prefix>.rules.test`
/// until `stop` changes;
/// then fences both subscriptions and answers every request routed here
/// before the fence.
///
/// # Errors
///
/// If the subscriptions cannot be made.
pub async fn serve(
    ctx: Arc<Shared>,
    window: Arc<Window>,
    node: String,
    started: Instant,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
    let responder = Arc::new(Responder {
        ctx: ctx.clone(),
        window,
        node,
        started,
    });
    let mut tasks = tokio::task::JoinSet::new();
    let rules_group = format!("{}.rules", ctx.subjects.prefix());
    for (subject, queue) in [
        (ctx.subjects.window(), None),
        (ctx.subjects.status(), None),
        (ctx.subjects.rules_test(), Some(rules_group)),
    ] {
        let sub = match queue {
            Some(queue) => ctx.client.queue_subscribe(subject.clone(), queue).await?,
            None => ctx.client.subscribe(subject.clone()).await?,
        };
        let sub = Plain::new(sub);
        let (responder, mut stop) = (responder.clone(), stop.clone());
        let subject = async_nats::Subject::from(subject);
        tasks.spawn(async move {
            let mut sub = sub;
            loop {
                tokio::select! {
                    message = sub.next() => match message {
                        Some(message) => responder.answer(message).await,
                        None => return,
                    },
                    _ = async { drop(stop.wait_for(|stopped| *stopped).await) } => break,
                }
            }
            let client = responder.ctx.client.clone();
            sub.fence(&client, &subject, &*responder).await;
        });
    }
    Ok(tokio::spawn(
        async move { while tasks.join_next().await.is_some() {} },
    ))
}

/// What the window and status requests are answered from.
struct Responder {
    ctx: Arc<Shared>,
    window: Arc<Window>,
    /// This node's id, as replies name it.
    node: String,
    /// When the service started (uptime).
    started: Instant,
}

impl fence::Answer for Responder {
    async fn answer(&self, message: Message) {
        let ctx = &self.ctx;
        let received = Instant::now();
        if fence::is_fence(&message) {
            return;
        }
        let Some(to) = message.reply.clone() else { return };
        if ctx.subjects.is_ours(&to) {
            Metrics::inc(&ctx.metrics.refused_replies);
            return;
        }
        if message.subject.as_str() == ctx.subjects.rules_test() {
            let error = match rules::rules_request(ctx, &message) {
                Ok(mut answer) => {
                    answer["node"] = self.node.clone().into();
                    publish(ctx, to, answer.to_string().into()).await;
                    false
                }
                Err(e) => {
                    reply_error(ctx, to, 400, &e).await;
                    true
                }
            };
            return ctx.metrics.served(Endpoint::RulesTest, received, error);
        }
        if message.subject.as_str() == ctx.subjects.status() {
            let status = status::status(ctx, &self.window, &self.node, self.started).await;
            publish(ctx, to, status.to_string().into()).await;
            return ctx.metrics.served(Endpoint::Status, received, false);
        }
        let error = match window::window_request(ctx, &self.window, &message).await {
            Ok(()) => {
                let described = self.window.describe(ctx, &self.node).to_string();
                publish(ctx, to, described.into()).await;
                false
            }
            Err(e) => {
                reply_error(ctx, to, 400, &e).await;
                true
            }
        };
        ctx.metrics.served(Endpoint::Window, received, error);
    }
}

/// Longest an operator's request waits for replies.
const GATHER_WAIT: Duration = Duration::from_secs(2);
/// Once replies come, the request ends when none came for this long.
const GATHER_QUIET: Duration = Duration::from_millis(300);

/// Sends `payload` to `subject`, which every sidecar receives, and gathers
/// the replies: until `GATHER_QUIET` passes without one, at most
/// `GATHER_WAIT`.
///
/// # Errors
///
/// If the request cannot be sent.
pub async fn gather(client: &Client, subject: String, payload: Bytes) -> Result<Vec<Message>, String> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    client
        .publish_with_reply(subject, inbox, payload)
        .await
        .map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + GATHER_WAIT;
    let mut out = Vec::new();
    loop {
        let quiet = tokio::time::Instant::now() + GATHER_QUIET;
        let until = if out.is_empty() {
            deadline
        } else {
            deadline.min(quiet)
        };
        match tokio::time::timeout_at(until, replies.next()).await {
            // The server's word that nobody is subscribed.
            Ok(Some(m)) if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) => return Ok(out),
            Ok(Some(message)) => out.push(message),
            _ => return Ok(out),
        }
    }
}

/// A reply's JSON body, or the error it carries.
fn reply_body(message: &Message) -> Result<Value, String> {
    if let Some(reason) = message.headers.as_ref().and_then(|h| h.get("Nats-Service-Error")) {
        return Err(reason.to_string());
    }
    serde_json::from_slice(&message.payload).map_err(|e| format!("unreadable reply: {e}"))
}

/// `ms` in the largest unit that divides it: `2h`, `90m`, `1500ms`.
pub fn format_ms(ms: u64) -> String {
    for (unit, scale) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms > 0 && ms.is_multiple_of(scale) {
            return format!("{}{unit}", ms / scale);
        }
    }
    format!("{ms}ms")
}

/// The KV bucket of what is set at run time, and the connection to it.
pub(super) async fn bucket(settings: &Settings) -> Result<(async_nats::Client, kv::Store), String> {
    let bucket = &settings.config.kv_bucket;
    if bucket.is_empty() {
        return Err("kv_bucket is empty: what is set at run time (rules, schema) lives there".into());
    }
    let client = crate::nats::options::connect(&settings.config.nats, Arc::default())
        .await
        .map_err(|e| e.to_string())?;
    let store = open_bucket(&client, bucket, settings.config.cluster.replicas).await?;
    Ok((client, store))
}
