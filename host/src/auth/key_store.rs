//! Where API keys are kept: the `api_keys` table of `kiln.db` (SQLite) or of the cluster's
//! PostgreSQL database. Only hashes are stored. Every change is on disk before it returns
//! (SQLite: `synchronous = FULL` for the change; PostgreSQL: a committed transaction), so
//! a revocation survives a power cut.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use deadpool_postgres::Pool;
use rusqlite::{Connection, params};

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS api_keys (
    id          TEXT PRIMARY KEY,
    hash        BLOB NOT NULL UNIQUE,
    tenant      TEXT NOT NULL,
    scopes      TEXT NOT NULL,      -- JSON array of scope strings
    rate        TEXT,
    created_at  INTEGER NOT NULL,
    created_by  TEXT,
    revoked_at  INTEGER
);
";

/// One stored key, as both backends keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub id: String,
    /// SHA-256 of the secret.
    pub hash: Vec<u8>,
    pub tenant: String,
    /// JSON array of scope strings.
    pub scopes: String,
    pub rate: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub created_by: Option<String>,
    pub revoked_at: Option<i64>,
}

/// The key table, on the server's database.
pub enum KeyStore {
    Sqlite(Arc<Mutex<Connection>>),
    Postgres(Pool),
}

impl KeyStore {
    /// The table in the SQLite database at `path` (created if missing).
    pub fn sqlite(path: &Path) -> anyhow::Result<KeyStore> {
        let conn = crate::store::open_sqlite(path, crate::store::Sync::Normal, "database")?;
        conn.execute_batch(SQLITE_SCHEMA)
            .context("creating the key table")?;
        Ok(KeyStore::Sqlite(Arc::new(Mutex::new(conn))))
    }

    /// Every key, revoked ones included.
    pub async fn load(&self) -> anyhow::Result<Vec<KeyRow>> {
        const SQL: &str = "SELECT id, hash, tenant, scopes, rate, created_at, created_by, revoked_at FROM api_keys";
        match self {
            KeyStore::Sqlite(conn) => {
                crate::store::on_sqlite(conn, |conn| {
                    let mut stmt = conn.prepare(SQL)?;
                    let rows = stmt.query_map([], |r| {
                        Ok(KeyRow {
                            id: r.get(0)?,
                            hash: r.get(1)?,
                            tenant: r.get(2)?,
                            scopes: r.get(3)?,
                            rate: r.get(4)?,
                            created_at: r.get(5)?,
                            created_by: r.get(6)?,
                            revoked_at: r.get(7)?,
                        })
                    })?;
                    Ok(rows.collect::<Result<_, _>>()?)
                })
                .await
            }
            KeyStore::Postgres(pool) => {
                let rows = pool.get().await?.query(SQL, &[]).await?;
                Ok(rows
                    .iter()
                    .map(|r| KeyRow {
                        id: r.get(0),
                        hash: r.get(1),
                        tenant: r.get(2),
                        scopes: r.get(3),
                        rate: r.get(4),
                        created_at: r.get(5),
                        created_by: r.get(6),
                        revoked_at: r.get(7),
                    })
                    .collect())
            }
        }
    }

    /// Stores a new key.
    pub async fn insert(&self, k: &KeyRow) -> anyhow::Result<()> {
        match self {
            KeyStore::Sqlite(conn) => {
                let k = k.clone();
                crate::store::on_sqlite(conn, move |conn| {
                    durably(conn, |conn| {
                        conn.execute(
                            "INSERT INTO api_keys (id, hash, tenant, scopes, rate, created_at, created_by)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                            params![
                                k.id,
                                k.hash,
                                k.tenant,
                                k.scopes,
                                k.rate,
                                k.created_at,
                                k.created_by
                            ],
                        )
                    })
                })
                .await
            }
            KeyStore::Postgres(pool) => {
                let mut client = pool.get().await?;
                let tx = client.transaction().await?;
                tx.execute(
                    // Nodes starting together adopt the same KILN_ADMIN_KEY: one row.
                    "INSERT INTO api_keys (id, hash, tenant, scopes, rate, created_at, created_by)
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                    &[
                        &k.id,
                        &k.hash,
                        &k.tenant,
                        &k.scopes,
                        &k.rate,
                        &k.created_at,
                        &k.created_by,
                    ],
                )
                .await?;
                crate::store::pg::bump_changes(&tx).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// Marks key `id` revoked at `at` (unix seconds), unless it already is.
    pub async fn revoke(&self, id: &str, at: i64) -> anyhow::Result<()> {
        match self {
            KeyStore::Sqlite(conn) => {
                let id = id.to_string();
                crate::store::on_sqlite(conn, move |conn| {
                    durably(conn, |conn| {
                        conn.execute(
                            "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                            params![id, at],
                        )
                    })
                })
                .await
            }
            KeyStore::Postgres(pool) => {
                let mut client = pool.get().await?;
                let tx = client.transaction().await?;
                tx.execute(
                    "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                    &[&id, &at],
                )
                .await?;
                crate::store::pg::bump_changes(&tx).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }
}

/// Runs `f` with its commit synced to disk before it returns.
fn durably(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<usize>,
) -> anyhow::Result<()> {
    conn.pragma_update(None, "synchronous", "FULL")?;
    let result = f(conn);
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    result?;
    Ok(())
}
