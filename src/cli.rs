//! Command-line interface: parse arguments, load configuration, run.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::control::{self, WindowValue};
use crate::engine::shard::shard_of;
use crate::observe::telemetry;

/// eventsieve: event-deduplication sidecar for NATS JetStream.
///
/// Answers NATS requests carrying JSON events with whether their `event_id`
/// is new within a rolling window, and republishes new events.
#[derive(Debug, Parser)]
#[command(name = "eventsieve", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar until SIGINT or SIGTERM.
    Run {
        /// TOML configuration file (default: config/eventsieve.toml if present).
        /// EVENTSIEVE_* environment variables override it.
        #[arg(long, short, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Load and validate the configuration, print the effective settings, exit.
    Config {
        /// TOML configuration file, as for `run`.
        #[arg(long, short, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Inspect the local store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Print every sidecar's window, or change it on all of them while they
    /// serve (kept in the KV bucket, so a restart keeps it).
    Window {
        /// TOML configuration file (for NATS and the bucket), as for `run`.
        #[arg(long, short, value_name = "PATH", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: Option<WindowCommand>,
    },
    /// The routing rules kept in the KV bucket (every sidecar follows
    /// them): print, set, or try them on events.
    Rules {
        /// TOML configuration file (for NATS, the bucket, the shards), as
        /// for `run`.
        #[arg(long, short, value_name = "PATH", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// The protobuf schema kept in the KV bucket (every sidecar follows
    /// it): set from .proto files, print, or reset to the configuration's.
    Schema {
        /// TOML configuration file (for NATS, the bucket, `[input]`), as
        /// for `run`.
        #[arg(long, short, value_name = "PATH", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: SchemaCommand,
    },
    /// Print every sidecar's shards, window and tables.
    Status {
        /// TOML configuration file (for NATS), as for `run`.
        #[arg(long, short, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Print each node's reply as one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Print the shard that owns an event_id (FNV-1a-32 mod shards, as
    /// nats-server's partition mapping computes it).
    Shard {
        /// The event_id.
        event_id: String,
        /// Shard count.
        #[arg(long, default_value_t = 32)]
        shards: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum WindowCommand {
    /// Set the window of every sidecar: a smaller one applies at once, a
    /// larger one as far as the ids held allow.
    Set {
        /// 1ms to 7d, e.g. `2h`.
        window: String,
    },
    /// Go back to each sidecar's configured window.
    Reset,
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Print the set kept in the bucket.
    Get,
    /// Check the set in FILE as the sidecars will, then put it in the
    /// bucket; a set with a problem is refused and nothing changes.
    Set {
        /// The rule set: `default`, `error_subject` and `[[rule]]`s, in
        /// TOML (as `[routing]` of the configuration) or JSON.
        file: PathBuf,
    },
    /// Print where each event of EVENTS (one JSON object a line) would go
    /// under the set in FILE, and which rules it matches; changes nothing.
    Test {
        file: PathBuf,
        events: PathBuf,
        /// The subject the events come in on, as the rules' `subject` sees
        /// it (default: `<subject_prefix>.ingest`).
        #[arg(long, value_name = "SUBJECT")]
        subject: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SchemaCommand {
    /// Compile FILES (as `[input] proto_files`, found under `--proto-path`
    /// and `[input] proto_paths`), check them as the sidecars will, and
    /// put the schema in the bucket.
    Set {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A directory the files and their imports are found in (any number).
        #[arg(long = "proto-path", short = 'I', value_name = "DIR")]
        proto_paths: Vec<PathBuf>,
    },
    /// Print the schema kept in the bucket.
    Get,
    /// Delete it: every sidecar reads events by its configured schema again.
    Reset,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Read every chunk of the LMDB store and check its checksum, changing
    /// nothing. Exits 0 if intact, 1 if damaged or unreadable.
    Verify {
        /// TOML configuration file whose `data_dir` to check, as for `run`.
        #[arg(long, short, value_name = "PATH")]
        config: Option<PathBuf>,
        /// The store's directory (overrides the configuration's `data_dir`).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Give up (exit 1, as for a damaged store) after this long, e.g.
        /// `90s`; default `verify_store_timeout` plus 1 s per 64 MiB.
        #[arg(long, value_name = "DURATION")]
        timeout: Option<String>,
    },
}

/// Exit status for a configuration that cannot be used.
pub const EXIT_CONFIG: u8 = 2;

/// Runs the parsed command.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config } => {
            one_malloc_arena();
            let settings = match Config::load(config.as_deref()) {
                Ok(s) => s,
                Err(e) => return config_error(&e),
            };
            telemetry::init(&settings.config.log);
            if let Err(e) = verify_before_start(&settings) {
                tracing::error!(message = "The store failed its check; not starting.", error = %e);
                eprintln!("eventsieve: {e}");
                return ExitCode::FAILURE;
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("eventsieve: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let stopped = runtime.block_on(crate::service::run(
                settings,
                telemetry::shutdown_signal(),
                telemetry::shutdown_signal(),
            ));
            // Every task that had to finish has finished; any left (a
            // connection retrying, or all of them after a second signal)
            // must not hold up the exit.
            runtime.shutdown_background();
            match stopped {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(message = "Stopped with an error.", error = %e);
                    eprintln!("eventsieve: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Config { config } => match Config::load(config.as_deref()) {
            Ok(s) => {
                let _ = writeln!(std::io::stdout(), "{s:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Store {
            command:
                StoreCommand::Verify {
                    config,
                    data_dir,
                    timeout,
                },
        } => {
            // The configuration, unless the arguments say all it would.
            let settings = match (&data_dir, &timeout) {
                (Some(_), Some(_)) => None,
                _ => match Config::load(config.as_deref()) {
                    Ok(s) => Some(s),
                    Err(e) => return config_error(&e),
                },
            };
            let dir = match (data_dir, &settings) {
                (Some(dir), _) => dir,
                (None, Some(s)) => s.config.data_dir.clone(),
                (None, None) => unreachable!("loaded without --data-dir"),
            };
            let limit = match timeout.as_deref().map(crate::config::parse_duration_ms) {
                None => verify_budget(&dir, settings.map_or(60_000, |s| s.verify_store_timeout_ms)),
                Some(Some(ms)) if ms > 0 => Duration::from_millis(ms),
                Some(_) => {
                    eprintln!("eventsieve: --timeout takes a duration such as 90s");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            // The check enforces its deadline itself: a damaged file can
            // send LMDB in circles.
            let shown = dir.display().to_string();
            std::thread::spawn(move || {
                std::thread::sleep(limit);
                eprintln!("eventsieve: {}", overran(&shown, limit));
                std::process::exit(1);
            });
            match crate::journal::verify(&dir) {
                Ok(report) => {
                    let _ = writeln!(
                        std::io::stdout(),
                        "store in {}: {} chunks, {} ids, every checksum holds",
                        dir.display(),
                        report.chunks,
                        report.ids
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("eventsieve: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Window { config, command } => with_settings(config.as_deref(), |settings| async move {
            let request = match command {
                None => None,
                Some(WindowCommand::Reset) => Some(None),
                Some(WindowCommand::Set { window }) => match WindowValue::parse(&window) {
                    Ok(value) => Some(Some(value)),
                    Err(e) => return Err((EXIT_CONFIG, e)),
                },
            };
            let lines = control::window_command(&settings, request)
                .await
                .map_err(|e| (1, e))?;
            Ok(lines)
        }),
        Command::Rules { config, command } => with_settings(config.as_deref(), |settings| async move {
            let read = |path: &std::path::Path| {
                std::fs::read_to_string(path).map_err(|e| (EXIT_CONFIG, format!("{}: {e}", path.display())))
            };
            match command {
                RulesCommand::Get => control::rules::rules_get(&settings)
                    .await
                    .map(|text| vec![text])
                    .map_err(|e| (1, e)),
                RulesCommand::Set { file } => {
                    let text = read(&file)?;
                    control::rules::rules_set(&settings, &text)
                        .await
                        .map(|done| vec![done])
                        .map_err(|e| (1, e))
                }
                RulesCommand::Test {
                    file,
                    events,
                    subject,
                } => {
                    let (text, events) = (read(&file)?, read(&events)?);
                    control::rules::rules_test(&settings, &text, &events, subject.as_deref())
                        .map_err(|e| (1, e))
                }
            }
        }),
        Command::Schema { config, command } => with_settings(config.as_deref(), |settings| async move {
            let done = match command {
                SchemaCommand::Set { files, proto_paths } => {
                    control::schema::schema_set(&settings, &files, &proto_paths).await
                }
                SchemaCommand::Get => control::schema::schema_get(&settings).await,
                SchemaCommand::Reset => control::schema::schema_reset(&settings).await,
            };
            done.map(|line| vec![line]).map_err(|e| (1, e))
        }),
        Command::Status { config, json } => with_settings(config.as_deref(), |settings| async move {
            control::status_command(&settings, json).await.map_err(|e| (1, e))
        }),
        Command::Shard { event_id, shards } => {
            if shards == 0 {
                eprintln!("eventsieve: --shards must be at least 1");
                return ExitCode::from(EXIT_CONFIG);
            }
            let _ = writeln!(std::io::stdout(), "{}", shard_of(&event_id, shards));
            ExitCode::SUCCESS
        }
    }
}

/// Loads the configuration and runs `command` (an operator's request over
/// NATS) on a runtime of its own; prints the lines it returns, or its error
/// with its exit status.
fn with_settings<F, Fut>(config: Option<&std::path::Path>, command: F) -> ExitCode
where
    F: FnOnce(crate::config::Settings) -> Fut,
    Fut: Future<Output = Result<Vec<String>, (u8, String)>>,
{
    let settings = match Config::load(config) {
        Ok(s) => s,
        Err(e) => return config_error(&e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("eventsieve: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command(settings)) {
        Ok(lines) => {
            let mut out = std::io::stdout().lock();
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
            ExitCode::SUCCESS
        }
        Err((code, e)) => {
            eprintln!("eventsieve: {e}");
            ExitCode::from(code)
        }
    }
}

/// How long checking the store in `dir` may take: `base_ms` plus 1 s per
/// 64 MiB of `data.mdb` (a check reads it all, at well over 64 MiB/s).
fn verify_budget(dir: &std::path::Path, base_ms: u64) -> Duration {
    let bytes = std::fs::metadata(dir.join("data.mdb")).map_or(0, |m| m.len());
    Duration::from_millis(base_ms) + Duration::from_secs(bytes >> 26)
}

/// The message of a check that did not finish within `limit`.
fn overran(dir: &str, limit: Duration) -> String {
    format!(
        "checking the store in {dir} did not finish within {limit:?}: its files are damaged (or the disk hangs). \
         Restore the directory from a copy or move it aside (its ids would be accepted again); \
         `verify_store_timeout` allows longer, `verify_store_on_start = false` skips this check"
    )
}

/// Runs `eventsieve store verify` on the store `run` is about to open, in a
/// process of its own: LMDB trusts its pages, so a damaged page could crash
/// whichever process reads it, and it should be the check, with a message,
/// rather than the service. The check is bounded in time (by itself, and
/// killed here past the same deadline) and dies with this process.
fn verify_before_start(settings: &crate::config::Settings) -> Result<(), String> {
    use crate::config::Durability;
    let dir = &settings.config.data_dir;
    let durability = settings.config.durability;
    if durability == Durability::Memory
        || !settings.config.verify_store_on_start
        || !dir.join("data.mdb").exists()
    {
        return Ok(());
    }
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find this program to verify the store: {e}"))?;
    let limit = verify_budget(dir, settings.verify_store_timeout_ms);
    tracing::info!(
        message = "Checking the store before opening it.",
        data_dir = %dir.display(),
        limit = ?limit
    );
    let mut command = std::process::Command::new(exe);
    command
        .args([
            "store",
            "verify",
            "--timeout",
            &format!("{}ms", limit.as_millis()),
        ])
        .arg("--data-dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    dies_with_parent(&mut command);
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run the store check: {e}"))?;
    // Its own deadline ends it; this one is for a check that cannot even
    // run its timer (stopped, or stuck in the kernel).
    let deadline = std::time::Instant::now() + limit + Duration::from_secs(5);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    let mut said = stderr.trim().trim_start_matches("eventsieve: ").to_owned();
    match status {
        Some(status) if status.success() => return Ok(()),
        Some(_) => {}
        None => said = overran(&dir.display().to_string(), limit),
    }
    let Some(out) = status else {
        return damaged(dir, durability, said);
    };
    #[cfg(unix)]
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&out) {
        said = format!(
            "checking the store in {} crashed (signal {signal}): its files are damaged past what LMDB can read. \
             Restore the directory from a copy or move it aside (its ids would be accepted again); \
             `verify_store_on_start = false` skips this check",
            dir.display()
        );
    }
    damaged(dir, durability, said)
}

/// A store that failed its check: an error naming it, or with
/// `replicated` (the store is only a copy: the journal holds every id it
/// held) moved aside to be rebuilt from the journal.
fn damaged(dir: &std::path::Path, durability: crate::config::Durability, said: String) -> Result<(), String> {
    if durability == crate::config::Durability::Replicated {
        let aside = crate::journal::lmdb::move_aside(dir)
            .map_err(|e| format!("{said}; and the store cannot be moved aside: {e}"))?;
        tracing::warn!(
            message = "The local store failed its check; moved aside, rebuilding from the journal.",
            check = %said,
            moved_to = %aside.display(),
        );
        return Ok(());
    }
    Err(said)
}

/// Makes the child get SIGKILL when this process dies, so that a check
/// started by `run` never outlives it.
fn dies_with_parent(command: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec and
        // calls only prctl, which is async-signal-safe; it allocates nothing.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Makes glibc keep one heap for all threads, unless `MALLOC_ARENA_MAX` is
/// set. By default each thread that allocates gets its own heap (up to 8 per
/// core). A table segment is reallocated by whichever thread ingests, so with
/// several heaps the freed arrays leave holes in one heap while the new ones
/// grow another: after recovering 20 M ids and 15 s of batch load the
/// sidecar held 28 bytes of `RssAnon` per live id with the default and 16
/// with one heap, at the same throughput.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a parameter of the allocator; it is
        // called before the runtime starts any thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

fn config_error(e: &crate::config::ConfigError) -> ExitCode {
    eprintln!("eventsieve: {e}");
    ExitCode::from(EXIT_CONFIG)
}
