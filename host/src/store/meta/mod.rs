//! Metadata: functions and their immutable versions, traffic policies (main and aliases),
//! their history, rollouts, which tenants hold which blobs, and the first answers to
//! idempotent requests.
//!
//! One [`MetaStore`], two backends chosen at startup: SQLite (`<data>/kiln.db`, WAL; the
//! default, for one node) and PostgreSQL (for a cluster's nodes). Callers see one async
//! interface and the same rules from both:
//! - version numbers are per function, start at 1 and are never reused, not even after the
//!   function is deleted and created again, so a client pinned to `@3` can never reach a
//!   different component;
//! - every change is one transaction: a traffic change, its history entry and the rollout
//!   it belongs to commit together, or not at all.

/// Calls the same method on whichever backend, awaiting PostgreSQL's answer.
macro_rules! on_backend {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            MetaStore::Sqlite(s) => s.$method($($arg),*),
            MetaStore::Postgres(p) => p.$method($($arg),*).await,
        }
    };
}

mod cluster;
mod idempotency;
mod monitor;
mod postgres;
mod postgres_cluster;
mod postgres_monitor;
mod rollouts;
mod sqlite;
mod sqlite_cluster;
mod sqlite_monitor;
mod sqlite_traffic;
mod variables;

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

pub use cluster::{NodeReport, PublishedStats};
pub use idempotency::{Claim, StoredAnswer};
pub use monitor::{KEEP_BUCKETS_MS, ModelKey, StoredBucket, StoredReference};
pub use postgres::PgMeta;
pub use rollouts::{Expect, RolloutMoved};
pub use sqlite::SqliteMeta;
pub use variables::VariablesChange;

use crate::cache::CacheSpec;
use crate::common::{Digest, Limits};
use crate::deploy::Rollout;
use crate::nn::NnSpec;

/// One immutable version of a function.
#[derive(Debug, Clone, Serialize)]
pub struct VersionRecord {
    /// Globally unique id (never reused): keys the loaded-version cache.
    #[serde(skip)]
    pub id: i64,
    pub function: String,
    pub version: u32,
    /// Digest of the component.
    pub digest: Digest,
    /// Component size in bytes.
    pub size: u64,
    pub limits: Limits,
    /// Models and `wasi:nn` settings.
    pub nn: NnSpec,
    /// Caching of responses and inference results.
    pub cache: CacheSpec,
    /// The publisher key that signed the bundle (`ed25519:<hex>`), if it was signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// Where its guests may send HTTP requests (`allowed_outbound_hosts`, validated).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Its `[validate]` settings and what the cases got at deploy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation: Option<crate::monitor::validate::Validation>,
    /// The variables its guests may read (`[variables]`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub variables: crate::deploy::variables::Declared,
}

/// Who owns a function and who may call it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionInfo {
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The tenant that created it; only its keys (and admins) may touch it.
    pub tenant: String,
    /// Callable without a key.
    pub public: bool,
}

/// A signed manifest no newer than the function's last signed deploy: a replay.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "this signed manifest (signed_at {signed_at}) is not newer than the last signed deploy of {function:?} (signed_at {last}): sign it again"
)]
pub struct Replayed {
    pub function: String,
    pub signed_at: i64,
    pub last: i64,
}

/// A deploy onto a function that another tenant owns.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("function {function:?} belongs to another tenant")]
pub struct NotOwner {
    pub function: String,
}

/// What the API hands over to record a new version.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub function: String,
    pub digest: Digest,
    pub size: u64,
    pub limits: Limits,
    pub nn: NnSpec,
    pub cache: CacheSpec,
    pub signer: Option<String>,
    /// When the manifest was signed (unix ms); must exceed the function's last one.
    pub signed_at: Option<i64>,
    pub outbound: Vec<String>,
    /// The deploying tenant: owner of the function if this creates it.
    pub tenant: String,
    /// Refuse (with [`NotOwner`]) when the function belongs to another tenant; off for admins.
    pub enforce_owner: bool,
    /// Sets whether the function is public; `None` keeps what it was (private when new).
    pub public: Option<bool>,
    /// The validation it passed at deploy.
    pub validation: Option<crate::monitor::validate::Validation>,
    /// The variables its guests may read.
    pub variables: crate::deploy::variables::Declared,
}

