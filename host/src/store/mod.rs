//! Persistent state in one data directory: `kiln.db` (SQLite, WAL) for metadata and
//! `blobs/` for content-addressed bytes (components now, models later).
//!
//! Invariants: a blob is only ever visible under its real name once its bytes are complete,
//! fsynced and verified against the digest; metadata rows name blobs by digest and are
//! written in one transaction per change, so a crash leaves either the old or the new state.

mod blobs;
mod digest;
mod meta;

pub use blobs::{BlobError, BlobStore, BlobWriter};

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
pub use digest::{Digest, DigestError};
pub use meta::{
    FunctionInfo, MetaStore, NewVersion, NotOwner, Replayed, TrafficChange, VersionRecord,
};
