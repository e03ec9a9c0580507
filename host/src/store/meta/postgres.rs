//! The metadata on PostgreSQL: the same tables and the same rules as the SQLite backend
//! (one transaction per change, version numbers never reused), made safe for several
//! nodes writing at once by locking the function's row at the start of each change.

use anyhow::Context;
use deadpool_postgres::{GenericClient, Pool};

use super::rollouts::{self, Expect, RolloutRow};
use super::{
    FunctionInfo, NewVersion, NotOwner, RawVersion, Replayed, Stored, TrafficChange, VersionRecord,
    history_entry, previous_of,
};
use crate::common::Digest;
use crate::deploy::Rollout;

/// The metadata store on a PostgreSQL pool.
pub struct PgMeta {
    pool: Pool,
}

const VERSION_COLUMNS: &str = "id, function, version, digest, size, timeout_ms, memory_mb,
    max_concurrency, created_at, nn, cache, rate, signer, outbound, validation, variables";

fn raw_version(r: &tokio_postgres::Row) -> RawVersion {
    RawVersion {
        id: r.get(0),
        function: r.get(1),
        version: r.get(2),
        digest: r.get(3),
        size: r.get(4),
        timeout_ms: r.get(5),
        memory_mb: r.get(6),
        max_concurrency: r.get(7),
        created_at: r.get(8),
        nn: r.get(9),
        cache: r.get(10),
        rate: r.get(11),
        signer: r.get(12),
        outbound: r.get(13),
        validation: r.get(14),
        variables: r.get(15),
    }
}

fn function_info(r: &tokio_postgres::Row) -> FunctionInfo {
    FunctionInfo {
        name: r.get(0),
        created_at: r.get(1),
        tenant: r.get(2),
        public: r.get(3),
    }
}

impl PgMeta {
    /// The store on `pool` (whose schema [`super::super::pg::connect`] brought up to date).
    pub fn new(pool: Pool) -> Self {
        PgMeta { pool }
    }

