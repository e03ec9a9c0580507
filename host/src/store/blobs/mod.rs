//! Content-addressed blobs (components, models) and the compiled artifacts made from them,
//! behind one [`BlobStore`] with two backends chosen at startup from `--blobs`:
//!
//! - the local folder `<data>/blobs/sha256/<hex>` (the default): the folder is the truth;
//! - an S3-compatible bucket (`s3://bucket/prefix?endpoint=...&region=...`): the bucket is
//!   the truth, shared by every node, and the data dir only a bounded local cache of it
//!   (deleting the cache loses nothing). Compiled artifacts go to the bucket too, so a
//!   component is compiled once per cluster and mapped everywhere else.
//!
//! Invariants, whichever the backend: a blob is visible under its name only once its bytes
//! are complete and hash to that name; bytes fetched from the bucket are hashed again
//! before anything uses them; uploads and downloads stream through a local file, never
//! whole in memory.

mod folder;
mod shared;

use std::io;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

pub use folder::BlobWriter;
pub use shared::BlobsUrl;

use crate::common::{BlobSource, Digest};
use folder::Folder;
use shared::Shared;

/// Default bound on a cluster node's local cache of blobs and compiled artifacts, in MiB.
pub const DEFAULT_CACHE_MB: u64 = 10_240;

/// Errors from writing or reading blobs that callers (the API) map to statuses.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The uploaded bytes hash to something other than the name they were sent under.
    #[error("digest mismatch: the body hashes to {actual}, not {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    /// The upload went past the configured cap.
    #[error("upload exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// No blob with that digest.
    #[error("blob {0} not found")]
    NotFound(Digest),
    /// The bucket holds other bytes under this blob's name: refused, never used.
    #[error("blob {expected} in the shared store is corrupt: its bytes hash to {actual}")]
    Corrupt { expected: Digest, actual: Digest },
    /// The shared store could not be reached or refused the call.
    #[error("the blob store is unavailable: {0}")]
    Unavailable(String),
    /// Disk trouble.
    #[error("blob storage i/o: {0}")]
    Io(#[from] io::Error),
}

/// The blob store: a local folder, and the shared bucket when there is one.
pub struct BlobStore {
    /// The blobs (single node) or the local cache of the bucket's.
    local: Folder,
    shared: Option<Shared>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl BlobStore {
    /// Opens the folder under `data_dir` (removing temp files a crash left), and the bucket
    /// when `url` names one; `cache_mb` bounds the local copies of a bucket's blobs and
    /// artifacts. Makes no network call: [`check`](Self::check) says whether the bucket
    /// answers.
    pub fn open(data_dir: &Path, url: &BlobsUrl, cache_mb: u64) -> anyhow::Result<Self> {
        let local = Folder::open(
            &data_dir.join("blobs").join("sha256"),
            &data_dir.join("compiled"),
        )?;
        let shared = match url {
            BlobsUrl::Folder => None,
            BlobsUrl::S3(s3) => Some(Shared::open(s3, cache_mb << 20)?),
        };
        Ok(BlobStore { local, shared })
    }

    /// Where blobs live, for logs and `/readyz`.
    pub fn describe(&self) -> String {
        match &self.shared {
            None => format!("folder {}", self.local.dir().display()),
            Some(s) => s.describe(),
        }
    }

    /// `s3` or `folder`: what `/readyz` tells anyone who asks (no bucket or endpoint).
    pub fn kind(&self) -> &'static str {
        match self.shared {
            Some(_) => "s3",
            None => "folder",
        }
    }

    /// Whether blobs live in a bucket shared with other nodes.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The size of blob `digest`, or `None` when the store does not have it.
    pub async fn size(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
        if let Some(size) = self.local.size(digest) {
            return Ok(Some(size));
        }
        match &self.shared {
            Some(s) => s.size(digest).await,
            None => Ok(None),
        }
    }

    /// Starts a streamed upload into a local temp file; `expected` is checked when the
    /// upload is [finished](Self::finish).
    pub fn writer(&self, expected: Option<Digest>, limit: u64) -> io::Result<BlobWriter> {
        self.local.writer(expected, limit)
    }

    /// Verifies and publishes an upload: with a bucket, into the bucket first and only
    /// then under its name in the local cache, so a local copy always means the bucket has
    /// it too (a crash in between leaves only a temp file).
    pub async fn finish(&self, writer: BlobWriter) -> Result<Digest, BlobError> {
        let staged = tokio::task::spawn_blocking(move || writer.verify())
            .await
            .map_err(|e| BlobError::Io(io::Error::other(e)))??;
        if let Some(s) = &self.shared {
            s.upload(&staged.digest(), staged.path()).await?;
        }
        let digest = tokio::task::spawn_blocking(move || staged.publish())
            .await
            .map_err(|e| BlobError::Io(io::Error::other(e)))??;
        if let Some(s) = &self.shared {
            s.trim_cache(&self.local, &self.local.path(&digest));
        }
        Ok(digest)
    }

    /// Stores bytes already in memory (models embedded in a component); returns their digest.
    pub async fn put(&self, bytes: &[u8]) -> Result<Digest, BlobError> {
        let digest = Digest::of(bytes);
        if self.size(&digest).await?.is_some() {
            return Ok(digest);
        }
        let mut w = self.writer(Some(digest), u64::MAX)?;
        w.write_chunk(bytes)?;
        self.finish(w).await
    }

    /// The local path of blob `digest`, downloaded (and verified) first when only the bucket
    /// has it.
    pub async fn local_path(&self, digest: &Digest) -> Result<PathBuf, BlobError> {
        let path = self.local.path(digest);
        if self.local.touch(&path) {
            return Ok(path);
        }
        let Some(s) = &self.shared else {
            return Err(BlobError::NotFound(*digest));
        };
        s.download_blob(digest, &self.local).await?;
        s.trim_cache(&self.local, &path);
        Ok(path)
    }

    /// Whether the store answers: the folder is writable, and the bucket (if any) reachable.
    pub async fn check(&self) -> Result<(), BlobError> {
        self.local.check()?;
        match &self.shared {
            Some(s) => s.check().await,
            None => Ok(()),
        }
    }
}

impl BlobSource for BlobStore {
    fn local(&self, digest: Digest) -> BoxFuture<'_, anyhow::Result<PathBuf>> {
        Box::pin(async move { Ok(self.local_path(&digest).await?) })
    }

    fn fetch_artifact<'a>(
        &'a self,
        name: &'a str,
        dest: &'a Path,
    ) -> BoxFuture<'a, anyhow::Result<bool>> {
        Box::pin(async move {
            let Some(s) = &self.shared else {
                return Ok(false);
            };
            let found = s.download_artifact(name, dest).await?;
            if found {
                s.trim_cache(&self.local, dest);
            }
            Ok(found)
        })
    }

    fn share_artifact<'a>(
        &'a self,
        name: &'a str,
        src: &'a Path,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            match &self.shared {
                Some(s) => Ok(s.upload_artifact(name, src).await?),
                None => Ok(()),
            }
        })
    }
}
