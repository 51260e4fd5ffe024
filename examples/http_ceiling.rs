//! The ceiling of the HTTP gateway on this machine: the same axum stack and
//! runtime as the sidecar's gateway, answering every `POST /api/v1/events`
//! with `202 {"accepted":true}` without parsing, deciding or committing
//! anything. Run `wrk` against it and against the sidecar in turn (see the
//! README's HTTP section):
//!
//! ```sh
//! cargo run --release --example http_ceiling -- 127.0.0.1:8081 &
//! wrk -t2 -c64 -d10s -s examples/scripts/http-load.lua http://127.0.0.1:8081
//! ```

use axum::Router;
use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;

async fn accept(body: Bytes) -> impl IntoResponse {
    let _ = body.len();
    (
        StatusCode::ACCEPTED,
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"accepted":true}"#,
    )
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8081".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("http_ceiling: answering POST /api/v1/events on {addr}");
    let app = Router::new().route("/api/v1/events", post(accept));
    axum::serve(listener, app).await
}
