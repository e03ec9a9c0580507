//! The first answer to each `Idempotency-Key`, kept a day so a client that retries a create
//! (its connection dropped, it cannot tell whether the first try landed) gets that answer
//! again instead of a second key or version.
//!
//! A request *claims* its (scope, key) before doing anything: the claim is one insert, so
//! of two racing requests (two nodes of a cluster included) exactly one runs; the other
//! learns that it is in progress. The winner stores its answer when it succeeds, or gives
//! the claim up when it fails, so a retry of a failed request runs again. A claim whose
//! request never finished (its node died) is taken over after [`ABANDONED_AFTER_MS`].
//!
//! Each claim carries a random token that its own request presents to finish or give it
//! up: a request that outlived its claim (taken over as abandoned) can neither write its
//! answer over the new claim's nor delete it. On PostgreSQL the database's clock dates
//! claims, so nodes whose clocks disagree still agree on which claims are abandoned.

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
    /// Claims `key` within `scope` for a request whose content hashes to `fingerprint`,
    /// under `token` (random, the request's own). `at` dates the claim in unix ms; `None`
    /// takes the store's clock (the database's, on PostgreSQL).
    pub async fn idempotency_claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        token: &str,
        at: Option<i64>,
    ) -> anyhow::Result<Claim> {
        on_backend!(self.idempotency_claim(scope, key, fingerprint, token, at))
    }

    /// Stores the answer of the request that claimed `key` with `token`; `false` when the
    /// claim is no longer that request's (taken over as abandoned).
    pub async fn idempotency_finish(
        &self,
        scope: &str,
        key: &str,
        token: &str,
        answer: &StoredAnswer,
    ) -> anyhow::Result<bool> {
        on_backend!(self.idempotency_finish(scope, key, token, answer))
    }

    /// Gives up the claim `token` holds, for a request that failed: a retry runs again.
    /// `false` when the claim is no longer that request's.
    pub async fn idempotency_release(
        &self,
        scope: &str,
        key: &str,
        token: &str,
    ) -> anyhow::Result<bool> {
        on_backend!(self.idempotency_release(scope, key, token))
    }
}

impl SqliteMeta {
    pub fn idempotency_claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        token: &str,
        at: Option<i64>,
    ) -> anyhow::Result<Claim> {
        let now_ms = at.unwrap_or_else(crate::unix_ms);
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM idempotency WHERE created_ms < ?1
                OR (status IS NULL AND created_ms < ?2)",
            params![now_ms - KEEP_MS, now_ms - ABANDONED_AFTER_MS],
        )?;
        let claimed = tx.execute(
            "INSERT OR IGNORE INTO idempotency (scope, key, fingerprint, created_ms, token)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![scope, key, fingerprint, now_ms, token],
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
        token: &str,
        answer: &StoredAnswer,
    ) -> anyhow::Result<bool> {
        let changed = self.conn().execute(
            "UPDATE idempotency SET status = ?4, location = ?5, body = ?6
             WHERE scope = ?1 AND key = ?2 AND token = ?3 AND status IS NULL",
            params![
                scope,
                key,
                token,
                answer.status,
                answer.location,
                answer.body
            ],
        )?;
        Ok(changed == 1)
    }

    pub fn idempotency_release(&self, scope: &str, key: &str, token: &str) -> anyhow::Result<bool> {
        let changed = self.conn().execute(
            "DELETE FROM idempotency
             WHERE scope = ?1 AND key = ?2 AND token = ?3 AND status IS NULL",
            params![scope, key, token],
        )?;
        Ok(changed == 1)
    }
}

impl PgMeta {
    pub async fn idempotency_claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        token: &str,
        at: Option<i64>,
    ) -> anyhow::Result<Claim> {
        let client = self.client().await?;
        // One clock for every node: the database's.
        let now_ms: i64 = match at {
            Some(at) => at,
            None => client
                .query_one(
                    "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                    &[],
                )
                .await?
                .get(0),
        };
        client
            .execute(
                "DELETE FROM idempotency WHERE created_ms < $1
                    OR (status IS NULL AND created_ms < $2)",
                &[&(now_ms - KEEP_MS), &(now_ms - ABANDONED_AFTER_MS)],
            )
            .await?;
        let claimed = client
            .execute(
                "INSERT INTO idempotency (scope, key, fingerprint, created_ms, token)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[&scope, &key, &fingerprint, &now_ms, &token],
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
        token: &str,
        answer: &StoredAnswer,
    ) -> anyhow::Result<bool> {
        let changed = self
            .client()
            .await?
            .execute(
                "UPDATE idempotency SET status = $4, location = $5, body = $6
                 WHERE scope = $1 AND key = $2 AND token = $3 AND status IS NULL",
                &[
                    &scope,
                    &key,
                    &token,
                    &i32::from(answer.status),
                    &answer.location,
                    &answer.body,
                ],
            )
            .await?;
        Ok(changed == 1)
    }

    pub async fn idempotency_release(
        &self,
        scope: &str,
        key: &str,
        token: &str,
    ) -> anyhow::Result<bool> {
        let changed = self
            .client()
            .await?
            .execute(
                "DELETE FROM idempotency
                 WHERE scope = $1 AND key = $2 AND token = $3 AND status IS NULL",
                &[&scope, &key, &token],
            )
            .await?;
        Ok(changed == 1)
    }
}
