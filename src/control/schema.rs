//! The protobuf schema at run time: the KV key `schema` holds an encoded
//! `FileDescriptorSet` (`eventsieve schema set FILE.proto…` compiles and
//! puts it); every sidecar watches it, as it watches `window`.
//!
//! A new schema must hold the configured message (`[input] message`) with
//! every field the sidecar reads: the key and the shard key (strings or
//! integers), the aggregates' fields, the reorder buffer's, and the
//! top-level fields the routing rules in force read. One that does not is
//! refused whole: the schema in force stays, the refusal is logged,
//! counted (`eventsieve_schema_rejected_total`) and shown by `eventsieve
//! status`. Deleting the key puts the configuration's schema back.
//! Requests already being decided finish with the schema they started with.

use std::path::PathBuf;
use std::sync::Arc;

use async_nats::jetstream::kv;
use bytes::Bytes;

use crate::config::Settings;
use crate::config::input_config::{check_fields, compile, pool_of};
use crate::engine::input::Schemas;
use crate::engine::proto::Schema;
use crate::nats::kv::watch_key;
use crate::route::Router;

/// The KV key of the protobuf schema set at run time.
pub const SCHEMA_KEY: &str = "schema";

/// What a sidecar checks a new schema against, and where it installs it.
pub struct SchemaControl {
    pub schemas: Arc<Schemas>,
    settings: Settings,
    router: Arc<Router>,
}

impl SchemaControl {
    /// `None` for JSON input.
    pub fn new(settings: &Settings, router: Arc<Router>) -> Option<Arc<Self>> {
        let schemas = settings.format.schemas()?.clone();
        Some(Arc::new(Self {
            schemas,
            settings: settings.clone(),
            router,
        }))
    }

    /// The schema in `bytes` (an encoded `FileDescriptorSet`), if this
    /// sidecar can serve with it.
    ///
    /// # Errors
    ///
    /// Why it cannot.
    pub fn check(&self, bytes: &[u8]) -> Result<Schema, String> {
        let schema = schema_of(&self.settings, bytes)?;
        let rules = self.router.current();
        if let Some(field) = rules.fields().iter().find(|f| !schema.has_field(f)) {
            return Err(format!(
                "{} has no field {field:?}, which the routing rules in force (revision {}) read",
                schema.name(),
                rules.revision
            ));
        }
        Ok(schema)
    }

    fn apply(&self, entry: &kv::Entry) {
        if self.schemas.revision() == entry.revision {
            return;
        }
        match entry.operation {
            kv::Operation::Put => match self.check(&entry.value) {
                Ok(schema) => {
                    tracing::info!(
                        message = "Protobuf schema in force.",
                        revision = entry.revision,
                        message_type = schema.name()
                    );
                    self.schemas.install(Arc::new(schema), entry.revision);
                }
                Err(e) => {
                    self.schemas.refuse(entry.revision, &e);
                    tracing::warn!(message = "Refused the protobuf schema put in the KV bucket; the schema in force stays.", revision = entry.revision, error = %e);
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                tracing::info!(
                    message = "Protobuf schema of the configuration in force again.",
                    revision = entry.revision
                );
                self.schemas
                    .install(self.schemas.configured().clone(), entry.revision);
            }
        }
    }
}

/// The configured message of the schema in `bytes`, checked against the
/// configuration's fields.
fn schema_of(settings: &Settings, bytes: &[u8]) -> Result<Schema, String> {
    let pool = pool_of(bytes)?;
    let schema = Schema::new(pool, &settings.config.input.message)?;
    let shard_key = (!settings.config.shard_key.is_empty()).then_some(settings.config.shard_key.as_str());
    check_fields(
        &schema,
        &settings.key,
        shard_key,
        &settings.aggregates,
        settings.ordering.as_ref(),
    )?;
    Ok(schema)
}

/// Puts the schema kept in the bucket (if any) in force before the sidecar
/// serves.
pub async fn load(control: &SchemaControl, store: &kv::Store) {
    match store.entry(SCHEMA_KEY).await {
        Ok(Some(entry)) => control.apply(&entry),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(message = "Cannot read the schema key; reading events by the configured schema.", error = %e)
        }
    }
}

