//! The metadata in SQLite (`<data>/kiln.db`, WAL): one connection behind a mutex (calls
//! are short), and the columns earlier Kilns lacked added on open.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};

use super::{FunctionInfo, NewVersion, NotOwner, RawVersion, Replayed, VersionRecord};
use crate::common::Digest;
use crate::store::{Sync, open_sqlite};

/// The SQLite metadata store. Calls are short; a mutex serializes them.
#[derive(Debug)]
pub struct SqliteMeta {
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
    updated_at  INTEGER NOT NULL,
    epoch       INTEGER NOT NULL DEFAULT 0,  -- moved by every write of the rollout
    driver      TEXT,                        -- the node holding its lease
    lease_until INTEGER NOT NULL DEFAULT 0   -- unix ms
);
-- What this node reports of itself (GET /v1/cluster), as a cluster's nodes do.
CREATE TABLE IF NOT EXISTS nodes (
    id           TEXT PRIMARY KEY,
    address      TEXT NOT NULL,
    version      TEXT NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    loaded       TEXT NOT NULL DEFAULT '[]',
    in_flight    INTEGER NOT NULL DEFAULT 0
);
-- One process's numbers of one version over its rollout's current step (JSON aggregate).
CREATE TABLE IF NOT EXISTS rollout_stats (
    function     TEXT NOT NULL,
    process      TEXT NOT NULL,
    version      INTEGER NOT NULL,
    step_started INTEGER NOT NULL,
    stats        TEXT NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (function, process, version)
);
-- Model monitors' buckets as each process published them, and references windows made
-- (store/meta/monitor.rs).
CREATE TABLE IF NOT EXISTS monitor_buckets (
    function    TEXT NOT NULL,
    version     INTEGER NOT NULL,
    model       TEXT NOT NULL,
    span_ms     INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    process     TEXT NOT NULL,
    counts      TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (function, version, model, span_ms, at, process)
);
CREATE INDEX IF NOT EXISTS monitor_buckets_updated ON monitor_buckets (updated_at);
CREATE TABLE IF NOT EXISTS monitor_references (
    function    TEXT NOT NULL,
    version     INTEGER NOT NULL,
    model       TEXT NOT NULL,
    counts      TEXT NOT NULL,
    window_ms   INTEGER NOT NULL,
    set_ms      INTEGER NOT NULL,
    set_by      TEXT NOT NULL,
    PRIMARY KEY (function, version, model)
);
CREATE TABLE IF NOT EXISTS monitor_profiles (
    function    TEXT NOT NULL,
    version     INTEGER NOT NULL,
    model       TEXT NOT NULL,
    profile     TEXT NOT NULL,
    made_ms     INTEGER NOT NULL,
    PRIMARY KEY (function, version, model)
);
-- Variable values of functions (store/meta/variables.rs): scope '' for every request, else
-- the alias whose requests they are for; a secret's value sealed.
CREATE TABLE IF NOT EXISTS variables (
    function    TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    value       BLOB NOT NULL,
    secret      INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    updated_by  TEXT,
    PRIMARY KEY (function, scope, key)
);
-- Which tenants uploaded each blob: a manifest may only name blobs its tenant holds.
CREATE TABLE IF NOT EXISTS blob_owners (
    digest      TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    PRIMARY KEY (digest, tenant)
) WITHOUT ROWID;
-- Secrets shared by everything on this database (`sticky`: the sticky-hash salt).
CREATE TABLE IF NOT EXISTS secrets (
    name        TEXT PRIMARY KEY,
    value       BLOB NOT NULL
);
-- The first answer to each Idempotency-Key (store/meta/idempotency.rs), sealed; NULL
-- status while that request runs, whose random token alone may finish or drop the claim.
CREATE TABLE IF NOT EXISTS idempotency (
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    status      INTEGER,
    location    TEXT,
    body        BLOB,
    token       TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_ms);
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
    validation      TEXT,                        -- JSON Validation: [validate] and its result
    variables       TEXT NOT NULL DEFAULT '{}',  -- JSON [variables]: keys, defaults, secret
    UNIQUE (function, version)
);
";