    pub(super) async fn client(&self) -> anyhow::Result<deadpool_postgres::Object> {
        self.pool.get().await.context("connecting to the database")
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    pub async fn create_version(
        &self,
        new: &NewVersion,
    ) -> anyhow::Result<(VersionRecord, FunctionInfo)> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = super::now_secs();
        tx.execute(
            "INSERT INTO functions (name, created_at, tenant, public) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO NOTHING",
            &[
                &new.function,
                &now,
                &new.tenant,
                &new.public.unwrap_or(false),
            ],
        )
        .await?;
        // The function's row lock orders concurrent deploys of one function across nodes.
        let owner: String = tx
            .query_one(
                "SELECT tenant FROM functions WHERE name = $1 FOR UPDATE",
                &[&new.function],
            )
            .await?
            .get(0);
        if new.enforce_owner && owner != new.tenant {
            return Err(NotOwner {
                function: new.function.clone(),
            }
            .into());
        }
        if let Some(public) = new.public {
            tx.execute(
                "UPDATE functions SET public = $2 WHERE name = $1",
                &[&new.function, &public],
            )
            .await?;
        }
        let seq = tx
            .query_opt(
                "SELECT last, last_signed_at FROM version_seq WHERE function = $1",
                &[&new.function],
            )
            .await?;
        let (last, last_signed_at): (i64, Option<i64>) =
            seq.map_or((0, None), |r| (r.get(0), r.get(1)));
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
            "INSERT INTO version_seq (function, last, last_signed_at) VALUES ($1, $2, $3)
             ON CONFLICT (function) DO UPDATE SET last = excluded.last,
                 last_signed_at = coalesce(excluded.last_signed_at, version_seq.last_signed_at)",
            &[&new.function, &version, &new.signed_at],
        )
        .await?;
        let fields = super::VersionFields::of(new)?;
        let id: i64 = tx
            .query_one(
                "INSERT INTO versions (function, version, digest, size, timeout_ms, memory_mb,
                                       max_concurrency, created_at, nn, cache, rate, signer,
                                       outbound, validation, variables)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
                 RETURNING id",
                &[
                    &new.function,
                    &version,
                    &fields.digest,
                    &(new.size as i64),
                    &(new.limits.timeout_ms as i64),
                    &(new.limits.memory_mb as i64),
                    &i64::from(new.limits.max_concurrency),
                    &now,
                    &fields.nn,
                    &fields.cache,
                    &fields.rate,
                    &new.signer,
                    &fields.outbound,
                    &fields.validation,
                    &fields.variables,
                ],
            )
            .await?
            .get(0);
        let info = function_info(
            &tx.query_one(
                "SELECT name, created_at, tenant, public FROM functions WHERE name = $1",
                &[&new.function],
            )
            .await?,
        );
        crate::store::pg::bump_changes(&tx).await?;
        tx.commit().await?;
        Ok((new.record(id, version as u32, now), info))
    }

    /// Functions, versions, policies and aliases as of one instant (one REPEATABLE READ
    /// transaction), so a policy never names a version the same read lacks.
    pub async fn state(&self) -> anyhow::Result<super::StoredState> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let state = super::StoredState {
            functions: functions_on(&tx).await?,
            versions: versions_on(&tx).await?,
            traffic: traffic_on(&tx).await?,
            aliases: aliases_on(&tx).await?,
            rollouts: active_rollouts_on(&tx).await?,
            variables: super::variables::variables_on(&tx, None).await?,
        };
        tx.commit().await?;
        Ok(state)
    }

    pub async fn add_blob_owner(&self, digest: &Digest, tenant: &str) -> anyhow::Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO blob_owners (digest, tenant) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&digest.to_string(), &tenant],
            )
            .await?;
        Ok(())
    }

    pub async fn owns_blob(&self, digest: &Digest, tenant: &str) -> anyhow::Result<bool> {
        Ok(self
            .client()
            .await?
            .query_opt(
                "SELECT 1 FROM blob_owners WHERE digest = $1 AND tenant = $2",
                &[&digest.to_string(), &tenant],
            )
            .await?
            .is_some())
    }

    pub async fn delete_function(&self, name: &str) -> anyhow::Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        for table in [
            "traffic",
            "rollouts",
            "rollout_stats",
            "monitor_buckets",
            "monitor_references",
            "monitor_profiles",
            "aliases",
            "versions",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE function = $1"),
                &[&name],
            )
            .await?;
        }
        let n = tx
            .execute("DELETE FROM functions WHERE name = $1", &[&name])
            .await?;
        crate::store::pg::bump_changes(&tx).await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    pub async fn set_traffic(
        &self,
        function: &str,
        alias: Option<&str>,
        change: &TrafficChange<'_>,
    ) -> anyhow::Result<Stored> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now_ms = crate::unix_ms();
        // Changes to one function's policies are ordered by its row lock.
        tx.execute(
            "SELECT 1 FROM functions WHERE name = $1 FOR UPDATE",
            &[&function],
        )
        .await?;
        let stored = stored_rollout(&tx, function).await?;
        let stored_epoch = rollouts::check(function, change.expect, stored.as_ref())?;
        let previous = match alias {
            None => {
                tx.query_opt(
                    "SELECT policy, revision FROM traffic WHERE function = $1",
                    &[&function],
                )
                .await?
            }
            Some(a) => {
                tx.query_opt(
                    "SELECT policy, revision FROM aliases WHERE function = $1 AND alias = $2",
                    &[&function, &a],
                )
                .await?
            }
        }
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)));
        super::StaleRevision::check(change.if_revision, previous.as_ref())?;
        let revision = previous.as_ref().map_or(0, |p| p.1) + 1;
        match alias {
            None => {
                tx.execute(
                    "INSERT INTO traffic (function, policy, revision, updated_at)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (function) DO UPDATE SET policy = excluded.policy,
                         revision = excluded.revision, updated_at = excluded.updated_at",
                    &[&function, &change.policy, &revision, &(now_ms / 1000)],
                )
                .await?
            }
            Some(a) => {
                tx.execute(
                    "INSERT INTO aliases (function, alias, policy, revision, updated_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (function, alias) DO UPDATE SET policy = excluded.policy,
                         revision = excluded.revision, updated_at = excluded.updated_at",
                    &[&function, &a, &change.policy, &revision, &(now_ms / 1000)],
                )
                .await?
            }
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
        )
        .await?;
        let epoch = match change.rollout {
            Some(r) => {
                let fresh = change.expect == Expect::NoActiveRollout;
                Some(upsert_rollout(&tx, function, r, now_ms, stored_epoch, fresh).await?)
            }
            None => None,
        };
        crate::store::pg::bump_changes(&tx).await?;
        tx.commit().await?;
        Ok(Stored {
            revision: revision as u64,
            epoch,
        })
    }

    pub async fn record_rollout(
        &self,
        function: &str,
        actor: Option<&str>,
        kind: &str,
        reason: &str,
        rollout: &Rollout,
        expect: u64,
    ) -> anyhow::Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now_ms = crate::unix_ms();
        tx.execute(
            "SELECT 1 FROM functions WHERE name = $1 FOR UPDATE",
            &[&function],
        )
        .await?;
        let stored = stored_rollout(&tx, function).await?;
        let stored_epoch = rollouts::check(function, Expect::Epoch(expect), stored.as_ref())?;
        let detail = super::rollout_detail(rollout);
        insert_history(&tx, function, now_ms, actor, kind, reason, &detail).await?;
        let epoch = upsert_rollout(&tx, function, rollout, now_ms, stored_epoch, false).await?;
        crate::store::pg::bump_changes(&tx).await?;
        tx.commit().await?;
        Ok(epoch)
    }

    pub async fn active_rollouts(&self) -> anyhow::Result<Vec<Rollout>> {
        let client = self.client().await?;
        active_rollouts_on(&client).await
    }

    pub async fn rollout(&self, function: &str) -> anyhow::Result<Option<Rollout>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT rollout, epoch, driver FROM rollouts WHERE function = $1",
                &[&function],
            )
            .await?;
        Ok(row.and_then(|r| rollouts::decode(&r.get::<_, String>(0), r.get(1), r.get(2))))
    }

    pub async fn previous_traffic(
        &self,
        function: &str,
        alias: Option<&str>,
    ) -> anyhow::Result<Option<(String, String)>> {
        let client = self.client().await?;
        let row = match alias {
            None => {
                client
                    .query_opt(
                        "SELECT h.kind, h.detail FROM history h JOIN traffic t ON t.function = h.function
                         WHERE h.function = $1 AND (h.detail::jsonb ->> 'alias') IS NULL
                           AND (h.detail::jsonb ->> 'revision')::bigint = t.revision
                         ORDER BY h.seq DESC LIMIT 1",
                        &[&function],
                    )
                    .await?
            }
            Some(a) => {
                client
                    .query_opt(
                        "SELECT h.kind, h.detail FROM history h
                         JOIN aliases x ON x.function = h.function AND x.alias = $2
                         WHERE h.function = $1 AND (h.detail::jsonb ->> 'alias') = $2
                           AND (h.detail::jsonb ->> 'revision')::bigint = x.revision
                         ORDER BY h.seq DESC LIMIT 1",
                        &[&function, &a],
                    )
                    .await?
            }
        };
        row.map(|r| previous_of(r.get(0), &r.get::<_, String>(1)))
            .transpose()
    }

    /// The change counter: it moves with every committed change, in commit order.
    pub async fn changes(&self) -> anyhow::Result<i64> {
        let row = self
            .client()
            .await?
            .query_one("SELECT n FROM kiln_changes WHERE id = 1", &[])
            .await?;
        Ok(row.get::<_, i64>(0))
    }

    pub async fn history(
        &self,
        function: &str,
        limit: u32,
        before: Option<i64>,
        tenant: Option<&str>,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        let before = before.unwrap_or(i64::MAX);
        let rows = self
            .client()
            .await?
            .query(
                "SELECT seq, at_ms, actor, kind, reason, detail FROM history
                 WHERE function = $1 AND ($3::text IS NULL OR tenant = $3) AND seq < $4
                 ORDER BY seq DESC LIMIT $2",
                &[&function, &i64::from(limit), &tenant, &before],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                history_entry(
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    r.get(4),
                    &r.get::<_, String>(5),
                )
            })
            .collect())
    }
}

