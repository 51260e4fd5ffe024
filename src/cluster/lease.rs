//! Shard leases and node heartbeats in the KV bucket, readable with
//! `nats kv get/ls/watch`:
//!
//! - `shard.<n>`: `{"owner":"<node>","epoch":e,"journal_seq":s,"since":t}`.
//!   Acquired by a write that expects the key's current revision (none, or
//!   the marker its expiry or release left); renewed by a write that
//!   expects the revision the owner holds. Each write carries a per-key TTL
//!   (`Nats-TTL`), so a lease nobody renews disappears by itself. A
//!   released lease says `"owner":""` and the journal sequence it was
//!   handed over at. `epoch` is the revision the owner acquired it at: it
//!   only grows.
//! - `node.<id>`: `{"node":..,"shards":[..],"heartbeat":t,...}`, written
//!   every renewal round with the same TTL: the live nodes.
//!
//! The bucket needs per-key TTL (nats-server 2.11 or later); it is created
//! with it, or has it switched on if it was created without.

use std::time::Duration;

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::{self, kv};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// A shard's lease as stored in `shard.<n>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The node serving the shard; empty once released.
    pub owner: String,
    /// The KV revision the owner acquired the lease at.
    pub epoch: u64,
    /// The last journal sequence of the shard the owner had applied when it
    /// last wrote the lease.
    pub journal_seq: u64,
    /// When the owner acquired it, ms since the Unix epoch.
    pub since: u64,
}

/// What is in `shard.<n>` now.
#[derive(Debug)]
pub enum Holder {
    /// Nobody holds it; a write expecting `revision` takes it (0: the key
    /// never existed or was removed).
    Free { revision: u64 },
    /// Someone holds it, as of `revision`.
    Held { lease: Lease, revision: u64 },
}

/// The bucket of leases and heartbeats.
#[derive(Clone)]
pub struct Leases {
    js: jetstream::Context,
    kv: kv::Store,
    bucket: String,
    ttl: Duration,
}

pub fn shard_key(shard: u32) -> String {
    format!("shard.{shard}")
}

pub fn node_key(node: &str) -> String {
    format!("node.{node}")
}

