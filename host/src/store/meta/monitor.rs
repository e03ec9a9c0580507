//! What model monitors share through the store: every process publishes the time buckets
//! its monitors changed (counts per bin and class, never a payload), so a drift answer or
//! a rollout's drift gate on any node adds up every node's traffic, and a restarted node
//! still has the hours before it; the references that windows made
//! (`POST .../reference`), which every node scores against; and the bins of monitors
//! deployed without a reference file, set from the first node's first rows and adopted
//! by every node.

use super::MetaStore;

/// Buckets older than this are forgotten (the longest window reads 48 hours).
pub const KEEP_BUCKETS_MS: i64 = 49 * 3_600_000;

/// Which model of which version a row is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelKey<'a> {
    pub function: &'a str,
    pub version: u32,
    pub model: &'a str,
}

/// One time bucket of one monitored model, as one process published it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBucket {
    pub model: String,
    /// The bucket's length: 60 000 (minutes) or 3 600 000 (hours).
    pub span_ms: i64,
    /// Its start divided by `span_ms`.
    pub at: i64,
    /// The counts, JSON.
    pub counts: String,
}

/// A reference a window made: the counts the version saw then (JSON), what window, when
/// and by whom.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReference {
    pub counts: String,
    pub window_ms: i64,
    pub set_ms: i64,
    pub set_by: String,
}

impl MetaStore {
    /// Stores `process`'s latest counts of `buckets` of `function`'s version `version`.
    pub async fn publish_monitor_buckets(
        &self,
        function: &str,
        version: u32,
        process: &str,
        buckets: &[StoredBucket],
    ) -> anyhow::Result<()> {
        on_backend!(self.publish_monitor_buckets(function, version, process, buckets))
    }

    /// The counts every process but `except` published for `key`'s buckets of `span_ms`
    /// from `from` on.
    pub async fn monitor_buckets(
        &self,
        key: ModelKey<'_>,
        span_ms: i64,
        from: i64,
        except: &str,
    ) -> anyhow::Result<Vec<String>> {
        on_backend!(self.monitor_buckets(key, span_ms, from, except))
    }

    /// Forgets buckets last written before `before_ms`; returns how many.
    pub async fn forget_monitor_buckets(&self, before_ms: i64) -> anyhow::Result<u64> {
        on_backend!(self.forget_monitor_buckets(before_ms))
    }

    /// Makes `reference` the reference of `key` (in place of any earlier one).
    pub async fn set_monitor_reference(
        &self,
        key: ModelKey<'_>,
        reference: &StoredReference,
    ) -> anyhow::Result<()> {
        on_backend!(self.set_monitor_reference(key, reference))
    }

    /// Stores `profile` (JSON) as `key`'s bins unless some node stored one first; returns
    /// the stored one, which every node then uses.
    pub async fn agree_monitor_profile(
        &self,
        key: ModelKey<'_>,
        profile: &str,
    ) -> anyhow::Result<String> {
        on_backend!(self.agree_monitor_profile(key, profile))
    }

    /// The bins stored for `key` (a monitor without a reference file), if any.
    pub async fn monitor_profile(&self, key: ModelKey<'_>) -> anyhow::Result<Option<String>> {
        on_backend!(self.monitor_profile(key))
    }

    /// The bins stored for model `key.model` of the newest version of `key.function` before
    /// `key.version`, if any: a new version without a reference file starts from them, so
    /// its counts line up with the version it replaces (and a rollout can compare them).
    pub async fn earlier_monitor_profile(
        &self,
        key: ModelKey<'_>,
    ) -> anyhow::Result<Option<String>> {
        on_backend!(self.earlier_monitor_profile(key))
    }

    /// The reference a window made for `key`, if any.
    pub async fn monitor_reference(
        &self,
        key: ModelKey<'_>,
    ) -> anyhow::Result<Option<StoredReference>> {
        on_backend!(self.monitor_reference(key))
    }
}
