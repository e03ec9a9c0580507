//! The traffic side of the SQLite metadata: policies (main and aliases), their history,
//! and rollouts; a change and its history entry (and the rollout) in one transaction.

use rusqlite::{OptionalExtension, params};

use super::rollouts::{self, Expect, RolloutRow};
use super::sqlite::SqliteMeta;
use super::{Stored, TrafficChange, history_entry, previous_of};
use crate::deploy::Rollout;

impl SqliteMeta {
    pub fn set_traffic(
        &self,
        function: &str,
        alias: Option<&str>,
        change: &TrafficChange<'_>,
    ) -> anyhow::Result<Stored> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now_ms = crate::unix_ms();
        let stored_epoch = rollouts::check(
            function,
            change.expect,
            stored_rollout(&tx, function)?.as_ref(),
        )?;
        let previous: Option<(String, i64)> = match alias {
            None => tx.query_row(
                "SELECT policy, revision FROM traffic WHERE function = ?1",
                [function],
                |r| Ok((r.get(0)?, r.get(1)?)),
            ),
            Some(a) => tx.query_row(
                "SELECT policy, revision FROM aliases WHERE function = ?1 AND alias = ?2",
                [function, a],
                |r| Ok((r.get(0)?, r.get(1)?)),
            ),
        }
        .optional()?;
        super::StaleRevision::check(change.if_revision, previous.as_ref())?;
        let revision = previous.as_ref().map_or(0, |p| p.1) + 1;
        match alias {
            None => tx.execute(
                "INSERT INTO traffic (function, policy, revision, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(function) DO UPDATE SET policy = excluded.policy,
                     revision = excluded.revision, updated_at = excluded.updated_at",
                params![function, change.policy, revision, now_ms / 1000],
            )?,
            Some(a) => tx.execute(
                "INSERT INTO aliases (function, alias, policy, revision, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(function, alias) DO UPDATE SET policy = excluded.policy,
                     revision = excluded.revision, updated_at = excluded.updated_at",
                params![function, a, change.policy, revision, now_ms / 1000],
            )?,
        };
        let detail = super::change_detail(change, alias, revision, previous.map(|p| p.0))?;
        insert_history(
            &tx,
            function,
            now_ms,
            change.actor,
            change.kind,
            change.reason,
            &detail,
        )?;
        let epoch = match change.rollout {
            Some(r) => {
                let fresh = change.expect == Expect::NoActiveRollout;
                Some(upsert_rollout(
                    &tx,
                    function,
                    r,
                    now_ms,
                    stored_epoch,
                    fresh,
                )?)
            }
            None => None,
        };
        tx.commit()?;
        Ok(Stored {
            revision: revision as u64,
            epoch,
        })
    }

    pub fn record_rollout(
        &self,
        function: &str,
        actor: Option<&str>,
        kind: &str,
        reason: &str,
        rollout: &Rollout,
        expect: u64,
    ) -> anyhow::Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now_ms = crate::unix_ms();
        let stored = stored_rollout(&tx, function)?;
        let stored_epoch = rollouts::check(function, Expect::Epoch(expect), stored.as_ref())?;
        let detail = super::rollout_detail(rollout);
        insert_history(&tx, function, now_ms, actor, kind, reason, &detail)?;
        let epoch = upsert_rollout(&tx, function, rollout, now_ms, stored_epoch, false)?;
        tx.commit()?;
        Ok(epoch)
    }

    pub fn active_rollouts(&self) -> anyhow::Result<Vec<Rollout>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT rollout, epoch, driver FROM rollouts WHERE active = 1")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get(2)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(json, epoch, driver)| rollouts::decode(&json, epoch, driver))
            .collect())
    }

    pub fn rollout(&self, function: &str) -> anyhow::Result<Option<Rollout>> {
        let conn = self.conn();
        let row: Option<(String, i64, Option<String>)> = conn
            .query_row(
                "SELECT rollout, epoch, driver FROM rollouts WHERE function = ?1",
                [function],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        Ok(row.and_then(|(json, epoch, driver)| rollouts::decode(&json, epoch, driver)))
    }

    pub fn previous_traffic(
        &self,
        function: &str,
        alias: Option<&str>,
    ) -> anyhow::Result<Option<(String, String)>> {
        let conn = self.conn();
        let row: Option<(String, String)> = match alias {
            None => conn.query_row(
                "SELECT h.kind, h.detail FROM history h JOIN traffic t ON t.function = h.function
                 WHERE h.function = ?1 AND json_extract(h.detail, '$.alias') IS NULL
                   AND json_extract(h.detail, '$.revision') = t.revision
                 ORDER BY h.seq DESC LIMIT 1",
                [function],
                |r| Ok((r.get(0)?, r.get(1)?)),
            ),
            Some(a) => conn.query_row(
                "SELECT h.kind, h.detail FROM history h
                 JOIN aliases x ON x.function = h.function AND x.alias = ?2
                 WHERE h.function = ?1 AND json_extract(h.detail, '$.alias') = ?2
                   AND json_extract(h.detail, '$.revision') = x.revision
                 ORDER BY h.seq DESC LIMIT 1",
                [function, a],
                |r| Ok((r.get(0)?, r.get(1)?)),
            ),
        }
        .optional()?;
        row.map(|(kind, d)| previous_of(kind, &d)).transpose()
    }

    pub fn traffic(&self) -> anyhow::Result<Vec<(String, String, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT function, policy, revision FROM traffic")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn aliases(&self) -> anyhow::Result<Vec<(String, String, String, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT function, alias, policy, revision FROM aliases")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn history(
        &self,
        function: &str,
        limit: u32,
        before: Option<i64>,
        tenant: Option<&str>,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT seq, at_ms, actor, kind, reason, detail FROM history
             WHERE function = ?1 AND (?3 IS NULL OR tenant = ?3) AND seq < ?4
             ORDER BY seq DESC LIMIT ?2",
        )?;
        let before = before.unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![function, limit, tenant, before], |r| {
            let detail: String = r.get(5)?;
            Ok(history_entry(
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                &detail,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

pub(super) fn insert_history(
    tx: &rusqlite::Transaction<'_>,
    function: &str,
    at_ms: i64,
    actor: Option<&str>,
    kind: &str,
    reason: &str,
    detail: &serde_json::Value,
) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO history (function, at_ms, actor, kind, reason, detail, tenant)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, (SELECT tenant FROM functions WHERE name = ?1))",
        params![function, at_ms, actor, kind, reason, detail.to_string()],
    )
}

/// The function's `rollouts` row, as a change reads it before writing.
fn stored_rollout(
    tx: &rusqlite::Transaction<'_>,
    function: &str,
) -> rusqlite::Result<Option<RolloutRow>> {
    tx.query_row(
        "SELECT active, epoch, rollout, driver FROM rollouts WHERE function = ?1",
        [function],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )
    .optional()
}

/// Stores `rollout` as the function's, one epoch past `stored_epoch`; a `fresh` one (just
/// started) has no driver yet. Returns the new epoch.
fn upsert_rollout(
    tx: &rusqlite::Transaction<'_>,
    function: &str,
    rollout: &Rollout,
    at_ms: i64,
    stored_epoch: i64,
    fresh: bool,
) -> anyhow::Result<u64> {
    let json = serde_json::to_string(rollout)?;
    let epoch = stored_epoch + 1;
    tx.execute(
        "INSERT INTO rollouts (function, rollout, active, updated_at, epoch)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(function) DO UPDATE SET rollout = excluded.rollout,
             active = excluded.active, updated_at = excluded.updated_at, epoch = excluded.epoch,
             driver = CASE WHEN ?6 THEN NULL ELSE driver END,
             lease_until = CASE WHEN ?6 THEN 0 ELSE lease_until END",
        params![function, json, rollout.state.active(), at_ms, epoch, fresh],
    )?;
    if !rollout.state.active() {
        // Its gate numbers are of no use any more.
        tx.execute("DELETE FROM rollout_stats WHERE function = ?1", [function])?;
    }
    Ok(epoch as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    #[test]
    fn history_made_before_the_tenant_column_is_given_to_the_owner_of_its_time() {
        let dir = std::env::temp_dir().join(format!("kiln-meta-mig-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("kiln.db");
        {
            // The shape an earlier Kiln left: history without its tenant.
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE functions (name TEXT PRIMARY KEY, created_at INTEGER NOT NULL,
                     tenant TEXT NOT NULL DEFAULT 'default', public INTEGER NOT NULL DEFAULT 0);
                 CREATE TABLE history (seq INTEGER PRIMARY KEY AUTOINCREMENT, function TEXT NOT NULL,
                     at_ms INTEGER NOT NULL, actor TEXT, kind TEXT NOT NULL,
                     reason TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '{}');
                 INSERT INTO functions VALUES ('f', 100, 'team-b', 0);
                 INSERT INTO history (function, at_ms, kind) VALUES ('f', 50000, 'traffic');
                 INSERT INTO history (function, at_ms, kind) VALUES ('f', 150000, 'traffic');",
            )
            .expect("old schema");
        }
        let meta = SqliteMeta::open(&path).expect("migrate");
        // The entry from before team-b created `f` belonged to an earlier owner.
        assert_eq!(
            meta.history("f", 10, None, Some("team-b"))
                .expect("b")
                .len(),
            1
        );
        assert_eq!(meta.history("f", 10, None, None).expect("admin").len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