impl Leases {
    /// Opens `bucket` (created by the caller, see
    /// [`crate::nats::kv::open_bucket`]) and switches per-key TTL on if it
    /// is off.
    ///
    /// # Errors
    ///
    /// If JetStream refuses, or the server is too old for per-key TTL.
    pub async fn open(
        client: async_nats::Client,
        kv: kv::Store,
        bucket: &str,
        ttl: Duration,
    ) -> Result<Self, String> {
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(2));
        let name = format!("KV_{bucket}");
        let mut stream = js
            .get_stream(&name)
            .await
            .map_err(|e| format!("KV bucket {bucket:?}: {e}"))?;
        let info = stream
            .info()
            .await
            .map_err(|e| format!("KV bucket {bucket:?}: {e}"))?;
        // The server raises a per-key TTL below the marker TTL to it.
        let markers_too_long = info
            .config
            .subject_delete_marker_ttl
            .is_some_and(|t| t > crate::nats::kv::EXPIRY_MARKER_TTL);
        if !info.config.allow_message_ttl || markers_too_long {
            let mut config = info.config.clone();
            config.allow_message_ttl = true;
            config.subject_delete_marker_ttl = Some(crate::nats::kv::EXPIRY_MARKER_TTL);
            js.update_stream(config).await.map_err(|e| {
                format!(
                    "KV bucket {bucket:?} has no per-key TTL and it cannot be switched on \
                     (nats-server 2.11 or later is needed for shard leases): {e}"
                )
            })?;
        }
        Ok(Self {
            js,
            kv,
            bucket: bucket.to_owned(),
            ttl,
        })
    }

    /// Writes `key` if its last revision is `expected` (0: the key has no
    /// message), with the lease TTL; returns the new revision.
    async fn write(&self, key: &str, value: Bytes, expected: Option<u64>) -> Result<u64, PublishError> {
        self.write_for(key, value, expected, Some(self.ttl)).await
    }

    /// Writes `key`, which lasts (no TTL), if its last revision is
    /// `expected` (0: the key has no message); returns the new revision.
    /// A write refused because of the revision is
    /// [`crate::journal::stream::wrong_sequence`].
    ///
    /// # Errors
    ///
    /// If JetStream refuses the write.
    pub async fn write_lasting(&self, key: &str, value: Bytes, expected: u64) -> Result<u64, PublishError> {
        self.write_for(key, value, Some(expected), None).await
    }

    /// The value and revision of `key`, if it holds one.
    ///
    /// # Errors
    ///
    /// If the bucket cannot be read.
    pub async fn read(&self, key: &str) -> Result<Option<(Bytes, u64)>, String> {
        let entry = self.kv.entry(key).await.map_err(|e| e.to_string())?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| (e.value, e.revision)))
    }

    async fn write_for(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<u64>,
        ttl: Option<Duration>,
    ) -> Result<u64, PublishError> {
        let mut headers = HeaderMap::new();
        if let Some(expected) = expected {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                HeaderValue::from(expected),
            );
        }
        if let Some(ttl) = ttl {
            headers.insert(
                async_nats::header::NATS_MESSAGE_TTL,
                HeaderValue::from(ttl.as_secs()),
            );
        }
        let subject = format!("$KV.{}.{key}", self.bucket);
        let ack = self
            .js
            .publish_with_headers(subject, headers, value)
            .await?
            .await?;
        Ok(ack.sequence)
    }

    /// Who holds `shard` now.
    ///
    /// # Errors
    ///
    /// If the bucket cannot be read.
    pub async fn holder(&self, shard: u32) -> Result<Holder, String> {
        let entry = self.kv.entry(shard_key(shard)).await.map_err(|e| e.to_string())?;
        Ok(match entry {
            None => Holder::Free { revision: 0 },
            Some(entry) if entry.operation != kv::Operation::Put => Holder::Free {
                revision: entry.revision,
            },
            Some(entry) => match serde_json::from_slice::<Lease>(&entry.value) {
                Ok(lease) if !lease.owner.is_empty() => Holder::Held {
                    lease,
                    revision: entry.revision,
                },
                // Released, or not a lease (someone put something else there).
                _ => Holder::Free {
                    revision: entry.revision,
                },
            },
        })
    }

    /// Takes `shard` for `node` if it is still free at `revision`; returns
    /// the lease and its revision, or `None` if someone was quicker.
    ///
    /// # Errors
    ///
    /// If the bucket cannot be written for another reason.
    pub async fn acquire(
        &self,
        shard: u32,
        node: &str,
        revision: u64,
        journal_seq: u64,
    ) -> Result<Option<(Lease, u64)>, String> {
        let mut lease = Lease {
            owner: node.to_owned(),
            epoch: 0,
            journal_seq,
            since: crate::engine::unix_ms(),
        };
        // The epoch is the revision this write gets: the stream's next
        // sequence is not known before, so it is written once more.
        let value = serde_json::to_vec(&lease).expect("a lease serializes");
        match self.write(&shard_key(shard), value.into(), Some(revision)).await {
            Ok(got) => {
                lease.epoch = got;
                match self.renew(shard, &lease, got).await {
                    Ok(rev) => Ok(Some((lease, rev))),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) if crate::journal::stream::wrong_sequence(&e) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Writes `lease` again on `revision` (which the caller holds), for
    /// another TTL; returns the new revision.
    ///
    /// # Errors
    ///
    /// `WrongLastSequence` if the key changed since `revision` (taken,
    /// expired, or a renewal whose acknowledgement was lost); others if
    /// the bucket cannot be written now.
    pub async fn renew(&self, shard: u32, lease: &Lease, revision: u64) -> Result<u64, PublishError> {
        let value = serde_json::to_vec(lease).expect("a lease serializes");
        self.write(&shard_key(shard), value.into(), Some(revision)).await
    }

    /// Gives `shard` up: its lease says no owner and the journal sequence
    /// it was left at (and still expires by itself).
    ///
    /// # Errors
    ///
    /// If the lease was taken meanwhile or the bucket cannot be written.
    pub async fn release(
        &self,
        shard: u32,
        lease: &Lease,
        revision: u64,
        journal_seq: u64,
    ) -> Result<(), String> {
        let released = Lease {
            owner: String::new(),
            journal_seq,
            ..lease.clone()
        };
        let value = serde_json::to_vec(&released).expect("a lease serializes");
        self.write(&shard_key(shard), value.into(), Some(revision))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Writes this node's heartbeat.
    ///
    /// # Errors
    ///
    /// If the bucket cannot be written.
    pub async fn heartbeat(&self, node: &str, value: &serde_json::Value) -> Result<(), String> {
        self.write(&node_key(node), value.to_string().into(), None)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Removes this node's heartbeat (at shutdown).
    pub async fn leave(&self, node: &str) {
        let _ = self.kv.purge(node_key(node)).await;
    }

    /// The keys that start with `prefix`, without it (`node.`: the nodes
    /// whose heartbeat has not expired).
    ///
    /// # Errors
    ///
    /// If the bucket cannot be read.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, String> {
        let mut keys = self.kv.keys().await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| e.to_string())?;
            if let Some(rest) = key.strip_prefix(prefix) {
                out.push(rest.to_owned());
            }
        }
        Ok(out)
    }
}
