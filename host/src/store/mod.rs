//! Durable state behind one interface per concern, each with two backends: the metadata
//! ([`MetaStore`]: SQLite `kiln.db`, or PostgreSQL) and the blobs ([`BlobStore`]: the
//! `blobs/` folder, or an S3-compatible bucket with a local cache).
//!
//! Invariants: a blob is only ever visible under its real name once its bytes are complete,
//! fsynced and verified against the digest; metadata rows name blobs by digest and are
//! written in one transaction per change, so a crash leaves either the old or the new state.

mod blobs;
pub mod copy;
mod meta;
pub mod pg;
mod pg_tls;

pub use blobs::{BlobError, BlobStore, BlobWriter, BlobsUrl, DEFAULT_CACHE_MB};

/// Where the database is, as `--database` / `KILN_DATABASE_URL` / `[store] database`
/// names it.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite` (the default): `kiln.db`, `audit.db` and `usage.db` in the data dir.
    #[default]
    Sqlite,
    /// `postgres://user[:password]@host[:port]/dbname`, shared by a cluster's nodes.
    Postgres(String),
}

/// Never prints the URL: it may hold a password.
impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseUrl::Sqlite => f.write_str("Sqlite"),
            DatabaseUrl::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "sqlite" => Ok(DatabaseUrl::Sqlite),
            s if s.starts_with("postgres://") || s.starts_with("postgresql://") => {
                pg_tls::parse(s).map_err(|e| format!("{e:#}"))?;
                Ok(DatabaseUrl::Postgres(s.to_string()))
            }
            _ => Err(
                "invalid database URL: use sqlite (the default) or postgres://user[:password]@host[:port]/dbname"
                    .to_string(),
            ),
        }
    }
}

/// Whether `e` says the database could not be reached (no connection from the pool, or a
/// connection that broke), as opposed to a query it refused: such calls answer 503
/// `store.unavailable`, not 500.
pub fn unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<deadpool_postgres::PoolError>()
            || c.downcast_ref::<tokio_postgres::Error>().is_some_and(|e| {
                let sqlstate = e.code().map(|c| c.code());
                e.is_closed()
                    || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
                    // connection exceptions, shutting down, starting up, too many clients
                    || sqlstate.is_some_and(|c| {
                        c.starts_with("08") || ["57P01", "57P02", "57P03", "53300"].contains(&c)
                    })
            })
    })
}

/// Runs `f` on a SQLite connection off the async workers (a commit may wait for the disk).
pub async fn on_sqlite<T: Send + 'static>(
    conn: &std::sync::Arc<std::sync::Mutex<rusqlite::Connection>>,
    f: impl FnOnce(&rusqlite::Connection) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || f(&conn.lock().unwrap_or_else(|p| p.into_inner())))
        .await
        .map_err(|e| anyhow::anyhow!("database task: {e}"))?
}

/// How much a SQLite commit waits for the disk (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Survives a crash of the process; a power cut may lose the last commits (WAL).
    Normal,
    /// Each commit is on disk when it returns.
    Full,
}

/// Opens (creating) a SQLite database the way every Kiln database is opened: WAL, the
/// given durability, a 5 s busy timeout. `what` names it in errors.
pub fn open_sqlite(
    path: &std::path::Path,
    sync: Sync,
    what: &str,
) -> anyhow::Result<rusqlite::Connection> {
    use anyhow::Context;
    let conn = rusqlite::Connection::open(path)
        .with_context(|| format!("opening {what} {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let level = match sync {
        Sync::Normal => "NORMAL",
        Sync::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", level)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}
pub use meta::{
    Claim, Expect, FunctionInfo, KEEP_BUCKETS_MS, MetaStore, ModelKey, NewVersion, NodeReport,
    NotOwner, PgMeta, PublishedStats, Replayed, RolloutMoved, SqliteMeta, StaleRevision, Stored,
    StoredAnswer, StoredBucket, StoredReference, StoredState, TrafficChange, VariablesChange,
    VersionRecord,
};
