//! The first answer to each `Idempotency-Key`, kept a day so a client that retries a create
//! (its connection dropped, it cannot tell whether the first try landed) gets that answer
//! again instead of a second key or version.
//!
//! A request *claims* its (scope, key) before doing anything: the claim is one insert, so
//! of two racing requests (two nodes of a cluster included) exactly one runs; the other
//! learns that it is in progress. The winner stores its answer when it succeeds, or gives
//! the claim up when it fails, so a retry of a failed request runs again. A claim whose
//! request never finished (its node died) is taken over after [`ABANDONED_AFTER_MS`].

use rusqlite::{OptionalExtension, params};

use super::{MetaStore, PgMeta, SqliteMeta};

/// How long an answer is kept (and a key cannot be reused for another request).
pub const KEEP_MS: i64 = 24 * 3_600_000;
/// A claim older than this with no answer belongs to a request that died (a deploy's
/// compile takes minutes, never this long).
pub const ABANDONED_AFTER_MS: i64 = 15 * 60_000;

/// What a stored first answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub location: Option<String>,
    pub body: Vec<u8>,
}

/// The outcome of claiming an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody had it: run the request, then [`MetaStore::idempotency_finish`] or
    /// [`MetaStore::idempotency_release`].
    New,
    /// A request with this key is still running.
    InProgress,
    /// The key was used for a different request.
    Reused,
    /// The first request's answer.
    Done(StoredAnswer),
}

fn judge(fingerprint: &str, row: (String, Option<i64>, Option<String>, Option<Vec<u8>>)) -> Claim {
    let (stored, status, location, body) = row;
    if stored != fingerprint {
        return Claim::Reused;
    }
    match status {
        None => Claim::InProgress,
        Some(status) => Claim::Done(StoredAnswer {
            status: status as u16,
            location,
            body: body.unwrap_or_default(),
        }),
    }
}

impl MetaStore {
    /// Claims `key` within `scope` for a request whose content hashes to `fingerprint`.
    pub async fn idempotency_claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        now_ms: i64,
    ) -> anyhow::Result<Claim> {
        on_backend!(self.idempotency_claim(scope, key, fingerprint, now_ms))
    }

    /// Stores the answer of the request that claimed `key`.
    pub async fn idempotency_finish(
        &self,
        scope: &str,
        key: &str,
        answer: &StoredAnswer,
    ) -> anyhow::Result<()> {
        on_backend!(self.idempotency_finish(scope, key, answer))
    }

    /// Gives up the claim of a request that failed: a retry runs again.
    pub async fn idempotency_release(&self, scope: &str, key: &str) -> anyhow::Result<()> {
        on_backend!(self.idempotency_release(scope, key))
    }
}

impl SqliteMeta {
    pub fn idempotency_claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        now_ms: i64,
    ) -> anyhow::Result<Claim> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM idempotency WHERE created_ms < ?1
                OR (status IS NULL AND created_ms < ?2)",
            params![now_ms - KEEP_MS, now_ms - ABANDONED_AFTER_MS],
        )?;
        let claimed = tx.execute(
            "INSERT OR IGNORE INTO idempotency (scope, key, fingerprint, created_ms)
             VALUES (?1, ?2, ?3, ?4)",
            params![scope, key, fingerprint, now_ms],
        )? == 1;
        let claim = if claimed {
            Claim::New
        } else {
            let row = tx
                .query_row(
                    "SELECT fingerprint, status, location, body FROM idempotency
                     WHERE scope = ?1 AND key = ?2",
                    params![scope, key],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            row.map_or(Claim::InProgress, |row| judge(fingerprint, row))
        };
        tx.commit()?;
        Ok(claim)
    }

    pub fn idempotency_finish(
        &self,
        scope: &str,
        key: &str,
        answer: &StoredAnswer,
    ) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE idempotency SET status = ?3, location = ?4, body = ?5
             WHERE scope = ?1 AND key = ?2",
            params![scope, key, answer.status, answer.location, answer.body],
        )?;
        Ok(())
    }

    pub fn idempotency_release(&self, scope: &str, key: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "DELETE FROM idempotency WHERE scope = ?1 AND key = ?2 AND status IS NULL",
            params![scope, key],
        )?;
        Ok(())
    }
}

impl PgMeta {
    pub async fn idempotency_claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        now_ms: i64,
    ) -> anyhow::Result<Claim> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM idempotency WHERE created_ms < $1
                    OR (status IS NULL AND created_ms < $2)",
                &[&(now_ms - KEEP_MS), &(now_ms - ABANDONED_AFTER_MS)],
            )
            .await?;
        let claimed = client
            .execute(
                "INSERT INTO idempotency (scope, key, fingerprint, created_ms)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&scope, &key, &fingerprint, &now_ms],
            )
            .await?
            == 1;
        if claimed {
            return Ok(Claim::New);
        }
        let row = client
            .query_opt(
                "SELECT fingerprint, status, location, body FROM idempotency
                 WHERE scope = $1 AND key = $2",
                &[&scope, &key],
            )
            .await?;
        Ok(row.map_or(Claim::InProgress, |r| {
            let status: Option<i32> = r.get(1);
            judge(
                fingerprint,
                (r.get(0), status.map(i64::from), r.get(2), r.get(3)),
            )
        }))
    }

    pub async fn idempotency_finish(
        &self,
        scope: &str,
        key: &str,
        answer: &StoredAnswer,
    ) -> anyhow::Result<()> {
        self.client()
            .await?
            .execute(
                "UPDATE idempotency SET status = $3, location = $4, body = $5
                 WHERE scope = $1 AND key = $2",
                &[
                    &scope,
                    &key,
                    &i32::from(answer.status),
                    &answer.location,
                    &answer.body,
                ],
            )
            .await?;
        Ok(())
    }

    pub async fn idempotency_release(&self, scope: &str, key: &str) -> anyhow::Result<()> {
        self.client()
            .await?
            .execute(
                "DELETE FROM idempotency WHERE scope = $1 AND key = $2 AND status IS NULL",
                &[&scope, &key],
            )
            .await?;
        Ok(())
    }
}
