//! The HTTP gateway (`http_addr`, off by default): producers without a
//! NATS client reach the same verdict pipeline as over NATS. An event of a
//! shard this node does not own goes to its owner over NATS, as a
//! `dedup.ingest` request would.
//!
//! | request | answer |
//! |---|---|
//! | `POST /api/v1/events` (one JSON event) | `202 {"accepted":true}` new, `409 {"accepted":false}` duplicate, `400 {"error":..}` bad event, `413` too large, `503` not ready or overloaded, `500` store failed |
//! | `POST /api/v1/events/batch` (newline-delimited events) | `200`, one verdict line per event as the NATS batch reply |
//! | `GET /api/v1/events/<id>` | `200 {"remembered":true,"since":<ms>}` or `404 {"remembered":false}` |
//! | `DELETE /api/v1/events/<id>` | `200 {"forgotten":true,"since":<ms>}` or `404 {"forgotten":false}` |
//! | `POST /api/v1/ddup_service/events`, `GET /api/v1/ddup_service/test` | aliases of the first and of `/health`, for clients of such services |
//! | `GET /health` | `200` while the process runs |
//! | `GET /ready` | `200` once every owned shard is ready and NATS is connected, else `503` |
//! | `GET /metrics` | the Prometheus metrics, with `http_metrics = true` (else `404`) |

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State as Connection;
use async_nats::{Message, Subject};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::engine::Verdict;
use crate::engine::event::EventErrorKind;
use crate::observe::metrics::{MAX_SCRAPES, Metrics};
use crate::pipeline::{Admin, Outcome, ShardState};
use crate::shared::Shared;
use crate::transport::forward;
use crate::transport::subscription::batch_reply;
use crate::transport::{ACCEPTED, DUPLICATE};

/// What the handlers share.
pub struct Gateway {
    pub ctx: Arc<Shared>,
    /// Serve `/metrics` too.
    pub metrics: bool,
    /// When the service started (the uptime metric).
    pub started: Instant,
    /// Renders of `/metrics` at once, as on the metrics endpoint.
    pub scrapes: Semaphore,
}

impl Gateway {
    pub fn new(ctx: Arc<Shared>, metrics: bool, started: Instant) -> Self {
        Self {
            ctx,
            metrics,
            started,
            scrapes: Semaphore::new(MAX_SCRAPES),
        }
    }
}

/// How the gateway bounds its connections: every outside input has a
/// deadline and a bound.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Longest a connection may take to send a request's headers, and may
    /// stay idle between requests (hyper's header read timer covers both).
    pub header_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

/// Serves the gateway on `listener` until `shutdown` changes; then stops
/// taking connections and answers the requests in progress.
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let ctx = &gateway.ctx;
    let event_limit = ctx.pipeline.dedup().config().limits.max_event_bytes;
    // A batch is bounded as over NATS: by the server's largest message.
    let batch_limit = ctx.client.server_info().max_payload.max(event_limit);
    let app = Router::new()
        .route(
            "/api/v1/events",
            post(event).layer(DefaultBodyLimit::max(event_limit)),
        )
        .route(
            "/api/v1/ddup_service/events",
            post(event).layer(DefaultBodyLimit::max(event_limit)),
        )
        .route(
            "/api/v1/events/batch",
            post(batch).layer(DefaultBodyLimit::max(batch_limit)),
        )
        .route("/api/v1/events/{id}", get(lookup).delete(forget))
        .route("/api/v1/aggregates/{name}", get(aggregate))
        .route("/api/v1/aggregates/{name}/quantile", get(aggregate_quantile))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/ddup_service/test", get(health))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::map_response_with_state(
            ctx.metrics.clone(),
            count_too_large,
        ))
        .with_state(Arc::new(gateway));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // A connection slot first: beyond the cap, clients wait in the
        // backlog instead of costing a file descriptor each.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = shutdown.changed() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(message = "The HTTP gateway cannot accept a connection.", error = %e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let mut stop = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = async { drop(stop.wait_for(|stopped| *stopped).await) } => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
    // Answer the requests in progress; idle connections close at once.
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Counts a body refused for its size (413, answered before any handler
/// runs) as the NATS path counts an event over `max_event_bytes`.
async fn count_too_large(State(metrics): State<Arc<Metrics>>, response: Response) -> Response {
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Metrics::inc(metrics.invalid(EventErrorKind::TooLarge));
    }
    response
}

