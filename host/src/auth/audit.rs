//! The audit log: one row per control-plane action (who, tenant, what, target, outcome,
//! when) in an append-only table: on one node in a database of its own, `<data>/audit.db`,
//! so that writing it never waits on (or holds up) deploys in `kiln.db`; in a cluster in
//! the shared PostgreSQL database. Triggers refuse UPDATE and DELETE (and, on PostgreSQL,
//! TRUNCATE), so not even a bug in Kiln can rewrite history through SQL. Reads use a
//! connection of their own and indexes per tenant and per action.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use deadpool_postgres::Pool;
use rusqlite::{Connection, params};
use serde::Serialize;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms           INTEGER NOT NULL,
    key_id          TEXT,
    tenant          TEXT,
    subject_tenant  TEXT,
    action          TEXT NOT NULL,
    target          TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    status          INTEGER NOT NULL,
    detail          TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at_ms);
CREATE INDEX IF NOT EXISTS audit_tenant ON audit (tenant, seq);
CREATE INDEX IF NOT EXISTS audit_subject ON audit (subject_tenant, seq);
CREATE INDEX IF NOT EXISTS audit_action ON audit (action, seq);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
";

/// Longest target or detail kept, in bytes (a hostile path is not stored whole).
pub const MAX_FIELD_BYTES: usize = 256;

/// One action as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub seq: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// RFC 3339, for people.
    pub at: String,
    /// The key that acted (none: authentication off, or the server itself).
    pub key_id: Option<String>,
    /// The tenant of that key.
    pub tenant: Option<String>,
    /// The tenant whose function or key was acted on, when another than `tenant` (an admin
    /// deleting a tenant's function): that tenant sees the entry too.
    pub subject_tenant: Option<String>,
    /// What was done, e.g. `version.create`, `key.revoke`.
    pub action: String,
    /// What it was done to, e.g. the function name or key id.
    pub target: String,
    /// `ok`, `denied` (403) or `failed`.
    pub outcome: String,
    /// The HTTP status answered.
    pub status: u16,
    /// The error message, or what was created.
    pub detail: String,
}

/// Filters of `GET /v1/audit`.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Entries by or about this tenant (forced for keys without `admin`).
    pub tenant: Option<String>,
    pub action: Option<String>,
    /// Newest entries first, at most this many.
    pub limit: u32,
    /// Only entries older than this sequence number (the next page of a listing).
    pub before_seq: Option<i64>,
}

/// The audit log's table: in SQLite (one connection appends, another reads) or in the
/// cluster's PostgreSQL database.
#[allow(clippy::large_enum_variant)] // one per server
pub enum AuditLog {
    Sqlite {
        writer: Arc<Mutex<Connection>>,
        reader: Arc<Mutex<Connection>>,
    },
    Postgres(Pool),
}

/// Rows survive a crash of the process; a power cut may lose the last ones.
fn open(path: &Path) -> anyhow::Result<Connection> {
    crate::store::open_sqlite(path, crate::store::Sync::Normal, "the audit log")
}

/// `s` cut to at most [`MAX_FIELD_BYTES`], on a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_FIELD_BYTES {
        return s;
    }
    let mut end = MAX_FIELD_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

const QUERY_COLUMNS: &str =
    "seq, at_ms, key_id, tenant, subject_tenant, action, target, outcome, status, detail";

