//! Sends a few events to the sidecar and prints each verdict.
//!
//! `cargo run --example producer -- [NATS_URL] [ID ...]`
//! (defaults: nats://127.0.0.1:4222, ids a1 a2 a1)

use async_nats::Client;

/// `Ok(true)` new, `Ok(false)` duplicate, `Err(reason)` rejected or unavailable.
async fn ingest_event(client: &Client, event_id: &str, event: String) -> Result<bool, String> {
    // The server maps dedup.ingest.<id> to the owner's shard subject.
    let reply = client
        .request(format!("dedup.ingest.{event_id}"), event.into())
        .await
        .map_err(|e| e.to_string())?;
    if let Some(code) = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
    {
        let reason = reply.headers.as_ref().and_then(|h| h.get("Nats-Service-Error"));
        return Err(format!("{code}: {}", reason.map(|r| r.as_str()).unwrap_or("")));
    }
    match &reply.payload[..] {
        br#"{"accepted":true}"# => Ok(true),
        br#"{"accepted":false}"# => Ok(false),
        other => Err(format!("unexpected reply {}", String::from_utf8_lossy(other))),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), async_nats::Error> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let mut ids: Vec<String> = args.collect();
    if ids.is_empty() {
        ids = vec!["a1".into(), "a2".into(), "a1".into()];
    }
    let client = async_nats::connect(&url).await?;
    for id in ids {
        let event = format!(r#"{{"event_id":"{id}","kind":"example"}}"#);
        match ingest_event(&client, &id, event).await {
            Ok(new) => println!("{id}: {}", if new { "new" } else { "duplicate" }),
            Err(reason) => println!("{id}: rejected ({reason})"),
        }
    }
    Ok(())
}
