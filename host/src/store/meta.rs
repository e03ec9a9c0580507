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
    /// Unix seconds.
    pub created_at: i64,
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
}

/// The SQLite metadata store. Calls are short; a mutex serializes them.
#[derive(Debug)]
pub struct MetaStore {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS functions (
    name        TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS version_seq (
    function    TEXT PRIMARY KEY,
    last        INTEGER NOT NULL
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
        let conn = Connection::open(path)
            .with_context(|| format!("opening database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA).context("creating schema")?;
        // Databases created before models (or caching) existed get the column.
        for column in ["nn", "cache"] {
            let present: bool = conn
                .prepare("SELECT 1 FROM pragma_table_info('versions') WHERE name = ?1")?
                .exists([column])?;
            if !present {
                conn.execute_batch(&format!(
                    "ALTER TABLE versions ADD COLUMN {column} TEXT NOT NULL DEFAULT '{{}}'"
                ))
                .with_context(|| format!("adding the {column} column"))?;
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

    /// Records a new version, creating the function on its first version.
    pub fn create_version(&self, new: &NewVersion) -> anyhow::Result<VersionRecord> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_secs();
        tx.execute(
            "INSERT OR IGNORE INTO functions (name, created_at) VALUES (?1, ?2)",
            params![new.function, now],
        )?;
        let last: Option<u32> = tx
            .query_row(
                "SELECT last FROM version_seq WHERE function = ?1",
                [&new.function],
                |r| r.get(0),
            )
            .optional()?;
        let version = last.unwrap_or(0) + 1;
        tx.execute(
            "INSERT INTO version_seq (function, last) VALUES (?1, ?2)
             ON CONFLICT(function) DO UPDATE SET last = excluded.last",
            params![new.function, version],
        )?;
        tx.execute(
            "INSERT INTO versions (function, version, digest, size, timeout_ms, memory_mb,
                                   max_concurrency, created_at, nn, cache)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
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
                serde_json::to_string(&new.cache)?
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(VersionRecord {
            id,
            function: new.function.clone(),
            version,
            digest: new.digest,
            size: new.size,
            limits: new.limits,
            nn: new.nn.clone(),
            cache: new.cache.clone(),
            created_at: now,
        })
    }

    /// Every version of every function, oldest first (used to rebuild state at start).
    pub fn all_versions(&self) -> anyhow::Result<Vec<VersionRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, function, version, digest, size, timeout_ms, memory_mb,
                    max_concurrency, created_at, nn, cache
             FROM versions ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            let digest: String = r.get(3)?;
            let nn: String = r.get(9)?;
            let cache: String = r.get(10)?;
            Ok((
                (digest, nn, cache),
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
                    },
                    nn: NnSpec::default(),
                    cache: CacheSpec::default(),
                    created_at: r.get(8)?,
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let ((digest, nn, cache), mut rec) = row?;
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

    /// Creation time of each function, by name.
    pub fn function_created_at(&self) -> anyhow::Result<Vec<(String, i64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, created_at FROM functions")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes a function and all its versions; false when it did not exist.
    pub fn delete_function(&self, name: &str) -> anyhow::Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM versions WHERE function = ?1", [name])?;
        let n = tx.execute("DELETE FROM functions WHERE name = ?1", [name])?;
        tx.commit()?;
        Ok(n > 0)
    }
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
        }
    }

    #[test]
    fn versions_count_up_and_are_never_reused() {
        let (meta, dir) = store("seq");
        assert_eq!(meta.create_version(&new("a")).expect("v1").version, 1);
        assert_eq!(meta.create_version(&new("a")).expect("v2").version, 2);
        assert_eq!(meta.create_version(&new("b")).expect("b1").version, 1);
        assert!(meta.delete_function("a").expect("delete"));
        assert!(!meta.delete_function("a").expect("delete again"));
        assert_eq!(meta.create_version(&new("a")).expect("v3").version, 3);
        let all = meta.all_versions().expect("all");
        assert_eq!(all.len(), 2);
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