impl AuditLog {
    /// Opens (creating) the SQLite log at `path`.
    pub fn sqlite(path: &Path) -> anyhow::Result<AuditLog> {
        let writer = open(path)?;
        writer
            .execute_batch(SCHEMA)
            .context("creating the audit table")?;
        Ok(AuditLog::Sqlite {
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(open(path)?)),
        })
    }

    /// Appends one entry (target and detail clipped).
    pub async fn append(&self, e: &AuditEntry) -> anyhow::Result<()> {
        match self {
            AuditLog::Sqlite { writer, .. } => {
                let e = e.clone();
                crate::store::on_sqlite(writer, move |conn| {
                    conn.prepare_cached(
                        "INSERT INTO audit (at_ms, key_id, tenant, subject_tenant, action, target,
                                        outcome, status, detail)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    )?
                    .execute(params![
                        e.at_ms,
                        e.key_id,
                        e.tenant,
                        e.subject_tenant,
                        e.action,
                        clip(&e.target),
                        e.outcome,
                        e.status,
                        clip(&e.detail)
                    ])?;
                    Ok(())
                })
                .await?;
            }
            AuditLog::Postgres(pool) => {
                pool.get()
                    .await?
                    .execute(
                        "INSERT INTO audit (at_ms, key_id, tenant, subject_tenant, action, target,
                                            outcome, status, detail)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                        &[
                            &e.at_ms,
                            &e.key_id,
                            &e.tenant,
                            &e.subject_tenant,
                            &e.action,
                            &clip(&e.target),
                            &e.outcome,
                            &i32::from(e.status),
                            &clip(&e.detail),
                        ],
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// The entries matching `q`, newest first.
    pub async fn query(&self, q: &AuditQuery) -> anyhow::Result<Vec<AuditEntry>> {
        let (since, until) = (
            q.since_ms.unwrap_or(i64::MIN),
            q.until_ms.unwrap_or(i64::MAX),
        );
        let before = q.before_seq.unwrap_or(i64::MAX);
        match self {
            AuditLog::Sqlite { reader, .. } => {
                let (tenant, action, limit) = (q.tenant.clone(), q.action.clone(), q.limit);
                crate::store::on_sqlite(reader, move |conn| {
                    let mut stmt = conn.prepare_cached(&format!(
                        "SELECT {QUERY_COLUMNS} FROM audit
                     WHERE at_ms >= ?1 AND at_ms < ?2
                       AND (?3 IS NULL OR tenant = ?3 OR subject_tenant = ?3)
                       AND (?4 IS NULL OR action = ?4) AND seq < ?6
                     ORDER BY seq DESC LIMIT ?5"
                    ))?;
                    let args = params![since, until, tenant, action, limit, before];
                    let rows = stmt.query_map(args, |r| {
                        Ok(entry(
                            r.get(0)?,
                            r.get(1)?,
                            [r.get(2)?, r.get(3)?, r.get(4)?],
                            [r.get(5)?, r.get(6)?, r.get(7)?],
                            r.get(8)?,
                            r.get(9)?,
                        ))
                    })?;
                    Ok(rows.collect::<Result<_, _>>()?)
                })
                .await
            }
            AuditLog::Postgres(pool) => {
                let rows = pool
                    .get()
                    .await?
                    .query(
                        &format!(
                            "SELECT {QUERY_COLUMNS} FROM audit
                             WHERE at_ms >= $1 AND at_ms < $2
                               AND ($3::text IS NULL OR tenant = $3 OR subject_tenant = $3)
                               AND ($4::text IS NULL OR action = $4) AND seq < $6
                             ORDER BY seq DESC LIMIT $5"
                        ),
                        &[
                            &since,
                            &until,
                            &q.tenant,
                            &q.action,
                            &i64::from(q.limit),
                            &before,
                        ],
                    )
                    .await?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        entry(
                            r.get(0),
                            r.get(1),
                            [r.get(2), r.get(3), r.get(4)],
                            [r.get(5), r.get(6), r.get(7)],
                            r.get::<_, i32>(8) as u16,
                            r.get(9),
                        )
                    })
                    .collect())
            }
        }
    }
}

/// An entry from its columns: who (key, tenant, subject tenant), what (action, target,
/// outcome).
fn entry(
    seq: i64,
    at_ms: i64,
    [key_id, tenant, subject_tenant]: [Option<String>; 3],
    [action, target, outcome]: [String; 3],
    status: u16,
    detail: String,
) -> AuditEntry {
    AuditEntry {
        seq,
        at_ms,
        at: crate::common::time::format_time(at_ms),
        key_id,
        tenant,
        subject_tenant,
        action,
        target,
        outcome,
        status,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_about(tenant: &str, target: String) -> AuditEntry {
        AuditEntry {
            seq: 0,
            at_ms: 1,
            at: String::new(),
            key_id: Some("k".into()),
            tenant: Some("a".into()),
            subject_tenant: Some(tenant.into()),
            action: "function.delete".into(),
            target,
            outcome: "ok".into(),
            status: 200,
            detail: String::new(),
        }
    }

    #[tokio::test]
    async fn the_log_is_append_only_and_clips_long_fields_on_every_backend() {
        let dir = std::env::temp_dir().join(format!("kiln-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("audit.db");
        let mut logs = vec![AuditLog::sqlite(&path).unwrap_or_else(|e| panic!("{e:#}"))];
        let db = crate::store::pg::scratch::database("audit").await;
        if let Some(db) = &db {
            let pool = crate::store::pg::connect(&db.url).await.expect("pg");
            logs.push(AuditLog::Postgres(pool));
        }
        for log in &logs {
            log.append(&entry_about("b", "é".repeat(1000)))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let q = AuditQuery {
                tenant: Some("b".into()),
                limit: 10,
                ..AuditQuery::default()
            };
            let got = log.query(&q).await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got.len(), 1, "the subject tenant sees it");
            assert!(got[0].target.len() <= MAX_FIELD_BYTES && got[0].target.starts_with('é'));
            assert_eq!(got[0].status, 200);
            let older = AuditQuery {
                before_seq: Some(got[0].seq),
                ..q.clone()
            };
            assert!(log.query(&older).await.expect("older").is_empty());
            let other = AuditQuery {
                tenant: Some("c".into()),
                limit: 10,
                ..AuditQuery::default()
            };
            assert!(log.query(&other).await.expect("c").is_empty());
        }
        let raw = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
        for sql in ["UPDATE audit SET outcome = 'x'", "DELETE FROM audit"] {
            let err = raw.execute(sql, []).expect_err("append-only");
            assert!(err.to_string().contains("append-only"), "{err}");
        }
        if let Some(AuditLog::Postgres(pool)) = logs.get(1) {
            let client = pool.get().await.expect("client");
            for sql in [
                "UPDATE audit SET outcome = 'x'",
                "DELETE FROM audit",
                "TRUNCATE audit",
            ] {
                let err = client.batch_execute(sql).await.expect_err("append-only");
                let msg = err.as_db_error().map(|e| e.message().to_string());
                assert_eq!(
                    msg.as_deref(),
                    Some("the audit log is append-only"),
                    "{sql}"
                );
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
