//! `[input]`: the format events arrive in, as written ([`InputConfig`]),
//! and the protobuf schema compiled from `.proto` files without `protoc`
//! ([`compile`]).

use std::path::{Path, PathBuf};

use prost::Message;
use prost_reflect::{DescriptorPool, Kind};
use serde::{Deserialize, Serialize};

use super::{AggregateSettings, ConfigError, OrderingSettings};
use crate::engine::input::Format;
use crate::engine::key::KeySpec;
use crate::engine::proto::Schema;

/// `[input]`: JSON (default), or protobuf messages of one type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// `json` or `protobuf`. Default `json`.
    pub format: String,
    /// Directories the `.proto` files and their imports are found in.
    /// Default `["."]`.
    pub proto_paths: Vec<PathBuf>,
    /// The `.proto` files to compile, relative to one of `proto_paths`.
    /// Default none.
    pub proto_files: Vec<PathBuf>,
    /// Instead of `.proto` files: a compiled `FileDescriptorSet` file
    /// (`protoc --include_imports -o FILE`, `buf build -o FILE`). Default empty.
    pub descriptor_set: String,
    /// The message type of every event, by full name, e.g. `shop.v1.Event`.
    pub message: String,
    /// What new events are republished as: `as_received` (the bytes the
    /// producer sent) or `json` (protobuf's canonical JSON mapping, for
    /// consumers that speak JSON). Default `as_received`.
    pub output_format: String,
}

impl Default for InputConfig {
    fn default() -> Self {
        Self {
            format: "json".into(),
            proto_paths: vec![PathBuf::from(".")],
            proto_files: Vec::new(),
            descriptor_set: String::new(),
            message: String::new(),
            output_format: "as_received".into(),
        }
    }
}

/// `[input]`, checked: the format, and whether the output is JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSettings {
    pub format: Format,
    /// Protobuf events republished in the canonical JSON mapping.
    pub output_json: bool,
}

impl InputConfig {
    /// Compiles the schema, if any.
    ///
    /// # Errors
    ///
    /// A value that cannot be used; a schema that does not compile (with
    /// the compiler's file, line and reason) or lacks `message`.
    pub fn validate(&self) -> Result<InputSettings, ConfigError> {
        let output_json = match self.output_format.as_str() {
            "as_received" => false,
            "json" => true,
            other => {
                return Err(ConfigError::field(
                    "input.output_format",
                    other,
                    "\"as_received\" or \"json\"",
                ));
            }
        };
        let format = match self.format.as_str() {
            "json" if output_json => {
                return Err(ConfigError::field(
                    "input.output_format",
                    "json",
                    "\"as_received\" for JSON input (it is JSON already)",
                ));
            }
            "json" => Format::Json,
            "protobuf" => {
                let pool = if self.descriptor_set.is_empty() {
                    if self.proto_files.is_empty() {
                        return Err(ConfigError::field(
                            "input.proto_files",
                            "[]",
                            "the .proto files of the events (or `input.descriptor_set`)",
                        ));
                    }
                    compile(&self.proto_paths, &self.proto_files)
                        .map_err(ConfigError::message)?
                        .0
                } else {
                    let bytes = std::fs::read(&self.descriptor_set).map_err(|e| {
                        ConfigError::message(format!("input.descriptor_set {}: {e}", self.descriptor_set))
                    })?;
                    pool_of(&bytes).map_err(|e| {
                        ConfigError::message(format!("input.descriptor_set {}: {e}", self.descriptor_set))
                    })?
                };
                let schema = Schema::new(pool, &self.message)
                    .map_err(|e| ConfigError::message(format!("input.message: {e}")))?;
                Format::protobuf(schema)
            }
            other => {
                return Err(ConfigError::field(
                    "input.format",
                    other,
                    "\"json\" or \"protobuf\"",
                ));
            }
        };
        Ok(InputSettings { format, output_json })
    }
}

/// Compiles `files` (found under `paths`) into a pool, and the encoded
/// `FileDescriptorSet` (imports included) that rebuilds it.
///
/// # Errors
///
/// The compiler's message: file, line and column, and what is wrong.
pub fn compile(paths: &[PathBuf], files: &[PathBuf]) -> Result<(DescriptorPool, Vec<u8>), String> {
    let set = protox::compile(files, paths).map_err(|e| compile_error(&e, paths))?;
    let bytes = set.encode_to_vec();
    let pool = DescriptorPool::from_file_descriptor_set(set).map_err(|e| e.to_string())?;
    Ok((pool, bytes))
}

