//! Heartbeats, rollout leases and published gate numbers in SQLite (see [`super::cluster`]).

use rusqlite::{OptionalExtension, params};

use super::cluster::{FORGET_NODES_MS, NodeReport, PublishedStats};
use super::rollouts;
use super::sqlite::SqliteMeta;
use crate::deploy::Rollout;

impl SqliteMeta {
    pub fn heartbeat(&self, r: &NodeReport) -> anyhow::Result<()> {
        let now = crate::unix_ms();
        let conn = self.conn();
        conn.execute(
            "INSERT INTO nodes (id, address, version, started_at, heartbeat_at, loaded, in_flight)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(id) DO UPDATE SET address = excluded.address,
                 version = excluded.version, started_at = excluded.started_at,
                 heartbeat_at = excluded.heartbeat_at, loaded = excluded.loaded,
                 in_flight = excluded.in_flight",
            params![
                r.id,
                r.address,
                r.version,
                r.started_at_ms,
                now,
                serde_json::to_string(&r.loaded)?,
                r.in_flight as i64
            ],
        )?;
        conn.execute(
            "DELETE FROM nodes WHERE heartbeat_at < ?1",
            [now - FORGET_NODES_MS],
        )?;
        Ok(())
    }

    pub fn nodes(&self, within_ms: i64) -> anyhow::Result<Vec<NodeReport>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, address, version, started_at, heartbeat_at, loaded, in_flight
             FROM nodes WHERE heartbeat_at >= ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([crate::unix_ms() - within_ms], |r| {
            Ok((
                NodeReport {
                    id: r.get(0)?,
                    address: r.get(1)?,
                    version: r.get(2)?,
                    started_at_ms: r.get(3)?,
                    heartbeat_ms: r.get(4)?,
                    loaded: Vec::new(),
                    in_flight: r.get::<_, i64>(6)?.max(0) as u64,
                },
                r.get::<_, String>(5)?,
            ))
        })?;
        rows.map(|row| {
            let (mut report, loaded) = row?;
            report.loaded = serde_json::from_str(&loaded)?;
            Ok(report)
        })
        .collect()
    }

    pub fn take_lease(
        &self,
        function: &str,
        node: &str,
        lease_ms: i64,
    ) -> anyhow::Result<Option<Rollout>> {
        let now = crate::unix_ms();
        let conn = self.conn();
        let row: Option<(String, i64, Option<String>)> = conn
            .query_row(
                "UPDATE rollouts SET driver = ?2, lease_until = ?3 + ?4, epoch = epoch + 1
                 WHERE function = ?1 AND active = 1
                   AND (driver IS NULL OR driver = ?2 OR lease_until < ?3)
                 RETURNING rollout, epoch, driver",
                params![function, node, now, lease_ms],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        Ok(row.and_then(|(json, epoch, driver)| rollouts::decode(&json, epoch, driver)))
    }

    pub fn renew_lease(
        &self,
        function: &str,
        node: &str,
        lease_ms: i64,
    ) -> anyhow::Result<Option<u64>> {
        let conn = self.conn();
        let epoch: Option<i64> = conn
            .query_row(
                "UPDATE rollouts SET lease_until = ?3 + ?4
                 WHERE function = ?1 AND active = 1 AND driver = ?2
                 RETURNING epoch",
                params![function, node, crate::unix_ms(), lease_ms],
                |r| r.get(0),
            )
            .optional()?;
        Ok(epoch.map(|e| e.max(0) as u64))
    }

    /// The secret `name`, storing `fresh` first when there is none.
    pub fn secret(&self, name: &str, fresh: &[u8]) -> anyhow::Result<Vec<u8>> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR IGNORE INTO secrets (name, value) VALUES (?1, ?2)",
            params![name, fresh],
        )?;
        Ok(
            conn.query_row("SELECT value FROM secrets WHERE name = ?1", [name], |r| {
                r.get(0)
            })?,
        )
    }

    pub fn release_leases(&self, node: &str) -> anyhow::Result<u64> {
        let n = self.conn().execute(
            "UPDATE rollouts SET driver = NULL, lease_until = 0
             WHERE active = 1 AND driver = ?1",
            params![node],
        )?;
        Ok(n as u64)
    }

    pub fn publish_rollout_stats(
        &self,
        function: &str,
        process: &str,
        step_started_ms: i64,
        stats: &[PublishedStats],
    ) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for s in stats {
            tx.execute(
                "INSERT INTO rollout_stats (function, process, version, step_started, stats, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(function, process, version) DO UPDATE SET
                     step_started = excluded.step_started, stats = excluded.stats,
                     updated_at = excluded.updated_at",
                params![
                    function,
                    process,
                    s.version,
                    step_started_ms,
                    s.stats,
                    crate::unix_ms()
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn rollout_stats(
        &self,
        function: &str,
        step_started_ms: i64,
        except: &str,
    ) -> anyhow::Result<Vec<PublishedStats>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT version, stats FROM rollout_stats
             WHERE function = ?1 AND step_started = ?2 AND process <> ?3",
        )?;
        let rows = stmt.query_map(params![function, step_started_ms, except], |r| {
            Ok(PublishedStats {
                version: r.get(0)?,
                stats: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
