//! Every subject the sidecar uses, built in one place from the configured
//! prefix and output template.
//!
//! | subject | kind |
//! |---|---|
//! | `<prefix>.shard.<n>.<event_id>` | one event for shard `n` (what the server's `partition` mapping of `<prefix>.ingest.<event_id>` gives) |
//! | `<prefix>.ingest` | one event, any shard (queue group) |
//! | `<prefix>.batch` | newline-delimited events (queue group) |
//! | `<prefix>.internal.batch.<n>` | a sub-batch for shard `n`, forwarded by another sidecar |
//! | `<prefix>.lookup.<id>`, `<prefix>.forget.<id>` | an operator's look-up or forget of one id (every node) |
//! | `<prefix>.window`, `<prefix>.status` | an operator's window change or status request (every node) |
//! | `<prefix>.rules.test` | an operator's test of routing rules (one node, queue group `<prefix>.rules`) |
//! | output template, e.g. `events.unique.{shard}` | accepted events |
//!
//! Internal subjects live outside `<prefix>.shard.*.*` and
//! `<prefix>.ingest.*`, so no public subject, mapped or not, reaches them;
//! the shipped server permissions deny `<prefix>.internal.>` to producers.

use async_nats::Subject;

/// Builds the subjects of one configuration.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
    output: String,
}

/// The payload of a shutdown fence (see the `fence` module): never a JSON
/// event, and only ever sent without a reply subject.
pub const FENCE_PAYLOAD: &[u8] = b"eventsieve-fence";

