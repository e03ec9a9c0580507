//! The audit log: one row per control-plane action (who, tenant, what, target, outcome,
//! when) in an append-only table of its own database, `<data>/audit.db`, so that writing
//! it never waits on (or holds up) deploys in `kiln.db`. Triggers refuse UPDATE and DELETE,
//! so not even a bug in Kiln can rewrite history through SQL. Reads use a connection of
//! their own and indexes per tenant and per action.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
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
}

/// The audit database: one connection appends, another reads.
pub struct AuditLog {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
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

impl AuditLog {
    /// Opens (creating) the log at `path`.
    pub fn open(path: &Path) -> anyhow::Result<AuditLog> {
        let writer = open(path)?;
        writer
            .execute_batch(SCHEMA)
            .context("creating the audit table")?;
        Ok(AuditLog {
            writer: Mutex::new(writer),
            reader: Mutex::new(open(path)?),
        })
    }

    /// Appends one entry (target and detail clipped).
    pub fn append(&self, e: &AuditEntry) -> rusqlite::Result<()> {
        let conn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        conn.prepare_cached(
            "INSERT INTO audit (at_ms, key_id, tenant, subject_tenant, action, target, outcome,
                                status, detail)
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
    }

    /// The entries matching `q`, newest first.
    pub fn query(&self, q: &AuditQuery) -> rusqlite::Result<Vec<AuditEntry>> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn.prepare_cached(
            "SELECT seq, at_ms, key_id, tenant, subject_tenant, action, target, outcome, status,
                    detail
             FROM audit
             WHERE at_ms >= ?1 AND at_ms < ?2
               AND (?3 IS NULL OR tenant = ?3 OR subject_tenant = ?3)
               AND (?4 IS NULL OR action = ?4)
             ORDER BY seq DESC LIMIT ?5",
        )?;
        let rows = stmt.query_map(
            params![
                q.since_ms.unwrap_or(i64::MIN),
                q.until_ms.unwrap_or(i64::MAX),
                q.tenant,
                q.action,
                q.limit
            ],
            |r| {
                let at_ms: i64 = r.get(1)?;
                Ok(AuditEntry {
                    seq: r.get(0)?,
                    at_ms,
                    at: crate::meter::query::format_time(at_ms),
                    key_id: r.get(2)?,
                    tenant: r.get(3)?,
                    subject_tenant: r.get(4)?,
                    action: r.get(5)?,
                    target: r.get(6)?,
                    outcome: r.get(7)?,
                    status: r.get(8)?,
                    detail: r.get(9)?,
                })
            },
        )?;
        rows.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_append_only_and_clips_long_fields() {
        let dir = std::env::temp_dir().join(format!("kiln-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("audit.db");
        let log = AuditLog::open(&path).unwrap_or_else(|e| panic!("{e:#}"));
        let entry = AuditEntry {
            seq: 0,
            at_ms: 1,
            at: String::new(),
            key_id: Some("k".into()),
            tenant: Some("a".into()),
            subject_tenant: Some("b".into()),
            action: "function.delete".into(),
            target: "é".repeat(1000),
            outcome: "ok".into(),
            status: 200,
            detail: String::new(),
        };
        log.append(&entry).unwrap_or_else(|e| panic!("{e}"));
        let q = AuditQuery {
            tenant: Some("b".into()),
            limit: 10,
            ..AuditQuery::default()
        };
        let got = log.query(&q).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.len(), 1, "the subject tenant sees it");
        assert!(got[0].target.len() <= MAX_FIELD_BYTES && got[0].target.starts_with('é'));
        let raw = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
        for sql in ["UPDATE audit SET outcome = 'x'", "DELETE FROM audit"] {
            let err = raw.execute(sql, []).expect_err("append-only");
            assert!(err.to_string().contains("append-only"), "{err}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
