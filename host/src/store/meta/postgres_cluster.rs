//! Heartbeats, rollout leases and published gate numbers on PostgreSQL (see
//! [`super::cluster`]). Times are the database's clock, so nodes whose clocks disagree
//! still agree on who holds a lease and who is alive. None of these writes bumps the change
//! counter: they change nothing a registry is built from.

use super::cluster::{FORGET_NODES_MS, NodeReport, PublishedStats};
use super::postgres::PgMeta;
use super::rollouts;
use crate::deploy::Rollout;

/// The database's clock in unix milliseconds.
const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

impl PgMeta {
    pub async fn heartbeat(&self, r: &NodeReport) -> anyhow::Result<()> {
        let client = self.client().await?;
        client
            .execute(
                &format!(
                    "INSERT INTO nodes (id, address, version, started_at, heartbeat_at, loaded, in_flight)
                     VALUES ($1, $2, $3, $4, {NOW_MS}, $5, $6)
                     ON CONFLICT (id) DO UPDATE SET address = excluded.address,
                         version = excluded.version, started_at = excluded.started_at,
                         heartbeat_at = excluded.heartbeat_at, loaded = excluded.loaded,
                         in_flight = excluded.in_flight"
                ),
                &[
                    &r.id,
                    &r.address,
                    &r.version,
                    &r.started_at_ms,
                    &serde_json::to_string(&r.loaded)?,
                    &(r.in_flight as i64),
                ],
            )
            .await?;
        client
            .execute(
                &format!("DELETE FROM nodes WHERE heartbeat_at < {NOW_MS} - $1"),
                &[&FORGET_NODES_MS],
            )
            .await?;
        Ok(())
    }

    pub async fn nodes(&self, within_ms: i64) -> anyhow::Result<Vec<NodeReport>> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT id, address, version, started_at, heartbeat_at, loaded, in_flight
                     FROM nodes WHERE heartbeat_at >= {NOW_MS} - $1 ORDER BY id"
                ),
                &[&within_ms],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(NodeReport {
                    id: r.get(0),
                    address: r.get(1),
                    version: r.get(2),
                    started_at_ms: r.get(3),
                    heartbeat_ms: r.get(4),
                    loaded: serde_json::from_str(r.get::<_, &str>(5))?,
                    in_flight: r.get::<_, i64>(6).max(0) as u64,
                })
            })
            .collect()
    }

    pub async fn take_lease(
        &self,
        function: &str,
        node: &str,
        lease_ms: i64,
    ) -> anyhow::Result<Option<Rollout>> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "UPDATE rollouts SET driver = $2, lease_until = {NOW_MS} + $3, epoch = epoch + 1
                     WHERE function = $1 AND active
                       AND (driver IS NULL OR driver = $2 OR lease_until < {NOW_MS})
                     RETURNING rollout, epoch, driver"
                ),
                &[&function, &node, &lease_ms],
            )
            .await?;
        Ok(row.and_then(|r| rollouts::decode(r.get::<_, &str>(0), r.get(1), r.get(2))))
    }

    pub async fn renew_lease(
        &self,
        function: &str,
        node: &str,
        lease_ms: i64,
    ) -> anyhow::Result<Option<u64>> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "UPDATE rollouts SET lease_until = {NOW_MS} + $3
                     WHERE function = $1 AND active AND driver = $2
                     RETURNING epoch"
                ),
                &[&function, &node, &lease_ms],
            )
            .await?;
        Ok(row.map(|r| r.get::<_, i64>(0).max(0) as u64))
    }

    /// The secret `name`, storing `fresh` first when there is none (nodes racing to
    /// make it all read the one that won).
    pub async fn secret(&self, name: &str, fresh: &[u8]) -> anyhow::Result<Vec<u8>> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO secrets (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&name, &fresh],
            )
            .await?;
        Ok(client
            .query_one("SELECT value FROM secrets WHERE name = $1", &[&name])
            .await?
            .get(0))
    }

    pub async fn release_leases(&self, node: &str) -> anyhow::Result<u64> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE rollouts SET driver = NULL, lease_until = 0
                 WHERE active AND driver = $1",
                &[&node],
            )
            .await?;
        Ok(n)
    }

    pub async fn publish_rollout_stats(
        &self,
        function: &str,
        process: &str,
        step_started_ms: i64,
        stats: &[PublishedStats],
    ) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        for s in stats {
            tx.execute(
                &format!(
                    "INSERT INTO rollout_stats (function, process, version, step_started, stats, updated_at)
                     VALUES ($1, $2, $3, $4, $5, {NOW_MS})
                     ON CONFLICT (function, process, version) DO UPDATE SET
                         step_started = excluded.step_started, stats = excluded.stats,
                         updated_at = excluded.updated_at"
                ),
                &[
                    &function,
                    &process,
                    &i64::from(s.version),
                    &step_started_ms,
                    &s.stats,
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn rollout_stats(
        &self,
        function: &str,
        step_started_ms: i64,
        except: &str,
    ) -> anyhow::Result<Vec<PublishedStats>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT version, stats FROM rollout_stats
                 WHERE function = $1 AND step_started = $2 AND process <> $3",
                &[&function, &step_started_ms, &except],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(PublishedStats {
                    version: u32::try_from(r.get::<_, i64>(0))?,
                    stats: r.get(1),
                })
            })
            .collect()
    }
}