async fn versions_on(c: &impl GenericClient) -> anyhow::Result<Vec<VersionRecord>> {
    let rows = c
        .query(
            &format!("SELECT {VERSION_COLUMNS} FROM versions ORDER BY id"),
            &[],
        )
        .await?;
    rows.iter().map(|r| raw_version(r).decode()).collect()
}

async fn functions_on(c: &impl GenericClient) -> anyhow::Result<Vec<FunctionInfo>> {
    let rows = c
        .query(
            "SELECT name, created_at, tenant, public FROM functions",
            &[],
        )
        .await?;
    Ok(rows.iter().map(function_info).collect())
}

async fn traffic_on(c: &impl GenericClient) -> anyhow::Result<Vec<(String, String, u64)>> {
    let rows = c
        .query("SELECT function, policy, revision FROM traffic", &[])
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as u64))
        .collect())
}

async fn aliases_on(c: &impl GenericClient) -> anyhow::Result<Vec<(String, String, String, u64)>> {
    let rows = c
        .query("SELECT function, alias, policy, revision FROM aliases", &[])
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get::<_, i64>(3) as u64))
        .collect())
}

pub(super) async fn insert_history(
    tx: &impl GenericClient,
    function: &str,
    at_ms: i64,
    actor: Option<&str>,
    kind: &str,
    reason: &str,
    detail: &serde_json::Value,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO history (function, at_ms, actor, kind, reason, detail, tenant)
         VALUES ($1, $2, $3, $4, $5, $6, (SELECT tenant FROM functions WHERE name = $1))",
        &[
            &function,
            &at_ms,
            &actor,
            &kind,
            &reason,
            &detail.to_string(),
        ],
    )
    .await?;
    Ok(())
}

