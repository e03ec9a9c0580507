//! The traffic side of the metadata: policies (main and aliases), their history, and
//! rollouts; a change and its history entry (and the rollout) in one transaction.

use rusqlite::{OptionalExtension, params};

use super::MetaStore;
use crate::deploy::Rollout;

impl MetaStore {
    /// Applies one traffic change of `function` (its main policy, or `alias`'s) in one
    /// transaction: the new policy (and revision), its history entry, and the function's
    /// rollout as it now is. Returns the new revision.
    pub fn set_traffic(
        &self,
        function: &str,
        alias: Option<&str>,
        change: &TrafficChange<'_>,
    ) -> anyhow::Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now_ms = crate::unix_ms();
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
        let mut detail = serde_json::json!({
            "revision": revision,
            "policy": serde_json::from_str::<serde_json::Value>(change.policy)?,
            "previous": previous
                .map(|p| serde_json::from_str::<serde_json::Value>(&p.0))
                .transpose()?,
        });
        if let Some(extra) = change.extra {
            detail["check"] = extra.clone();
        }
        if let Some(a) = alias {
            detail["alias"] = a.into();
        }
        insert_history(
            &tx,
            function,
            now_ms,
            change.actor,
            change.kind,
            change.reason,
            &detail,
        )?;
        if let Some(r) = change.rollout {
            upsert_rollout(&tx, function, r, now_ms)?;
        }
        tx.commit()?;
        Ok(revision as u64)
    }

    /// Records a history entry that changes no policy (a rollout paused or resumed) and
    /// the function's rollout as it now is, in one transaction.
    pub fn record_rollout(
        &self,
        function: &str,
        actor: Option<&str>,
        kind: &str,
        reason: &str,
        rollout: &Rollout,
    ) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now_ms = crate::unix_ms();
        let detail = serde_json::json!({"rollout": {"candidate": rollout.candidate, "stable": rollout.stable, "step": rollout.step + 1, "percent": rollout.percent()}});
        insert_history(&tx, function, now_ms, actor, kind, reason, &detail)?;
        upsert_rollout(&tx, function, rollout, now_ms)?;
        tx.commit()?;
        Ok(())
    }

    /// Every rollout still running or paused.
    pub fn active_rollouts(&self) -> anyhow::Result<Vec<Rollout>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT rollout FROM rollouts WHERE active = 1")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for json in rows {
            let json = json?;
            match serde_json::from_str(&json) {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!("stored rollout unreadable: {e}: {json}"),
            }
        }
        Ok(out)
    }

    /// `function`'s latest rollout, active or ended.
    pub fn rollout(&self, function: &str) -> anyhow::Result<Option<Rollout>> {
        let conn = self.conn();
        let json: Option<String> = conn
            .query_row(
                "SELECT rollout FROM rollouts WHERE function = ?1",
                [function],
                |r| r.get(0),
            )
            .optional()?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    /// The policy (main, or `alias`'s) in force before the current one (JSON, `null` for
    /// none), from the history entry that made the current revision, with that entry's
    /// kind; `None` when it never changed.
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
        Ok(match row {
            Some((kind, d)) => Some((
                kind,
                serde_json::from_str::<serde_json::Value>(&d)?["previous"].to_string(),
            )),
            None => None,
        })
    }

    /// Every stored traffic policy: (function, policy JSON, revision).
    pub fn traffic(&self) -> anyhow::Result<Vec<(String, String, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT function, policy, revision FROM traffic")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every stored alias: (function, alias, policy JSON or `null`, revision).
    pub fn aliases(&self) -> anyhow::Result<Vec<(String, String, String, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT function, alias, policy, revision FROM aliases")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// `function`'s history, newest first, at most `limit` entries; with `tenant`, only
    /// the entries made while that tenant owned the function (a name can change hands
    /// after a delete).
    pub fn history(
        &self,
        function: &str,
        limit: u32,
        tenant: Option<&str>,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT seq, at_ms, actor, kind, reason, detail FROM history
             WHERE function = ?1 AND (?3 IS NULL OR tenant = ?3) ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![function, limit, tenant], |r| {
            let at_ms: i64 = r.get(1)?;
            let detail: String = r.get(5)?;
            Ok(serde_json::json!({
                "seq": r.get::<_, i64>(0)?,
                "at_ms": at_ms,
                "at": crate::meter::query::format_time(at_ms),
                "actor": r.get::<_, Option<String>>(2)?,
                "kind": r.get::<_, String>(3)?,
                "reason": r.get::<_, String>(4)?,
                "detail": serde_json::from_str::<serde_json::Value>(&detail)
                    .unwrap_or(serde_json::Value::Null),
            }))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
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
}

fn insert_history(
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

fn upsert_rollout(
    tx: &rusqlite::Transaction<'_>,
    function: &str,
    rollout: &Rollout,
    at_ms: i64,
) -> anyhow::Result<()> {
    let json = serde_json::to_string(rollout)?;
    tx.execute(
        "INSERT INTO rollouts (function, rollout, active, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(function) DO UPDATE SET rollout = excluded.rollout,
             active = excluded.active, updated_at = excluded.updated_at",
        params![function, json, rollout.state.active(), at_ms],
    )?;
    Ok(())
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
        let meta = MetaStore::open(&path).expect("migrate");
        // The entry from before team-b created `f` belonged to an earlier owner.
        assert_eq!(meta.history("f", 10, Some("team-b")).expect("b").len(), 1);
        assert_eq!(meta.history("f", 10, None).expect("admin").len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