/// A pool from an encoded `FileDescriptorSet`.
///
/// # Errors
///
/// It does not decode, or its files do not make a consistent schema.
pub fn pool_of(bytes: &[u8]) -> Result<DescriptorPool, String> {
    DescriptorPool::decode(bytes).map_err(|e| format!("not a valid FileDescriptorSet: {e}"))
}

/// protox's error with the place it names as `file:line:column`.
fn compile_error(e: &protox::Error, paths: &[PathBuf]) -> String {
    use miette::Diagnostic;
    let place = e.file().and_then(|file| {
        let offset = e.labels()?.next()?.offset();
        let text = paths
            .iter()
            .find_map(|p| std::fs::read_to_string(Path::new(p).join(file)).ok())?;
        let before = text.get(..offset)?;
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        Some(format!("{file}:{line}:{column}: "))
    });
    match place {
        Some(place) => format!("schema does not compile: {place}{e}"),
        None => format!("schema does not compile: {e}"),
    }
}

/// Checks that `schema` has every field the configuration reads, of a
/// type it can use: the key, the shard key, the aggregates' fields, the
/// reorder buffer's.
///
/// # Errors
///
/// The first field that is missing or of the wrong type.
pub fn check_fields(
    schema: &Schema,
    key: &KeySpec,
    shard_key: Option<&str>,
    aggregates: &[AggregateSettings],
    ordering: Option<&OrderingSettings>,
) -> Result<(), String> {
    let text_or_integer = |kind: &Kind| {
        matches!(
            kind,
            Kind::String
                | Kind::Int32
                | Kind::Int64
                | Kind::Uint32
                | Kind::Uint64
                | Kind::Sint32
                | Kind::Sint64
                | Kind::Fixed32
                | Kind::Fixed64
                | Kind::Sfixed32
                | Kind::Sfixed64
        )
    };
    let numeric = |kind: &Kind| {
        text_or_integer(kind) && *kind != Kind::String || matches!(kind, Kind::Double | Kind::Float)
    };
    let check =
        |what: &str, path: &str, ok: &dyn Fn(&prost_reflect::FieldDescriptor) -> bool, wanted: &str| {
            let parts: Vec<&str> = path.split('.').collect();
            let field = schema
                .field_at(&parts)
                .map_err(|e| format!("{what} {path:?}: {e}"))?;
            if field.is_list() || field.is_map() || !ok(&field) {
                return Err(format!("{what} {path:?} must be {wanted}"));
            }
            Ok(())
        };
    match key {
        KeySpec::Content => {}
        KeySpec::Field(name) => check(
            "key",
            name,
            &|f| text_or_integer(&f.kind()),
            "a string or an integer",
        )?,
        KeySpec::Fields(paths) => {
            for path in paths {
                check(
                    "key",
                    &path.join("."),
                    &|f| text_or_integer(&f.kind()),
                    "a string or an integer",
                )?;
            }
        }
    }
    if let Some(field) = shard_key {
        check("shard_key", field, &|f| f.kind() == Kind::String, "a string")?;
    }
    for a in aggregates {
        let group_ok = |f: &prost_reflect::FieldDescriptor| matches!(f.kind(), Kind::String | Kind::Enum(_));
        check("aggregate group", &a.group, &group_ok, "a string or an enum")?;
        check("aggregate value", &a.value, &|f| numeric(&f.kind()), "a number")?;
        if !a.item.is_empty() {
            check("aggregate item", &a.item, &group_ok, "a string or an enum")?;
        }
        if !a.time.is_empty() {
            let time_ok = |f: &prost_reflect::FieldDescriptor| {
                numeric(&f.kind())
                    || matches!(f.kind(), Kind::Message(m) if m.full_name() == "google.protobuf.Timestamp")
                        && a.time_unit_ms == 1000
            };
            check(
                "aggregate time",
                &a.time,
                &time_ok,
                "a number, or a google.protobuf.Timestamp with time_unit \"s\"",
            )?;
        }
    }
    if let Some(o) = ordering {
        check(
            "ordering.session",
            &o.session,
            &|f| f.kind() == Kind::String,
            "a string",
        )?;
        let by_ok = |f: &prost_reflect::FieldDescriptor| {
            numeric(&f.kind())
                || matches!(f.kind(), Kind::Message(m) if m.full_name() == "google.protobuf.Timestamp")
                    && o.ms_per_unit == Some(1000.0)
        };
        check(
            "ordering.by",
            &o.by,
            &by_ok,
            "a number, or a google.protobuf.Timestamp with time_unit \"s\"",
        )?;
    }
    Ok(())
}
