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
pub use digest::{Digest, DigestError};
pub use meta::{FunctionInfo, MetaStore, NewVersion, NotOwner, Replayed, VersionRecord};