impl NewVersion {
    /// The record of this version once stored as version `version` with row id `id`.
    fn record(&self, id: i64, version: u32, created_at: i64) -> VersionRecord {
        VersionRecord {
            id,
            function: self.function.clone(),
            version,
            digest: self.digest,
            size: self.size,
            limits: self.limits,
            nn: self.nn.clone(),
            cache: self.cache.clone(),
            signer: self.signer.clone(),
            outbound: self.outbound.clone(),
            created_at,
            validation: self.validation.clone(),
            variables: self.variables.clone(),
        }
    }
}

/// One traffic change, as [`MetaStore::set_traffic`] stores it.
#[derive(Debug, Clone, Copy)]
pub struct TrafficChange<'a> {
    /// The new policy (JSON `TrafficPolicy`, or `null`: none).
    pub policy: &'a str,
    /// The API key that made it (for a rollout step: the one that started the rollout).
    pub actor: Option<&'a str>,
    /// `traffic`, `rollback`, `rollout.step`, `rollout.rollback`, `rollout.abort`...
    pub kind: &'a str,
    pub reason: &'a str,
    /// The function's rollout after this change, stored with it.
    pub rollout: Option<&'a Rollout>,
    /// The gate numbers behind it, kept in the history entry as `check`.
    pub extra: Option<&'a serde_json::Value>,
    /// What it expects of the function's stored rollout ([`RolloutMoved`] otherwise).
    pub expect: Expect,
    /// The policy's revision the change was decided on (`If-Match`); any other refuses it
    /// with [`StaleRevision`].
    pub if_revision: Option<u64>,
}

/// A change refused because the policy moved past the revision it was decided on.
#[derive(Debug, thiserror::Error)]
#[error("the policy is at revision {current}, not {expected}: read it again and decide on that")]
pub struct StaleRevision {
    pub expected: u64,
    pub current: u64,
}

impl StaleRevision {
    /// Refuses a change decided on `expected` of the stored `(policy, revision)`. No
    /// policy in force (none stored, or rolled back to none) is revision 0, as the
    /// registry reports it.
    pub(super) fn check(
        expected: Option<u64>,
        stored: Option<&(String, i64)>,
    ) -> anyhow::Result<()> {
        let current = match stored {
            Some((policy, revision)) if policy != "null" => *revision,
            _ => 0,
        };
        match expected {
            Some(expected) if expected != current as u64 => Err(StaleRevision {
                expected,
                current: current as u64,
            }
            .into()),
            _ => Ok(()),
        }
    }
}

/// What a traffic change stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The policy's new revision.
    pub revision: u64,
    /// The rollout's new epoch, when the change stored one.
    pub epoch: Option<u64>,
}

/// What a node's registry is built from, read as of one instant.
pub struct StoredState {
    pub functions: Vec<FunctionInfo>,
    pub versions: Vec<VersionRecord>,
    /// (function, policy JSON, revision).
    pub traffic: Vec<(String, String, u64)>,
    /// (function, alias, policy JSON or `null`, revision).
    pub aliases: Vec<(String, String, String, u64)>,
    /// The rollouts running or paused.
    pub rollouts: Vec<Rollout>,
    /// Every function's variable values.
    pub variables: Vec<crate::deploy::variables::StoredValue>,
}

/// The metadata store, on whichever backend the server was started with.
pub enum MetaStore {
    Sqlite(SqliteMeta),
    Postgres(PgMeta),
}

impl MetaStore {
    /// Whether the database answers (`/readyz`).
    pub async fn ping(&self) -> anyhow::Result<()> {
        on_backend!(self.ping())
    }