/// Follows every change of the key until aborted.
pub async fn watch(control: Arc<SchemaControl>, store: kv::Store) {
    let control = &control;
    watch_key(&store, SCHEMA_KEY, "schema", |entry| async move {
        control.apply(&entry);
    })
    .await;
}

impl crate::observe::metrics::Render for SchemaControl {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP eventsieve_schema_revision The KV revision of the protobuf schema in force (0: the configuration's).\n# TYPE eventsieve_schema_revision gauge\neventsieve_schema_revision {}",
            self.schemas.revision()
        );
        let _ = writeln!(
            out,
            "# HELP eventsieve_schema_rejected_total Protobuf schemas put in the KV bucket and refused (not decodable, or missing a field the sidecar reads); the schema in force stayed.\n# TYPE eventsieve_schema_rejected_total counter\neventsieve_schema_rejected_total {}",
            self.schemas.rejections()
        );
    }
}

/// `eventsieve schema set FILE.proto…`: compiles the files (found under
/// `[input] proto_paths` and `extra_paths`), checks the configured message
/// and fields as the sidecars will, and puts the schema in the bucket.
///
/// # Errors
///
/// The compiler's message, the check's, or the bucket's; nothing is
/// written then.
pub async fn schema_set(
    settings: &Settings,
    files: &[PathBuf],
    extra_paths: &[PathBuf],
) -> Result<String, String> {
    let mut paths = extra_paths.to_vec();
    paths.extend(settings.config.input.proto_paths.iter().cloned());
    let (_, bytes) = compile(&paths, files)?;
    let schema = schema_of(settings, &bytes)?;
    let (_, store) = open(settings).await?;
    let revision = store
        .put(SCHEMA_KEY, Bytes::from(bytes))
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "schema set: {} in kv:{}/{SCHEMA_KEY} revision {revision}",
        schema.name(),
        settings.config.kv_bucket
    ))
}

/// `eventsieve schema get`: the files and messages of the schema kept in
/// the bucket, or that none is.
///
/// # Errors
///
/// If the bucket cannot be reached.
pub async fn schema_get(settings: &Settings) -> Result<String, String> {
    let (_, store) = open(settings).await?;
    let bucket = &settings.config.kv_bucket;
    match store.entry(SCHEMA_KEY).await.map_err(|e| e.to_string())? {
        Some(entry) if entry.operation == kv::Operation::Put => {
            let pool = pool_of(&entry.value)?;
            let files: Vec<String> = pool.files().map(|f| f.name().to_owned()).collect();
            Ok(format!(
                "kv:{bucket}/{SCHEMA_KEY} revision {}: files {}",
                entry.revision,
                files.join(", ")
            ))
        }
        _ => Ok(format!(
            "no schema in kv:{bucket}/{SCHEMA_KEY}: the sidecars read events by their configuration"
        )),
    }
}

/// `eventsieve schema reset`: deletes the key, so every sidecar goes back
/// to its configured schema.
///
/// # Errors
///
/// If the bucket cannot be reached.
pub async fn schema_reset(settings: &Settings) -> Result<String, String> {
    let (_, store) = open(settings).await?;
    store.delete(SCHEMA_KEY).await.map_err(|e| e.to_string())?;
    Ok(format!(
        "schema reset: kv:{}/{SCHEMA_KEY} deleted; the sidecars read events by their configured schema",
        settings.config.kv_bucket
    ))
}

async fn open(settings: &Settings) -> Result<(async_nats::Client, kv::Store), String> {
    if !settings.format.is_protobuf() {
        return Err("[input] format is not \"protobuf\" in this configuration".into());
    }
    super::bucket(settings).await
}