fn reply(code: StatusCode, body: Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn failure(code: u16, reason: &str) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    reply(code, json!({ "error": reason }))
}

fn overloaded(ctx: &Shared) -> Response {
    failure(503, &ctx.budget.refusal())
}

/// `202` with [`ACCEPTED`] or `409` with [`DUPLICATE`]: the NATS reply
/// bodies.
fn verdict(new: bool) -> Response {
    let (code, body) = match new {
        true => (StatusCode::ACCEPTED, ACCEPTED),
        false => (StatusCode::CONFLICT, DUPLICATE),
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A body declared in the other format than the sidecar reads (protobuf
/// to a JSON sidecar, JSON to a protobuf one): 415 naming the one it
/// reads. Any other `Content-Type` is read as the configured format.
fn unsupported(ctx: &Shared, headers: &HeaderMap) -> Option<Response> {
    let given = headers.get(header::CONTENT_TYPE)?.to_str().unwrap_or("?");
    let essence = given
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let protobuf = ctx.pipeline.dedup().config().format.is_protobuf();
    let fits = match essence.as_str() {
        "application/x-protobuf" | "application/protobuf" | "application/vnd.google.protobuf" => protobuf,
        "application/json" | "application/x-ndjson" => !protobuf,
        // None declared, curl's form type, octet-stream: the configured format.
        _ => true,
    };
    let takes = if protobuf {
        "application/x-protobuf"
    } else {
        "application/json"
    };
    (!fits).then(|| {
        reply(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            json!({ "error": format!("Content-Type {given} is not what this sidecar reads ([input] format): send {takes}") }),
        )
    })
}

async fn event(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let ctx = &g.ctx;
    if let Some(refused) = unsupported(ctx, &headers) {
        return refused;
    }
    let Some(_held) = ctx.budget.try_hold(body.len()) else {
        return overloaded(ctx);
    };
    // The NATS subject of the same request: the rules' `subject`.
    let came_in_on = Subject::from(ctx.subjects.ingest());
    match ctx.pipeline.ingest(&body, &came_in_on).await {
        Ok(Outcome::Verdict(v)) => verdict(v == Verdict::New),
        Ok(other) => {
            let (code, reason) = other.error().expect("not a verdict");
            failure(code, &reason)
        }
        Err(keyed) => {
            let subject = ctx.subjects.shard_event(keyed.shard, &keyed.id);
            match ask(ctx, (subject, Some(&came_in_on)), body.clone()).await {
                Err(response) => response,
                Ok(answer) => match &answer.payload[..] {
                    body if body == ACCEPTED => verdict(true),
                    body if body == DUPLICATE => verdict(false),
                    _ => failure(
                        502,
                        "the shard's owner gave an answer this node does not understand",
                    ),
                },
            }
        }
    }
}

async fn batch(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let ctx = &g.ctx;
    if let Some(refused) = unsupported(ctx, &headers) {
        return refused;
    }
    let Some(_held) = ctx.budget.try_hold(body.len()) else {
        return overloaded(ctx);
    };
    let came_in_on = Subject::from(ctx.subjects.batch());
    let out = batch_reply(ctx, &body, &came_in_on, false).await;
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], out).into_response()
}

/// `GET /api/v1/aggregates/<name>?<group field>=<value>&window=60s` (or
/// `start`/`end` in Unix seconds): the query `<prefix>.agg.query` answers,
/// asked over NATS, so the two answer byte for byte the same.
async fn aggregate(
    State(g): State<Arc<Gateway>>,
    Path(name): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let subject = format!("{}.agg.query", g.ctx.subjects.prefix());
    ask_aggregates(&g.ctx, subject, aggregate_query(&name, &params)).await
}

/// `GET /api/v1/aggregates/<name>/quantile?...&q=0.99`: what
/// `<prefix>.agg.quantile` answers.
async fn aggregate_quantile(
    State(g): State<Arc<Gateway>>,
    Path(name): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let subject = format!("{}.agg.quantile", g.ctx.subjects.prefix());
    ask_aggregates(&g.ctx, subject, aggregate_query(&name, &params)).await
}

/// The JSON query of `params`: `window` as given, `start`, `end` and `q`
/// as numbers (as given when they are not: the query says what is wrong),
/// any other parameter the group.
fn aggregate_query(name: &str, params: &[(String, String)]) -> Value {
    let mut query = serde_json::Map::new();
    query.insert("aggregate".into(), json!(name));
    for (key, value) in params {
        let v = match key.as_str() {
            "start" | "end" | "q" => value.parse::<f64>().map_or_else(|_| json!(value), |x| json!(x)),
            _ => json!(value),
        };
        query.insert(key.clone(), v);
    }
    Value::Object(query)
}

/// Asks `subject` over NATS; its answer with the status its error code
/// gives.
async fn ask_aggregates(ctx: &Shared, subject: String, query: Value) -> Response {
    let asked = ctx.client.request(subject, Bytes::from(query.to_string()));
    let answer = match tokio::time::timeout(Duration::from_secs(10), asked).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return failure(503, &format!("aggregates unavailable: {e}; retry")),
        Err(_) => return failure(503, "no aggregate answer within 10 s; retry"),
    };
    if let Some(headers) = &answer.headers
        && let Some(code) = headers.get("Nats-Service-Error-Code")
    {
        let reason = headers
            .get("Nats-Service-Error")
            .map(|v| v.to_string())
            .unwrap_or_default();
        return failure(code.as_str().parse().unwrap_or(500), &reason);
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        answer.payload,
    )
        .into_response()
}