    /// Which backend, for logs and `/readyz`.
    pub fn describe(&self) -> &'static str {
        match self {
            MetaStore::Sqlite(_) => "sqlite",
            MetaStore::Postgres(_) => "postgres",
        }
    }

    /// Records a new version, creating the function (owned by `new.tenant`) on its first
    /// version; returns it with the function as it now is. Fails with [`NotOwner`] or
    /// [`Replayed`] (inside the `anyhow::Error`) when the deploy is not allowed.
    pub async fn create_version(
        &self,
        new: &NewVersion,
    ) -> anyhow::Result<(VersionRecord, FunctionInfo)> {
        on_backend!(self.create_version(new))
    }

    /// Records that `tenant` holds blob `digest` (it uploaded the bytes).
    pub async fn add_blob_owner(&self, digest: &Digest, tenant: &str) -> anyhow::Result<()> {
        on_backend!(self.add_blob_owner(digest, tenant))
    }

    /// Whether `tenant` uploaded blob `digest`.
    pub async fn owns_blob(&self, digest: &Digest, tenant: &str) -> anyhow::Result<bool> {
        on_backend!(self.owns_blob(digest, tenant))
    }

    /// Deletes a function and all its versions; false when it did not exist.
    pub async fn delete_function(&self, name: &str) -> anyhow::Result<bool> {
        on_backend!(self.delete_function(name))
    }

    /// Applies one traffic change of `function` (its main policy, or `alias`'s) in one
    /// transaction: the new policy (and revision), its history entry, and the function's
    /// rollout as it now is. Fails with [`RolloutMoved`] (inside the `anyhow::Error`) when
    /// the stored rollout is not what `change.expect` says.
    pub async fn set_traffic(
        &self,
        function: &str,
        alias: Option<&str>,
        change: &TrafficChange<'_>,
    ) -> anyhow::Result<Stored> {
        on_backend!(self.set_traffic(function, alias, change))
    }

    /// Records a history entry that changes no policy (a rollout paused or resumed) and
    /// the function's rollout as it now is, in one transaction, if the stored rollout is
    /// still at epoch `expect` ([`RolloutMoved`] otherwise). Returns the new epoch.
    pub async fn record_rollout(
        &self,
        function: &str,
        actor: Option<&str>,
        kind: &str,
        reason: &str,
        rollout: &Rollout,
        expect: u64,
    ) -> anyhow::Result<u64> {
        on_backend!(self.record_rollout(function, actor, kind, reason, rollout, expect))
    }

    /// Every rollout still running or paused.
    pub async fn active_rollouts(&self) -> anyhow::Result<Vec<Rollout>> {
        on_backend!(self.active_rollouts())
    }

    /// `function`'s latest rollout, active or ended.
    pub async fn rollout(&self, function: &str) -> anyhow::Result<Option<Rollout>> {
        on_backend!(self.rollout(function))
    }

    /// The policy (main, or `alias`'s) in force before the current one (JSON, `null` for
    /// none), from the history entry that made the current revision, with that entry's
    /// kind; `None` when it never changed.
    pub async fn previous_traffic(
        &self,
        function: &str,
        alias: Option<&str>,
    ) -> anyhow::Result<Option<(String, String)>> {
        on_backend!(self.previous_traffic(function, alias))
    }

    /// The change counter other nodes bump with every committed change (PostgreSQL);
    /// `None` on SQLite, which one node alone writes.
    pub async fn changes(&self) -> anyhow::Result<Option<i64>> {
        match self {
            MetaStore::Sqlite(_) => Ok(None),
            MetaStore::Postgres(p) => p.changes().await.map(Some),
        }
    }

    /// Functions, versions, policies and aliases as of one instant.
    pub async fn state(&self) -> anyhow::Result<StoredState> {
        match self {
            // One connection, and the caller holds the publishing lock: nothing writes
            // in between.
            MetaStore::Sqlite(s) => Ok(StoredState {
                functions: s.functions()?,
                versions: s.all_versions()?,
                traffic: s.traffic()?,
                aliases: s.aliases()?,
                rollouts: s.active_rollouts()?,
                variables: s.variables(None)?,
            }),
            MetaStore::Postgres(p) => p.state().await,
        }
    }

    /// `function`'s history, newest first, at most `limit` entries; with `tenant`, only
    /// the entries made while that tenant owned the function (a name can change hands
    /// after a delete).
    pub async fn history(
        &self,
        function: &str,
        limit: u32,
        before: Option<i64>,
        tenant: Option<&str>,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        on_backend!(self.history(function, limit, before, tenant))
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A `versions` row as either backend reads it, before its text columns are parsed.
struct RawVersion {
    id: i64,
    function: String,
    version: i64,
    digest: String,
    size: i64,
    timeout_ms: i64,
    memory_mb: i64,
    max_concurrency: i64,
    created_at: i64,
    nn: String,
    cache: String,
    rate: Option<String>,
    signer: Option<String>,
    outbound: String,
    validation: Option<String>,
    variables: String,
}

impl RawVersion {
    fn decode(self) -> anyhow::Result<VersionRecord> {
        let id = self.id;
        let corrupt = |column: &str| format!("corrupt {column} column in versions row {id}");
        Ok(VersionRecord {
            id,
            function: self.function,
            version: u32::try_from(self.version).with_context(|| corrupt("version"))?,
            digest: self.digest.parse().with_context(|| corrupt("digest"))?,
            size: self.size as u64,
            limits: Limits {
                timeout_ms: self.timeout_ms as u64,
                memory_mb: self.memory_mb as u64,
                max_concurrency: u32::try_from(self.max_concurrency)
                    .with_context(|| corrupt("max_concurrency"))?,
                rate: self
                    .rate
                    .map(|r| r.parse())
                    .transpose()
                    .map_err(|e: String| anyhow::anyhow!("versions row {id}: {e}"))?,
            },
            nn: serde_json::from_str(&self.nn).with_context(|| corrupt("nn"))?,
            cache: serde_json::from_str(&self.cache).with_context(|| corrupt("cache"))?,
            signer: self.signer,
            outbound: serde_json::from_str(&self.outbound).with_context(|| corrupt("outbound"))?,
            created_at: self.created_at,
            validation: self
                .validation
                .map(|v| serde_json::from_str(&v))
                .transpose()
                .with_context(|| corrupt("validation"))?,
            variables: serde_json::from_str(&self.variables)
                .with_context(|| corrupt("variables"))?,
        })
    }
}

/// The text columns of a new version, as both backends store them.
struct VersionFields {
    digest: String,
    nn: String,
    cache: String,
    rate: Option<String>,
    outbound: String,
    validation: Option<String>,
    variables: String,
}

impl VersionFields {
    fn of(new: &NewVersion) -> anyhow::Result<Self> {
        Ok(VersionFields {
            digest: new.digest.to_string(),
            nn: serde_json::to_string(&new.nn)?,
            cache: serde_json::to_string(&new.cache)?,
            rate: new.limits.rate.map(|r| r.to_string()),
            outbound: serde_json::to_string(&new.outbound)?,
            validation: new
                .validation
                .as_ref()
                .map(serde_json::to_string)
                .transpose()?,
            variables: serde_json::to_string(&new.variables)?,
        })
    }
}

/// The `detail` of a traffic change's history entry: the revision it made, the policy, the
/// one before it (what a rollback returns to), the gate numbers and the alias.
fn change_detail(
    change: &TrafficChange<'_>,
    alias: Option<&str>,
    revision: i64,
    previous: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    let mut detail = serde_json::json!({
        "revision": revision,
        "policy": serde_json::from_str::<serde_json::Value>(change.policy)?,
        "previous": previous
            .map(|p| serde_json::from_str::<serde_json::Value>(&p))
            .transpose()?,
    });
    if let Some(extra) = change.extra {
        detail["check"] = extra.clone();
    }
    if let Some(a) = alias {
        detail["alias"] = a.into();
    }
    Ok(detail)
}

/// The `detail` of a rollout event that changes no policy (paused, resumed).
fn rollout_detail(rollout: &Rollout) -> serde_json::Value {
    serde_json::json!({"rollout": {
        "candidate": rollout.candidate,
        "stable": rollout.stable,
        "step": rollout.step + 1,
        "percent": rollout.percent(),
    }})
}

/// (kind, the `previous` policy) of the history entry behind the current revision.
fn previous_of(kind: String, detail: &str) -> anyhow::Result<(String, String)> {
    let detail: serde_json::Value = serde_json::from_str(detail)?;
    Ok((kind, detail["previous"].to_string()))
}

/// One history entry as the API shows it.
fn history_entry(
    seq: i64,
    at_ms: i64,
    actor: Option<String>,
    kind: String,
    reason: String,
    detail: &str,
) -> serde_json::Value {
    serde_json::json!({
        "seq": seq,
        "at_ms": at_ms,
        "at": crate::common::time::format_time(at_ms),
        "actor": actor,
        "kind": kind,
        "reason": reason,
        "detail": serde_json::from_str::<serde_json::Value>(detail)
            .unwrap_or(serde_json::Value::Null),
    })
}

#[cfg(test)]
mod tests;