impl Subjects {
    /// `output` may contain `{shard}`, replaced by the shard number.
    pub fn new(prefix: &str, output: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            output: output.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// What the owner of `shard` subscribes to for single events.
    pub fn shard_events(&self, shard: u32) -> String {
        format!("{}.shard.{shard}.*", self.prefix)
    }

    /// What a node owning every shard subscribes to for single events.
    pub fn all_shard_events(&self) -> String {
        format!("{}.shard.*.*", self.prefix)
    }

    /// What a node owning every shard subscribes to for sub-batches.
    pub fn all_sub_batches(&self) -> String {
        format!("{}.internal.batch.*", self.prefix)
    }

    /// Where one event of `shard` goes: the owner's subject.
    pub fn shard_event(&self, shard: u32, event_id: &str) -> Subject {
        Subject::from(format!("{}.shard.{shard}.{event_id}", self.prefix))
    }

    /// Fences of the `shard_events` subscription: matched by it, never an
    /// event id (ids are alphanumeric).
    pub fn shard_fence(&self, shard: u32) -> String {
        format!("{}.shard.{shard}._fence", self.prefix)
    }

    /// Single events when the server has no mapping; a queue group.
    pub fn ingest(&self) -> String {
        format!("{}.ingest", self.prefix)
    }

    /// Producers' batches; a queue group.
    pub fn batch(&self) -> String {
        format!("{}.batch", self.prefix)
    }

    /// Producers' batches for the owner of `shard`: `<prefix>.batch.<token>`
    /// mapped by the server (`<prefix>.batches.<partition>.<token>`).
    pub fn pinned_batches(&self, shard: u32) -> String {
        format!("{}.batches.{shard}.*", self.prefix)
    }

    /// [`Self::pinned_batches`] of every shard.
    pub fn all_pinned_batches(&self) -> String {
        format!("{}.batches.*.*", self.prefix)
    }

    /// Fences of the `pinned_batches` subscription (`_fence` is no token a
    /// mapping makes: tokens are producers' names).
    pub fn pinned_fence(&self, shard: u32) -> String {
        format!("{}.batches.{shard}._fence", self.prefix)
    }

    /// Sub-batches of `shard` forwarded between sidecars.
    pub fn sub_batch(&self, shard: u32) -> String {
        format!("{}.internal.batch.{shard}", self.prefix)
    }

    /// `<prefix>.lookup.>`: whether an id is remembered (every node
    /// receives it; the owner of the id's shard answers): `<id>`, or with
    /// a `shard_key` `<its value>.<id>`.
    pub fn lookup(&self) -> String {
        format!("{}.lookup.>", self.prefix)
    }

    /// `<prefix>.<verb>._fence`: where a node's fences of its look-up or
    /// forget subscription go at shutdown (`_fence` is no valid id).
    pub fn admin_fence(&self, verb: &str) -> String {
        format!("{}.{verb}._fence", self.prefix)
    }

    /// `<prefix>.forget.>`: forget an id (as [`Self::lookup`]).
    pub fn forget(&self) -> String {
        format!("{}.forget.>", self.prefix)
    }

    /// `<prefix>.window`: read, set or reset the window (every node
    /// receives it).
    pub fn window(&self) -> String {
        format!("{}.window", self.prefix)
    }

    /// `<prefix>.status`: each node's status (every node receives it).
    pub fn status(&self) -> String {
        format!("{}.status", self.prefix)
    }

    /// Where an operator asks where events would go (one sidecar answers).
    pub fn rules_test(&self) -> String {
        format!("{}.rules.test", self.prefix)
    }

    /// Whether a requester's reply subject is one of the sidecar's own: under
    /// the prefix, or an output subject. A reply sent there would be a
    /// request, or an event, forged under the sidecar's name.
    pub fn is_ours(&self, subject: &str) -> bool {
        // Per request: no allocation.
        let under_prefix = subject
            .strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
        if under_prefix {
            return true;
        }
        let mut tokens = subject.split('.');
        for t in self.output.split('.') {
            let Some(s) = tokens.next() else { return false };
            let same = match t.split_once("{shard}") {
                None => t == s,
                Some((before, after)) => {
                    s.len() >= before.len() + after.len() && s.starts_with(before) && s.ends_with(after)
                }
            };
            if !same {
                return false;
            }
        }
        tokens.next().is_none()
    }

    /// Where accepted events of `shard` are republished.
    pub fn output(&self, shard: u32) -> Subject {
        Subject::from(self.output.replace("{shard}", &shard.to_string()))
    }

    /// The output subjects of every shard, as a wildcard.
    pub fn all_outputs(&self) -> String {
        self.output.replace("{shard}", "*")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sidecars_own_subjects_are_recognised_as_reply_subjects() {
        let s = Subjects::new("dedup", "events.unique.{shard}");
        for ours in [
            "events.unique.3",
            "events.unique.x",
            "dedup.shard.1.a",
            "dedup.internal.batch.2",
            "dedup",
        ] {
            assert!(s.is_ours(ours), "{ours}");
        }
        for theirs in [
            "_INBOX.abc.1",
            "events.unique",
            "events.unique.3.4",
            "dedupx.a",
            "events.other.3",
        ] {
            assert!(!s.is_ours(theirs), "{theirs}");
        }
        let s = Subjects::new("a.b", "out-{shard}-x.y");
        assert!(s.is_ours("out-12-x.y") && s.is_ours("a.b.ingest"));
        assert!(!s.is_ours("out-12.y") && !s.is_ours("a.c"));
    }

    #[test]
    fn internal_subjects_are_outside_the_public_ones() {
        let s = Subjects::new("dedup", "events.unique.{shard}");
        assert_eq!(s.shard_events(3), "dedup.shard.3.*");
        assert_eq!(s.shard_event(3, "a1").as_str(), "dedup.shard.3.a1");
        assert_eq!(s.sub_batch(3), "dedup.internal.batch.3");
        assert_eq!(s.output(7).as_str(), "events.unique.7");
        let public = |subject: &str| {
            let t: Vec<&str> = subject.split('.').collect();
            matches!(
                t.as_slice(),
                ["dedup", "shard", _, _] | ["dedup", "ingest", _] | ["dedup", "ingest"] | ["dedup", "batch"]
            )
        };
        assert!(!public(&s.sub_batch(3)));
        assert!(
            public(&s.shard_fence(3)),
            "a fence is recognised by its payload, not its subject"
        );
    }
}
