//! The audit log: one row per control-plane action (who, tenant, what, target, outcome,
//! when) in an append-only table of `kiln.db`. Triggers refuse UPDATE and DELETE, so not
//! even a bug in Kiln can rewrite history through SQL.

use rusqlite::{Connection, params};
use serde::Serialize;

/// The table and the triggers that keep it append-only.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms    INTEGER NOT NULL,
    key_id   TEXT,
    tenant   TEXT,
    action   TEXT NOT NULL,
    target   TEXT NOT NULL,
    outcome  TEXT NOT NULL,
    status   INTEGER NOT NULL,
    detail   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at_ms);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
";

/// One action as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub seq: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// RFC 3339, for people.
    pub at: String,
    /// The key that acted (none: no key, or authentication off).
    pub key_id: Option<String>,
    pub tenant: Option<String>,
    /// What was done, e.g. `version.create`, `key.revoke`.
    pub action: String,
    /// What it was done to, e.g. the function name or key id.
    pub target: String,
    /// `ok`, `denied` (401/403/429) or `failed`.
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
    /// Only this tenant's entries (forced for keys without `admin`).
    pub tenant: Option<String>,
    pub action: Option<String>,
    /// Newest entries first, at most this many.
    pub limit: u32,
}

/// Appends one entry.
pub(super) fn append(conn: &Connection, e: &AuditEntry) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO audit (at_ms, key_id, tenant, action, target, outcome, status, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            e.at_ms, e.key_id, e.tenant, e.action, e.target, e.outcome, e.status, e.detail
        ],
    )?;
    Ok(())
}

/// The entries matching `q`, newest first.
pub(super) fn query(conn: &Connection, q: &AuditQuery) -> rusqlite::Result<Vec<AuditEntry>> {
    let mut stmt = conn.prepare(
        "SELECT seq, at_ms, key_id, tenant, action, target, outcome, status, detail FROM audit
         WHERE at_ms >= ?1 AND at_ms < ?2
           AND (?3 IS NULL OR tenant = ?3) AND (?4 IS NULL OR action = ?4)
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
                action: r.get(4)?,
                target: r.get(5)?,
                outcome: r.get(6)?,
                status: r.get(7)?,
                detail: r.get(8)?,
            })
        },
    )?;
    rows.collect()
}
