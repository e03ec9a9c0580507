//! Metadata in SQLite (`<data>/kiln.db`, WAL): functions and their immutable versions.
//!
//! Version numbers are per function, start at 1 and are never reused, not even after the
//! function is deleted and created again, so a client pinned to `@3` can never reach a
//! different component. Every change is one transaction.

use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

mod traffic;

pub use traffic::TrafficChange;

use super::Digest;
use crate::cache::CacheSpec;
use crate::nn::NnSpec;
use crate::runtime::Limits;

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
}

/// The SQLite metadata store. Calls are short; a mutex serializes them.
#[derive(Debug)]
pub struct MetaStore {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS functions (
    name        TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    tenant      TEXT NOT NULL DEFAULT 'default',
    public      INTEGER NOT NULL DEFAULT 0
);
-- The traffic policy of each function that has one (JSON TrafficPolicy).
CREATE TABLE IF NOT EXISTS traffic (
    function    TEXT PRIMARY KEY REFERENCES functions(name) ON DELETE CASCADE,
    policy      TEXT NOT NULL,
    revision    INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
-- Named traffic policies (aliases, environments: staging, prod) of each function; a
-- removed alias keeps its row with the policy 'null', so its revisions go on.
CREATE TABLE IF NOT EXISTS aliases (
    function    TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
    alias       TEXT NOT NULL,
    policy      TEXT NOT NULL,
    revision    INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (function, alias)
);
-- Every traffic change, rollout step and rollback, by function; outlives the function.
CREATE TABLE IF NOT EXISTS history (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    function    TEXT NOT NULL,
    at_ms       INTEGER NOT NULL,
    actor       TEXT,
    kind        TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    detail      TEXT NOT NULL DEFAULT '{}',
    tenant      TEXT                         -- the function's owner then
);
CREATE INDEX IF NOT EXISTS history_function ON history (function, seq);
-- The latest progressive rollout of each function (JSON Rollout), active or ended.
CREATE TABLE IF NOT EXISTS rollouts (
    function    TEXT PRIMARY KEY,
    rollout     TEXT NOT NULL,
    active      INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
-- Which tenants uploaded each blob: a manifest may only name blobs its tenant holds.
CREATE TABLE IF NOT EXISTS blob_owners (
    digest      TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    PRIMARY KEY (digest, tenant)
) WITHOUT ROWID;
-- Outlives its function: numbers and the last signed deploy are never reused.
CREATE TABLE IF NOT EXISTS version_seq (
    function        TEXT PRIMARY KEY,
    last            INTEGER NOT NULL,
    last_signed_at  INTEGER
);
CREATE TABLE IF NOT EXISTS versions (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    function        TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
    version         INTEGER NOT NULL,
    digest          TEXT NOT NULL,
    size            INTEGER NOT NULL,
    timeout_ms      INTEGER NOT NULL,
    memory_mb       INTEGER NOT NULL,
    max_concurrency INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    nn              TEXT NOT NULL DEFAULT '{}',  -- JSON NnSpec: models by digest
    cache           TEXT NOT NULL DEFAULT '{}',  -- JSON CacheSpec
    rate            TEXT,                        -- function rate limit, N/s
    signer          TEXT,                        -- publisher key of a signed bundle
    outbound        TEXT NOT NULL DEFAULT '[]',  -- JSON allowed_outbound_hosts
    UNIQUE (function, version)
);
";

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl MetaStore {
    /// Opens (creating) the database at `path` in WAL mode.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let conn = super::open_sqlite(path, super::Sync::Normal, "database")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA).context("creating schema")?;
        // Databases made by earlier versions of Kiln get the newer columns.
        let columns = [
            ("versions", "nn", "TEXT NOT NULL DEFAULT '{}'"),
            ("versions", "cache", "TEXT NOT NULL DEFAULT '{}'"),
            ("versions", "rate", "TEXT"),
            ("versions", "signer", "TEXT"),
            ("versions", "outbound", "TEXT NOT NULL DEFAULT '[]'"),
            ("version_seq", "last_signed_at", "INTEGER"),
            ("functions", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
            ("functions", "public", "INTEGER NOT NULL DEFAULT 0"),
            ("history", "tenant", "TEXT"),
        ];
        for (table, column, decl) in columns {
            let present: bool = conn
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
                ))?
                .exists([column])?;
            if !present {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))
                    .with_context(|| format!("adding the {table}.{column} column"))?;
                if (table, column) == ("history", "tenant") {
                    // Entries made since the current owner created the function are its;
                    // older ones belonged to an earlier owner of the name: admins only.
                    conn.execute_batch(
                        "UPDATE history SET tenant = (SELECT f.tenant FROM functions f
                             WHERE f.name = history.function AND history.at_ms >= f.created_at * 1000)
                         WHERE tenant IS NULL",
                    )
                    .context("filling in history.tenant")?;
                }
            }
        }
        Ok(MetaStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new version, creating the function (owned by `new.tenant`) on its first
    /// version; returns it with the function as it now is.
    pub fn create_version(
        &self,
        new: &NewVersion,
    ) -> anyhow::Result<(VersionRecord, FunctionInfo)> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_secs();
        tx.execute(
            "INSERT OR IGNORE INTO functions (name, created_at, tenant, public) VALUES (?1, ?2, ?3, ?4)",
            params![new.function, now, new.tenant, new.public.unwrap_or(false)],
        )?;
        let owner: String = tx.query_row(
            "SELECT tenant FROM functions WHERE name = ?1",
            [&new.function],
            |r| r.get(0),
        )?;
        if new.enforce_owner && owner != new.tenant {
            return Err(NotOwner {
                function: new.function.clone(),
            }
            .into());
        }
        if let Some(public) = new.public {
            tx.execute(
                "UPDATE functions SET public = ?2 WHERE name = ?1",
                params![new.function, public],
            )?;
        }
        let seq: Option<(u32, Option<i64>)> = tx
            .query_row(
                "SELECT last, last_signed_at FROM version_seq WHERE function = ?1",
                [&new.function],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (last, last_signed_at) = seq.unwrap_or((0, None));
        if let (Some(signed_at), Some(last)) = (new.signed_at, last_signed_at)
            && signed_at <= last
        {
            return Err(Replayed {
                function: new.function.clone(),
                signed_at,
                last,
            }
            .into());
        }
        let version = last + 1;
        tx.execute(
            "INSERT INTO version_seq (function, last, last_signed_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(function) DO UPDATE SET last = excluded.last,
                 last_signed_at = coalesce(excluded.last_signed_at, last_signed_at)",
            params![new.function, version, new.signed_at],
        )?;
        tx.execute(
            "INSERT INTO versions (function, version, digest, size, timeout_ms, memory_mb,
                                   max_concurrency, created_at, nn, cache, rate, signer,
                                   outbound)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                new.function,
                version,
                new.digest.to_string(),
                new.size as i64,
                new.limits.timeout_ms as i64,
                new.limits.memory_mb as i64,
                new.limits.max_concurrency,
                now,
                serde_json::to_string(&new.nn)?,
                serde_json::to_string(&new.cache)?,
                new.limits.rate.map(|r| r.to_string()),
                new.signer,
                serde_json::to_string(&new.outbound)?
            ],
        )?;
        let id = tx.last_insert_rowid();
        let info = tx.query_row(
            "SELECT name, created_at, tenant, public FROM functions WHERE name = ?1",
            [&new.function],
            function_info,
        )?;
        tx.commit()?;
        let record = VersionRecord {
            id,
            function: new.function.clone(),
            version,
            digest: new.digest,
            size: new.size,
            limits: new.limits,
            nn: new.nn.clone(),
            cache: new.cache.clone(),
            signer: new.signer.clone(),
            outbound: new.outbound.clone(),
            created_at: now,
        };
        Ok((record, info))
    }

    /// Every version of every function, oldest first (used to rebuild state at start).
    pub fn all_versions(&self) -> anyhow::Result<Vec<VersionRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, function, version, digest, size, timeout_ms, memory_mb,
                    max_concurrency, created_at, nn, cache, rate, signer, outbound
             FROM versions ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            let digest: String = r.get(3)?;
            let nn: String = r.get(9)?;
            let cache: String = r.get(10)?;
            let rate: Option<String> = r.get(11)?;
            let outbound: String = r.get(13)?;
            Ok((
                (digest, nn, cache, rate, outbound),
                VersionRecord {
                    id: r.get(0)?,
                    function: r.get(1)?,
                    version: r.get(2)?,
                    digest: Digest([0; 32]),
                    size: r.get::<_, i64>(4)? as u64,
                    limits: Limits {
                        timeout_ms: r.get::<_, i64>(5)? as u64,
                        memory_mb: r.get::<_, i64>(6)? as u64,
                        max_concurrency: r.get(7)?,
                        rate: None,
                    },
                    nn: NnSpec::default(),
                    cache: CacheSpec::default(),
                    signer: r.get(12)?,
                    outbound: Vec::new(),
                    created_at: r.get(8)?,
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let ((digest, nn, cache, rate, outbound), mut rec) = row?;
            rec.outbound = serde_json::from_str(&outbound)
                .with_context(|| format!("corrupt outbound column in versions row {}", rec.id))?;
            rec.limits.rate = rate
                .map(|r| r.parse())
                .transpose()
                .map_err(|e: String| anyhow::anyhow!("versions row {}: {e}", rec.id))?;
            rec.digest = digest
                .parse()
                .with_context(|| format!("corrupt digest in versions row {}", rec.id))?;
            rec.nn = serde_json::from_str(&nn)
                .with_context(|| format!("corrupt nn column in versions row {}", rec.id))?;
            rec.cache = serde_json::from_str(&cache)
                .with_context(|| format!("corrupt cache column in versions row {}", rec.id))?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Every function: owner, visibility, creation time.
    pub fn functions(&self) -> anyhow::Result<Vec<FunctionInfo>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, created_at, tenant, public FROM functions")?;
        let rows = stmt.query_map([], function_info)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that `tenant` holds blob `digest` (it uploaded the bytes).
    pub fn add_blob_owner(&self, digest: &Digest, tenant: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "INSERT OR IGNORE INTO blob_owners (digest, tenant) VALUES (?1, ?2)",
            params![digest.to_string(), tenant],
        )?;
        Ok(())
    }

    /// Whether `tenant` uploaded blob `digest`.
    pub fn owns_blob(&self, digest: &Digest, tenant: &str) -> anyhow::Result<bool> {
        Ok(self
            .conn()
            .prepare_cached("SELECT 1 FROM blob_owners WHERE digest = ?1 AND tenant = ?2")?
            .exists(params![digest.to_string(), tenant])?)
    }

    /// Deletes a function and all its versions; false when it did not exist.
    pub fn delete_function(&self, name: &str) -> anyhow::Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM traffic WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM rollouts WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM aliases WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM versions WHERE function = ?1", [name])?;
        let n = tx.execute("DELETE FROM functions WHERE name = ?1", [name])?;
        tx.commit()?;
        Ok(n > 0)
    }
}