impl SqliteMeta {
    /// Opens (creating) the database at `path` in WAL mode.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let conn = open_sqlite(path, Sync::Normal, "database")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA).context("creating schema")?;
        // Databases made by earlier versions of Kiln get the newer columns.
        let columns = [
            ("versions", "nn", "TEXT NOT NULL DEFAULT '{}'"),
            ("versions", "cache", "TEXT NOT NULL DEFAULT '{}'"),
            ("versions", "rate", "TEXT"),
            ("versions", "signer", "TEXT"),
            ("versions", "outbound", "TEXT NOT NULL DEFAULT '[]'"),
            ("versions", "validation", "TEXT"),
            ("versions", "variables", "TEXT NOT NULL DEFAULT '{}'"),
            ("version_seq", "last_signed_at", "INTEGER"),
            ("functions", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
            ("functions", "public", "INTEGER NOT NULL DEFAULT 0"),
            ("history", "tenant", "TEXT"),
            ("rollouts", "epoch", "INTEGER NOT NULL DEFAULT 0"),
            ("rollouts", "driver", "TEXT"),
            ("rollouts", "lease_until", "INTEGER NOT NULL DEFAULT 0"),
            ("idempotency", "token", "TEXT NOT NULL DEFAULT ''"),
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
                if (table, column) == ("idempotency", "token") {
                    // Answers kept by earlier Kiln are in clear and have no token: drop
                    // them (they only shorten a retry window), as PostgreSQL's
                    // migration 5 does.
                    conn.execute_batch("DELETE FROM idempotency")
                        .context("dropping unsealed idempotency answers")?;
                }
            }
        }
        Ok(SqliteMeta {
            conn: Mutex::new(conn),
        })
    }

    pub(super) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn ping(&self) -> anyhow::Result<()> {
        self.conn()
            .query_row("SELECT 1", [], |_| Ok(()))
            .context("querying the database")
    }

    pub fn create_version(
        &self,
        new: &NewVersion,
    ) -> anyhow::Result<(VersionRecord, FunctionInfo)> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = super::now_secs();
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
        let fields = super::VersionFields::of(new)?;
        tx.execute(
            "INSERT INTO versions (function, version, digest, size, timeout_ms, memory_mb,
                                   max_concurrency, created_at, nn, cache, rate, signer,
                                   outbound, validation, variables)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                new.function,
                version,
                fields.digest,
                new.size as i64,
                new.limits.timeout_ms as i64,
                new.limits.memory_mb as i64,
                new.limits.max_concurrency,
                now,
                fields.nn,
                fields.cache,
                fields.rate,
                new.signer,
                fields.outbound,
                fields.validation,
                fields.variables
            ],
        )?;
        let id = tx.last_insert_rowid();
        let info = tx.query_row(
            "SELECT name, created_at, tenant, public FROM functions WHERE name = ?1",
            [&new.function],
            function_info,
        )?;
        tx.commit()?;
        Ok((new.record(id, version, now), info))
    }

    pub fn all_versions(&self) -> anyhow::Result<Vec<VersionRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, function, version, digest, size, timeout_ms, memory_mb,
                    max_concurrency, created_at, nn, cache, rate, signer, outbound,
                    validation, variables
             FROM versions ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(RawVersion {
                id: r.get(0)?,
                function: r.get(1)?,
                version: r.get(2)?,
                digest: r.get(3)?,
                size: r.get(4)?,
                timeout_ms: r.get(5)?,
                memory_mb: r.get(6)?,
                max_concurrency: r.get(7)?,
                created_at: r.get(8)?,
                nn: r.get(9)?,
                cache: r.get(10)?,
                rate: r.get(11)?,
                signer: r.get(12)?,
                outbound: r.get(13)?,
                validation: r.get(14)?,
                variables: r.get(15)?,
            })
        })?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row?.decode()?);
        }
        Ok(out)
    }

    pub fn functions(&self) -> anyhow::Result<Vec<FunctionInfo>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, created_at, tenant, public FROM functions")?;
        let rows = stmt.query_map([], function_info)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn add_blob_owner(&self, digest: &Digest, tenant: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "INSERT OR IGNORE INTO blob_owners (digest, tenant) VALUES (?1, ?2)",
            params![digest.to_string(), tenant],
        )?;
        Ok(())
    }

    pub fn owns_blob(&self, digest: &Digest, tenant: &str) -> anyhow::Result<bool> {
        Ok(self
            .conn()
            .prepare_cached("SELECT 1 FROM blob_owners WHERE digest = ?1 AND tenant = ?2")?
            .exists(params![digest.to_string(), tenant])?)
    }

    pub fn delete_function(&self, name: &str) -> anyhow::Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM traffic WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM rollouts WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM rollout_stats WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM monitor_buckets WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM monitor_references WHERE function = ?1", [name])?;
        tx.execute("DELETE FROM monitor_profiles WHERE function = ?1", [name])?;
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