/// `GET /api/v1/stats?subject=stats.sales.>`: the messages on `subject`
/// (wildcards allowed) as Server-Sent Events, in the order NATS delivers
/// them, each message's payload one event's `data`; a comment every 15 s
/// keeps idle connections open. Ends when the client goes.
async fn stats(State(g): State<Arc<Gateway>>, Query(params): Query<Vec<(String, String)>>) -> Response {
    let Some((_, subject)) = params.iter().find(|(k, _)| k == "subject") else {
        return failure(400, "give ?subject=<subject>, e.g. stats.sales.>");
    };
    let valid = !subject.is_empty()
        && !subject.starts_with('$')
        && !subject.starts_with("_INBOX")
        && subject
            .split('.')
            .all(|t| !t.is_empty() && !t.contains([' ', '\t']));
    if !valid {
        return failure(
            400,
            &format!(
                "subject {subject:?} is not a subject to follow (tokens separated by '.', not $... or _INBOX...)"
            ),
        );
    }
    let messages = match g.ctx.client.subscribe(subject.clone()).await {
        Ok(sub) => sub,
        Err(e) => return failure(503, &format!("cannot subscribe to {subject}: {e}; retry")),
    };
    use futures_util::StreamExt;
    let events = messages.map(|m| {
        let mut event = Vec::with_capacity(m.payload.len() + 8);
        // One `data:` line per line of the payload.
        for line in m.payload.split(|&b| b == b'\n') {
            event.extend_from_slice(b"data: ");
            event.extend_from_slice(line);
            event.push(b'\n');
        }
        event.push(b'\n');
        Bytes::from(event)
    });
    let keep_alive = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_secs(15)).await;
        Some((Bytes::from_static(b": keep-alive\n\n"), ()))
    });
    let body = futures_util::stream::select(events, keep_alive).map(Ok::<_, std::convert::Infallible>);
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

async fn lookup(
    State(g): State<Arc<Gateway>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let ctx = &g.ctx;
    let name = admin_name(&id, query.as_deref());
    let admin = ctx.pipeline.lookup(&name);
    admin_response(ctx, admin, "lookup", "remembered", &name).await
}

async fn forget(
    State(g): State<Arc<Gateway>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let ctx = &g.ctx;
    let name = admin_name(&id, query.as_deref());
    let admin = ctx.pipeline.forget(&name).await;
    admin_response(ctx, admin, "forget", "forgotten", &name).await
}

/// The id of a look-up or a forget as the pipeline names it: `<id>`, or
/// `<shard key value>.<id>` from `?shard_key=<value>`.
fn admin_name(id: &str, query: Option<&str>) -> String {
    let placed_by = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("shard_key="));
    match placed_by {
        Some(value) => format!("{value}.{id}"),
        None => id.to_owned(),
    }
}

