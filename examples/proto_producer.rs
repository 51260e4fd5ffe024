//! Sends protobuf e-commerce events (`shop.v1.Event` of
//! `examples/proto/shop/v1/events.proto`) to a sidecar run with
//! `config/shop-protobuf.toml`: some one by one, the rest in batches of
//! length-delimited messages; every event sent twice, as a producer that
//! retries does. Prints what the sidecar said.
//!
//! `cargo run --release --example proto_producer -- [NATS_URL] [EVENTS] [BATCH]`
//! (defaults: nats://127.0.0.1:4222, 1000 events, batches of 100)
//!
//! The schema is compiled here as the sidecar compiles it (protox, no
//! protoc); a producer with generated code (prost, protobuf-java, ...)
//! sends the same bytes.

use std::path::PathBuf;

use async_nats::Client;
use bytes::Bytes;
use eventsieve::config::input_config::compile;
use eventsieve::engine::batch::{self, Entry};
use prost::Message;
use prost_reflect::{DynamicMessage, MessageDescriptor, Value};

const KINDS: [&str; 4] = [
    "PRODUCT_VIEWED",
    "PRODUCT_ADDED_TO_CART",
    "ORDER_PLACED",
    "PAYMENT_PROCESSED",
];
const CATEGORIES: [&str; 4] = ["shoes", "hats", "books", "games"];

/// Event `i` of the run: a session's `i`-th step, its amount, its time.
fn event(desc: &MessageDescriptor, run: u64, i: u64) -> Vec<u8> {
    let mut m = DynamicMessage::new(desc.clone());
    let set = |m: &mut DynamicMessage, name: &str, v: Value| m.set_field_by_name(name, v);
    set(&mut m, "event_id", Value::String(format!("r{run}e{i}")));
    let kind = KINDS[(i % 4) as usize];
    let number = desc
        .get_field_by_name("type")
        .and_then(|f| f.kind().as_enum().and_then(|e| e.get_value_by_name(kind)))
        .map_or(0, |v| v.number());
    set(&mut m, "type", Value::EnumNumber(number));
    set(&mut m, "session_id", Value::String(format!("s{}", i / 4)));
    set(&mut m, "user_id", Value::String(format!("u{}", i / 8)));
    set(
        &mut m,
        "category",
        Value::String(CATEGORIES[(i / 4 % 4) as usize].into()),
    );
    set(&mut m, "product_id", Value::String(format!("p{}", i % 97)));
    // Every 10th order is a big one: the fraud rule sends it on.
    let amount = if kind == "ORDER_PLACED" && i % 40 == 2 {
        1500.0
    } else {
        10.0 + (i % 90) as f64
    };
    set(&mut m, "amount", Value::F64(amount));
    set(&mut m, "currency", Value::String("USD".into()));
    set(&mut m, "seq", Value::U64(i % 4));
    let ts_desc = desc
        .get_field_by_name("timestamp")
        .and_then(|f| f.kind().as_message().cloned());
    if let Some(ts_desc) = ts_desc {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut ts = DynamicMessage::new(ts_desc);
        ts.set_field_by_name("seconds", Value::I64(now.as_secs() as i64));
        ts.set_field_by_name("nanos", Value::I32(now.subsec_nanos() as i32));
        set(&mut m, "timestamp", Value::Message(ts));
    }
    m.encode_to_vec()
}

/// `Ok(true)` new, `Ok(false)` duplicate, `Err(reason)` rejected or unavailable.
async fn ingest(client: &Client, event: Vec<u8>) -> Result<bool, String> {
    let reply = client
        .request("dedup.ingest", Bytes::from(event))
        .await
        .map_err(|e| e.to_string())?;
    if let Some(headers) = &reply.headers
        && let Some(code) = headers.get("Nats-Service-Error-Code")
    {
        let reason = headers
            .get("Nats-Service-Error")
            .map(|r| r.to_string())
            .unwrap_or_default();
        return Err(format!("{code}: {reason}"));
    }
    Ok(&reply.payload[..] == br#"{"accepted":true}"#)
}

/// A batch: each message after its length as a varint (`writeDelimitedTo`).
fn delimited(events: &[Vec<u8>]) -> Bytes {
    let mut body = Vec::new();
    for e in events {
        prost::encoding::encode_varint(e.len() as u64, &mut body);
        body.extend_from_slice(e);
    }
    body.into()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let count: u64 = args.next().map_or(Ok(1000), |a| a.parse())?;
    let batch_size: usize = args.next().map_or(Ok(100), |a| a.parse())?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/proto");
    let (pool, _) = compile(&[root], &["shop/v1/events.proto".into()])?;
    let desc = pool
        .get_message_by_name("shop.v1.Event")
        .ok_or("no shop.v1.Event")?;
    let client = async_nats::connect(&url).await?;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();

    // A tenth one by one, each sent twice.
    let singles = count / 10;
    let (mut new, mut duplicates, mut errors) = (0u64, 0u64, 0u64);
    for i in 0..singles {
        let e = event(&desc, run, i);
        for _ in 0..2 {
            match ingest(&client, e.clone()).await {
                Ok(true) => new += 1,
                Ok(false) => duplicates += 1,
                Err(reason) => {
                    errors += 1;
                    eprintln!("event {i}: {reason}");
                }
            }
        }
    }
    // The rest in batches, each batch sent twice.
    let rest: Vec<Vec<u8>> = (singles..count).map(|i| event(&desc, run, i)).collect();
    for chunk in rest.chunks(batch_size.max(1)) {
        let body = delimited(chunk);
        for _ in 0..2 {
            let reply = client.request("dedup.batch", body.clone()).await?;
            for entry in batch::decode(&reply.payload)? {
                match entry {
                    Entry::New => new += 1,
                    Entry::Duplicate => duplicates += 1,
                    Entry::Error { code, reason } => {
                        errors += 1;
                        eprintln!("batch line: {code} {reason}");
                    }
                }
            }
        }
    }
    println!(
        "sent {count} events twice ({singles} one by one, the rest in batches of {batch_size}): {new} new, {duplicates} duplicates, {errors} errors"
    );
    if new != count || duplicates != count {
        return Err(format!("expected {count} new and {count} duplicates").into());
    }
    Ok(())
}
