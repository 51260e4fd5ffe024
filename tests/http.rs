//! The HTTP gateway of the real binary (`http_addr`), with a real HTTP
//! client: every endpoint and status code, an event of a shard another
//! sidecar owns, and look-up and forget.

mod common;

use std::time::Duration;

use common::*;

/// `(status, body)` of one request.
fn call(method: &str, url: &str, body: &[u8]) -> (u16, String) {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    match agent.request(method, url).send_bytes(body) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

fn json(id: &str) -> Vec<u8> {
    event(id).to_vec()
}

/// A sidecar binary with the gateway on a free port; its base URL.
fn spawn_with_http(
    server: &NatsServer,
    data: &std::path::Path,
    extra: &[(&str, &str)],
) -> (SidecarProcess, String) {
    spawn_gateway(data, extra, |env| SidecarProcess::spawn(server, data, env))
}

/// Starts a sidecar with `spawn` and the gateway on a free port, and waits
/// until it is ready.
fn spawn_gateway(
    _data: &std::path::Path,
    extra: &[(&str, &str)],
    spawn: impl FnOnce(&[(&str, &str)]) -> SidecarProcess,
) -> (SidecarProcess, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut env = vec![("EVENTSIEVE_HTTP_ADDR", addr.as_str())];
    env.extend_from_slice(extra);
    let sidecar = spawn(&env);
    let base = format!("http://{addr}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while ureq::get(&format!("{base}/ready")).call().is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway was not ready within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (sidecar, base)
}

#[test]
fn every_endpoint_answers_with_its_status_code() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let (sidecar, base) = spawn_with_http(
        &server,
        data.path(),
        &[
            ("EVENTSIEVE_MAX_EVENT_BYTES", "1024"),
            ("EVENTSIEVE_HTTP_METRICS", "true"),
        ],
    );
    let events = format!("{base}/api/v1/events");

    assert_eq!(
        call("POST", &events, &json("h1")),
        (202, r#"{"accepted":true}"#.into())
    );
    assert_eq!(
        call("POST", &events, &json("h1")),
        (409, r#"{"accepted":false}"#.into())
    );
    let (code, body) = call("POST", &events, b"not json");
    assert_eq!(code, 400);
    assert!(body.contains("not valid JSON"), "{body}");
    let (code, body) = call("POST", &events, br#"{"id":"h2"}"#);
    assert!(code == 400 && body.contains("event_id"), "{code} {body}");
    let big = format!(r#"{{"event_id":"h3","pad":"{}"}}"#, "x".repeat(2000));
    assert_eq!(
        call("POST", &events, big.as_bytes()).0,
        413,
        "over max_event_bytes"
    );
    assert_eq!(
        call("POST", &events, &json("h3")).0,
        202,
        "the refused one changed nothing"
    );

    // Batches: one verdict line per line, as over NATS.
    let lines = [json("h4"), json("h1"), b"{}".to_vec(), json("h4")].join(&b'\n');
    let (code, body) = call("POST", &format!("{events}/batch"), &lines);
    assert_eq!(code, 200);
    let got: Vec<&str> = body.lines().collect();
    assert_eq!(got[..2], ["1", "0"]);
    assert!(got[2].starts_with("!400 "), "{body}");
    assert_eq!(got[3], "0");

    // The compatibility aliases, health and readiness.
    let alias = format!("{base}/api/v1/ddup_service/events");
    assert_eq!(call("POST", &alias, &json("h5")).0, 202);
    assert_eq!(call("POST", &alias, &json("h5")).0, 409);
    for path in ["/api/v1/ddup_service/test", "/health", "/ready"] {
        assert_eq!(call("GET", &format!("{base}{path}"), b"").0, 200, "{path}");
    }

    // Look-up and forget.
    let (code, body) = call("GET", &format!("{events}/h1"), b"");
    assert!(
        code == 200 && body.contains(r#""remembered":true"#),
        "{code} {body}"
    );
    assert_eq!(
        call("GET", &format!("{events}/nope"), b""),
        (404, r#"{"remembered":false}"#.into())
    );
    assert_eq!(call("GET", &format!("{events}/h-1"), b"").0, 400);
    assert_eq!(call("DELETE", &format!("{events}/h1"), b"").0, 200);
    assert_eq!(
        call("DELETE", &format!("{events}/h1"), b""),
        (404, r#"{"forgotten":false}"#.into())
    );
    assert_eq!(
        call("POST", &events, &json("h1")).0,
        202,
        "forgotten: accepted again"
    );
    assert_eq!(call("GET", &format!("{base}/nowhere"), b"").0, 404);
    let (code, text) = call("GET", &format!("{base}/metrics"), b"");
    assert_eq!(code, 200);
    assert!(
        text.contains("eventsieve_verdicts_total{verdict=\"accepted\"} 5"),
        "{text}"
    );
    sidecar.terminate();
}

#[test]
fn an_event_of_a_shard_another_sidecar_owns_is_decided_by_its_owner() {
    let server = NatsServer::start();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (low, base) = spawn_with_http(&server, d1.path(), &[("EVENTSIEVE_OWNED_SHARDS", "0-15")]);
    assert_eq!(
        call("GET", &format!("{base}/metrics"), b"").0,
        404,
        "off unless http_metrics"
    );
    let high = SidecarProcess::spawn(&server, d2.path(), &[("EVENTSIEVE_OWNED_SHARDS", "16-31")]);
    let events = format!("{base}/api/v1/events");
    // Ids of both halves; the gateway's node owns 0-15 only.
    let ids: Vec<String> = (0..16).map(|i| format!("w{i}")).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for id in &ids {
        loop {
            match call("POST", &events, &json(id)).0 {
                202 => break,
                // The other node may still be starting.
                503 if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                other => panic!("{id}: {other}"),
            }
        }
    }
    for id in &ids {
        assert_eq!(call("POST", &events, &json(id)).0, 409, "{id}");
        let (code, body) = call("GET", &format!("{events}/{id}"), b"");
        assert!(
            code == 200 && body.contains(r#""remembered":true"#),
            "{id}: {code} {body}"
        );
    }
    let shards: std::collections::HashSet<bool> = ids
        .iter()
        .map(|id| eventsieve::engine::shard::shard_of(id, 32) < 16)
        .collect();
    assert_eq!(shards.len(), 2, "ids of both nodes");
    low.terminate();
    high.terminate();
}

/// SIGTERM while four clients post events: the process stops cleanly, and
/// every event answered 202 was committed (a duplicate after a restart).
#[test]
fn a_graceful_stop_keeps_every_event_it_answered() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let (sidecar, base) = spawn_with_http(&server, data.path(), &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (base, stop) = (base.clone(), stop.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
                let mut accepted = Vec::new();
                for n in 0..20_000 {
                    let id = format!("g{c}x{n}");
                    match agent
                        .post(&format!("{base}/api/v1/events"))
                        .send_bytes(&json(&id))
                    {
                        Ok(r) if r.status() == 202 => accepted.push(id),
                        Ok(r) => panic!("{id}: {}", r.status()),
                        // Stopped: refused, or closed before answering.
                        Err(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => break,
                        Err(e) => panic!("{id}: {e}"),
                    }
                }
                accepted
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let status = sidecar.terminate();
    assert!(status.success(), "{status:?}");
    let accepted: Vec<String> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    assert!(accepted.len() > 100, "{} accepted", accepted.len());

    let (sidecar, base) = spawn_with_http(&server, data.path(), &[]);
    for id in &accepted {
        assert_eq!(
            call("POST", &format!("{base}/api/v1/events"), &json(id)).0,
            409,
            "{id}"
        );
    }
    sidecar.terminate();
}

/// Fault: connections that never finished their headers were kept forever,
/// each holding a file descriptor, until the process ran out of them. Now
/// a header timeout closes them, connections are capped below the
/// open-files limit, and verdicts keep flowing over NATS and HTTP.
#[test]
fn half_open_connections_are_closed_and_verdicts_keep_flowing() {
    use std::io::{Read, Write};
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let (sidecar, base) = spawn_gateway(data.path(), &[("EVENTSIEVE_HTTP_HEADER_TIMEOUT", "2s")], |env| {
        SidecarProcess::spawn_limited(&server, data.path(), 256, env)
    });
    let addr = base.trim_start_matches("http://").to_string();
    let started = std::time::Instant::now();
    let mut half_open: Vec<std::net::TcpStream> = (0..300)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();

    // Verdicts over NATS flow while they are open.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = async_nats::connect(server.url()).await.unwrap();
        for i in 0..50 {
            let id = format!("nats{i}");
            let answer = client
                .request(format!("dedup.ingest.{id}"), event(&id))
                .await
                .unwrap();
            assert_eq!(&answer.payload[..], br#"{"accepted":true}"#);
        }
    });
    // And over HTTP: a new client waits at most a few header timeouts
    // behind the half-open ones.
    assert_eq!(
        call("POST", &format!("{base}/api/v1/events"), &json("web1")).0,
        202
    );
    // Every half-open connection is closed by the sidecar.
    for (i, s) in half_open.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue, // an error response before the close
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!(
                    "half-open connection {i} still open after {:?}: {e}",
                    started.elapsed()
                ),
            }
        }
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(30), "closed only after {elapsed:?}");
    assert_eq!(
        call("POST", &format!("{base}/api/v1/events"), &json("web1")).0,
        409
    );
    sidecar.terminate();
}