/// `200 {"<what>":true,"since":..}` or `404 {"<what>":false}`; asked of the
/// owner over NATS when the id's shard is served elsewhere.
async fn admin_response(ctx: &Shared, admin: Admin, verb: &str, what: &str, id: &str) -> Response {
    let known = match admin {
        Admin::Known(since) => since,
        Admin::Failed(outcome) => {
            let (code, reason) = outcome.error().expect("a failure");
            return failure(code, &reason);
        }
        Admin::Elsewhere => {
            let subject = format!("{}.{verb}.{id}", ctx.subjects.prefix());
            let answer = match ask(ctx, (subject.into(), None), Bytes::new()).await {
                Ok(answer) => answer,
                Err(response) => return response,
            };
            match serde_json::from_slice::<Value>(&answer.payload) {
                Ok(body) if body[what] == true => return reply(StatusCode::OK, body),
                Ok(body) if body[what] == false => return reply(StatusCode::NOT_FOUND, body),
                _ => {
                    return failure(
                        502,
                        "the shard's owner gave an answer this node does not understand",
                    );
                }
            }
        }
    };
    match known {
        Some(since) => reply(StatusCode::OK, json!({ what: true, "since": since })),
        None => reply(StatusCode::NOT_FOUND, json!({ what: false })),
    }
}

/// A NATS request to another node, through the NATS transport's forwarder
/// (counted, same deadline); its service error, or no answer, as the HTTP
/// response.
async fn ask(
    ctx: &Shared,
    (subject, came_in_on): (Subject, Option<&Subject>),
    body: Bytes,
) -> Result<Message, Response> {
    Metrics::inc(&ctx.metrics.forwarded);
    let answer = forward::request(ctx, subject, came_in_on, body)
        .await
        .map_err(|why| failure(503, &format!("{why}; retry")))?;
    if let Some(headers) = &answer.headers
        && let Some(code) = headers.get("Nats-Service-Error-Code")
    {
        let reason = headers
            .get("Nats-Service-Error")
            .map(|v| v.to_string())
            .unwrap_or_default();
        return Err(failure(code.as_str().parse().unwrap_or(500), &reason));
    }
    Ok(answer)
}

async fn metrics(State(g): State<Arc<Gateway>>) -> Response {
    if !g.metrics {
        return StatusCode::NOT_FOUND.into_response();
    }
    let Ok(_permit) = g.scrapes.acquire().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let (pipeline, metrics, started) = (g.ctx.pipeline.clone(), g.ctx.metrics.clone(), g.started);
    match tokio::task::spawn_blocking(move || metrics.render(pipeline.dedup(), started)).await {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn health() -> Response {
    reply(StatusCode::OK, json!({ "status": "up" }))
}

async fn ready(State(g): State<Arc<Gateway>>) -> Response {
    let ctx = &g.ctx;
    let ownership = ctx.pipeline.ownership();
    let recovering = (0..ownership.shards()).any(|s| ownership.state(s) == ShardState::Recovering);
    let connected = ctx.client.connection_state() == Connection::Connected;
    match (recovering, connected) {
        (false, true) => reply(StatusCode::OK, json!({ "ready": true })),
        _ => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "ready": false, "recovering": recovering, "nats_connected": connected }),
        ),
    }
}
/// File descriptors kept for everything but HTTP connections: NATS, the
/// store, the metrics endpoint, the store check, logs.
const FILES_RESERVED: u64 = 128;

/// Raises the soft open-files limit to the hard one (each HTTP connection
/// costs a descriptor) and logs both; the soft limit in force after.
fn raise_open_files() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return None;
        }
        let before = limit.rlim_cur;
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            // SAFETY: setrlimit reads one `rlimit` we own; raising the soft
            // limit up to the hard one needs no privilege.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        tracing::info!(
            message = "Open-files limit.",
            soft_before = before,
            soft = limit.rlim_cur,
            hard = limit.rlim_max
        );
        Some(limit.rlim_cur)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// The HTTP connections to serve at once: `configured`, lowered to fit the
/// open-files limit with room for the rest of the process.
pub fn connections(configured: usize) -> usize {
    let Some(files) = raise_open_files() else {
        return configured;
    };
    let fits = files.saturating_sub(FILES_RESERVED).max(1) as usize;
    if configured > fits {
        tracing::warn!(
            message = "http_max_connections lowered to fit the open-files limit.",
            configured,
            serving = fits,
            open_files = files
        );
    }
    configured.min(fits)
}