async fn upsert_rollout(
    tx: &impl GenericClient,
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
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (function) DO UPDATE SET rollout = excluded.rollout,
             active = excluded.active, updated_at = excluded.updated_at, epoch = excluded.epoch,
             driver = CASE WHEN $6 THEN NULL ELSE rollouts.driver END,
             lease_until = CASE WHEN $6 THEN 0 ELSE rollouts.lease_until END",
        &[
            &function,
            &json,
            &rollout.state.active(),
            &at_ms,
            &epoch,
            &fresh,
        ],
    )
    .await?;
    Ok(epoch as u64)
}

/// The function's `rollouts` row, locked until the change commits (a lease taken over
/// meanwhile waits for it, or is seen by it).
async fn stored_rollout(
    tx: &impl GenericClient,
    function: &str,
) -> anyhow::Result<Option<RolloutRow>> {
    Ok(tx
        .query_opt(
            "SELECT active, epoch, rollout, driver FROM rollouts WHERE function = $1 FOR UPDATE",
            &[&function],
        )
        .await?
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
}

async fn active_rollouts_on(c: &impl GenericClient) -> anyhow::Result<Vec<Rollout>> {
    let rows = c
        .query(
            "SELECT rollout, epoch, driver FROM rollouts WHERE active",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| rollouts::decode(&r.get::<_, String>(0), r.get(1), r.get(2)))
        .collect())
}
