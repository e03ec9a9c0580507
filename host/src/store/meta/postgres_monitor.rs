//! PostgreSQL side of [`super::monitor`].

use super::PgMeta;
use super::monitor::{ModelKey, StoredBucket, StoredReference};

impl PgMeta {
    pub async fn publish_monitor_buckets(
        &self,
        function: &str,
        version: u32,
        process: &str,
        buckets: &[StoredBucket],
    ) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let version = i64::from(version);
        // The node's clock: only forgetting reads it, two days on.
        let now = crate::unix_ms();
        for b in buckets {
            tx.execute(
                "INSERT INTO monitor_buckets (function, version, model, span_ms, at, process, counts, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (function, version, model, span_ms, at, process) DO UPDATE SET
                     counts = excluded.counts, updated_at = excluded.updated_at",
                &[
                    &function, &version, &b.model, &b.span_ms, &b.at, &process, &b.counts, &now,
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn monitor_buckets(
        &self,
        key: ModelKey<'_>,
        span_ms: i64,
        from: i64,
        except: &str,
    ) -> anyhow::Result<Vec<String>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT counts FROM monitor_buckets
                 WHERE function = $1 AND version = $2 AND model = $3 AND span_ms = $4 AND at >= $5
                   AND process <> $6",
                &[
                    &key.function,
                    &i64::from(key.version),
                    &key.model,
                    &span_ms,
                    &from,
                    &except,
                ],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn forget_monitor_buckets(&self, before_ms: i64) -> anyhow::Result<u64> {
        Ok(self
            .client()
            .await?
            .execute(
                "DELETE FROM monitor_buckets WHERE updated_at < $1",
                &[&before_ms],
            )
            .await?)
    }

    pub async fn set_monitor_reference(
        &self,
        key: ModelKey<'_>,
        r: &StoredReference,
    ) -> anyhow::Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO monitor_references (function, version, model, counts, window_ms, set_ms, set_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (function, version, model) DO UPDATE SET
                     counts = excluded.counts, window_ms = excluded.window_ms,
                     set_ms = excluded.set_ms, set_by = excluded.set_by",
                &[
                    &key.function,
                    &i64::from(key.version),
                    &key.model,
                    &r.counts,
                    &r.window_ms,
                    &r.set_ms,
                    &r.set_by,
                ],
            )
            .await?;
        Ok(())
    }

    pub async fn monitor_reference(
        &self,
        key: ModelKey<'_>,
    ) -> anyhow::Result<Option<StoredReference>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT counts, window_ms, set_ms, set_by FROM monitor_references
                 WHERE function = $1 AND version = $2 AND model = $3",
                &[&key.function, &i64::from(key.version), &key.model],
            )
            .await?;
        Ok(row.map(|r| StoredReference {
            counts: r.get(0),
            window_ms: r.get(1),
            set_ms: r.get(2),
            set_by: r.get(3),
        }))
    }

    pub async fn agree_monitor_profile(
        &self,
        key: ModelKey<'_>,
        profile: &str,
    ) -> anyhow::Result<String> {
        let client = self.client().await?;
        let version = i64::from(key.version);
        client
            .execute(
                "INSERT INTO monitor_profiles (function, version, model, profile, made_ms)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (function, version, model) DO NOTHING",
                &[
                    &key.function,
                    &version,
                    &key.model,
                    &profile,
                    &crate::unix_ms(),
                ],
            )
            .await?;
        let row = client
            .query_one(
                "SELECT profile FROM monitor_profiles WHERE function = $1 AND version = $2 AND model = $3",
                &[&key.function, &version, &key.model],
            )
            .await?;
        Ok(row.get(0))
    }

    pub async fn earlier_monitor_profile(
        &self,
        key: ModelKey<'_>,
    ) -> anyhow::Result<Option<String>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT profile FROM monitor_profiles WHERE function = $1 AND version < $2 AND model = $3
                 ORDER BY version DESC LIMIT 1",
                &[&key.function, &i64::from(key.version), &key.model],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn monitor_profile(&self, key: ModelKey<'_>) -> anyhow::Result<Option<String>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT profile FROM monitor_profiles WHERE function = $1 AND version = $2 AND model = $3",
                &[&key.function, &i64::from(key.version), &key.model],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }
}