fn function_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<FunctionInfo> {
    Ok(FunctionInfo {
        name: r.get(0)?,
        created_at: r.get(1)?,
        tenant: r.get(2)?,
        public: r.get(3)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(name: &str) -> (MetaStore, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("kiln-meta-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        (MetaStore::open(&dir.join("kiln.db")).expect("open"), dir)
    }

    fn new(function: &str) -> NewVersion {
        NewVersion {
            function: function.into(),
            digest: Digest::of(b"x"),
            size: 1,
            limits: Limits::default(),
            nn: NnSpec::default(),
            cache: CacheSpec::default(),
            signer: None,
            signed_at: None,
            outbound: Vec::new(),
            tenant: "t".into(),
            enforce_owner: true,
            public: None,
        }
    }

    #[test]
    fn versions_count_up_and_are_never_reused() {
        let (meta, dir) = store("seq");
        let version = |n: NewVersion| meta.create_version(&n).expect("create").0.version;
        assert_eq!(version(new("a")), 1);
        assert_eq!(version(new("a")), 2);
        assert_eq!(version(new("b")), 1);
        assert!(meta.delete_function("a").expect("delete"));
        assert!(!meta.delete_function("a").expect("delete again"));
        assert_eq!(version(new("a")), 3);
        // Another tenant cannot add versions to it; an admin (no enforcement) can, and
        // the owner stays.
        let mut other = new("a");
        other.tenant = "u".into();
        let err = meta.create_version(&other).expect_err("not the owner");
        assert!(err.downcast_ref::<NotOwner>().is_some(), "{err:#}");
        other.enforce_owner = false;
        other.public = Some(true);
        let (_, info) = meta.create_version(&other).expect("admin");
        assert_eq!((info.tenant.as_str(), info.public), ("t", true));
        let all = meta.all_versions().expect("all");
        assert_eq!(all.len(), 3);
        // Models round-trip through the nn column.
        let mut with_model = new("m");
        with_model.nn.models.push(crate::nn::ModelRef {
            name: "digits".into(),
            digest: Digest::of(b"model"),
            size: 5,
            encoding: crate::nn::Encoding::Onnx,
            target: crate::nn::Target::Auto,
            backend: Some(crate::nn::BackendKind::Tract),
        });
        with_model.nn.guest_load_max_bytes = Some(1024);
        meta.create_version(&with_model).expect("m1");
        let all = meta.all_versions().expect("all");
        let m = all.iter().find(|r| r.function == "m").expect("m");
        assert_eq!(m.nn, with_model.nn);
        let _ = std::fs::remove_dir_all(dir);
    }
}
