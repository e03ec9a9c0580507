//! SQLite side of [`super::monitor`].

use rusqlite::{OptionalExtension, params};

use super::SqliteMeta;
use super::monitor::{ModelKey, StoredBucket, StoredReference};

impl SqliteMeta {
    pub fn publish_monitor_buckets(
        &self,
        function: &str,
        version: u32,
        process: &str,
        buckets: &[StoredBucket],
    ) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = crate::unix_ms();
        for b in buckets {
            tx.execute(
                "INSERT INTO monitor_buckets (function, version, model, span_ms, at, process, counts, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(function, version, model, span_ms, at, process) DO UPDATE SET
                     counts = excluded.counts, updated_at = excluded.updated_at",
                params![function, version, b.model, b.span_ms, b.at, process, b.counts, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn monitor_buckets(
        &self,
        key: ModelKey<'_>,
        span_ms: i64,
        from: i64,
        except: &str,
    ) -> anyhow::Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT counts FROM monitor_buckets
             WHERE function = ?1 AND version = ?2 AND model = ?3 AND span_ms = ?4 AND at >= ?5
               AND process <> ?6",
        )?;
        let rows = stmt.query_map(
            params![key.function, key.version, key.model, span_ms, from, except],
            |r| r.get(0),
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn forget_monitor_buckets(&self, before_ms: i64) -> anyhow::Result<u64> {
        let n = self.conn().execute(
            "DELETE FROM monitor_buckets WHERE updated_at < ?1",
            params![before_ms],
        )?;
        Ok(n as u64)
    }

    pub fn set_monitor_reference(
        &self,
        key: ModelKey<'_>,
        r: &StoredReference,
    ) -> anyhow::Result<()> {
        self.conn().execute(
            "INSERT INTO monitor_references (function, version, model, counts, window_ms, set_ms, set_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(function, version, model) DO UPDATE SET
                 counts = excluded.counts, window_ms = excluded.window_ms,
                 set_ms = excluded.set_ms, set_by = excluded.set_by",
            params![
                key.function,
                key.version,
                key.model,
                r.counts,
                r.window_ms,
                r.set_ms,
                r.set_by
            ],
        )?;
        Ok(())
    }

    pub fn monitor_reference(&self, key: ModelKey<'_>) -> anyhow::Result<Option<StoredReference>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT counts, window_ms, set_ms, set_by FROM monitor_references
                 WHERE function = ?1 AND version = ?2 AND model = ?3",
                params![key.function, key.version, key.model],
                |r| {
                    Ok(StoredReference {
                        counts: r.get(0)?,
                        window_ms: r.get(1)?,
                        set_ms: r.get(2)?,
                        set_by: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn agree_monitor_profile(
        &self,
        key: ModelKey<'_>,
        profile: &str,
    ) -> anyhow::Result<String> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO monitor_profiles (function, version, model, profile, made_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(function, version, model) DO NOTHING",
            params![
                key.function,
                key.version,
                key.model,
                profile,
                crate::unix_ms()
            ],
        )?;
        Ok(conn.query_row(
            "SELECT profile FROM monitor_profiles WHERE function = ?1 AND version = ?2 AND model = ?3",
            params![key.function, key.version, key.model],
            |r| r.get(0),
        )?)
    }

    pub fn earlier_monitor_profile(&self, key: ModelKey<'_>) -> anyhow::Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT profile FROM monitor_profiles WHERE function = ?1 AND version < ?2 AND model = ?3
                 ORDER BY version DESC LIMIT 1",
                params![key.function, key.version, key.model],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn monitor_profile(&self, key: ModelKey<'_>) -> anyhow::Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT profile FROM monitor_profiles WHERE function = ?1 AND version = ?2 AND model = ?3",
                params![key.function, key.version, key.model],
                |r| r.get(0),
            )
            .optional()?)
    }
}
