//! Content-addressed blob files under `<data>/blobs/sha256/<hex>`.
//!
//! Writes stream into a uniquely named temp file in the same directory while hashing;
//! on finish the digest is checked, the file fsynced, renamed into place and the directory
//! fsynced. A crash mid-upload leaves only a temp file (removed at the next start), never a
//! half blob under a real name.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use super::Digest;

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
    /// Disk trouble.
    #[error("blob storage i/o: {0}")]
    Io(#[from] io::Error),
}

/// The blob directory.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    next_tmp: AtomicU64,
}

impl BlobStore {
    /// Opens (creating) `<data>/blobs`, removing temp files left by a crash.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let dir = data_dir.join("blobs").join("sha256");
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(BlobStore {
            dir,
            next_tmp: AtomicU64::new(0),
        })
    }

    /// The path a blob lives at (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Size of a stored blob, or `None`.
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        fs::metadata(self.path(digest)).ok().map(|m| m.len())
    }

    /// Reads a whole blob.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, BlobError> {
        fs::read(self.path(digest)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BlobError::NotFound(*digest),
            _ => BlobError::Io(e),
        })
    }

    /// Starts a streamed write; `expected` is checked at [`BlobWriter::finish`] when given.
    pub fn writer(&self, expected: Option<Digest>, limit: u64) -> io::Result<BlobWriter> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(".tmp-{}-{n}", std::process::id()));
        let file = File::create(&tmp)?;
        Ok(BlobWriter {
            dir: self.dir.clone(),
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            written: 0,
            limit,
            expected,
        })
    }

    /// Stores bytes already in memory; returns their digest.
    pub fn put(&self, bytes: &[u8]) -> Result<Digest, BlobError> {
        let digest = Digest::of(bytes);
        if self.size(&digest).is_some() {
            return Ok(digest);
        }
        let mut w = self.writer(Some(digest), u64::MAX)?;
        w.write_chunk(bytes)?;
        w.finish()
    }
}

/// An in-progress blob upload. Dropping it without [`finish`](Self::finish) discards it.
#[derive(Debug)]
pub struct BlobWriter {
    dir: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    hasher: Sha256,
    written: u64,
    limit: u64,
    expected: Option<Digest>,
}

impl BlobWriter {
    /// Appends a chunk, failing once the total passes the limit.
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        self.written += chunk.len() as u64;
        if self.written > self.limit {
            return Err(BlobError::TooLarge { limit: self.limit });
        }
        self.hasher.update(chunk);
        match self.file.as_mut() {
            Some(f) => f.write_all(chunk)?,
            None => {
                return Err(BlobError::Io(io::Error::other(
                    "blob writer already finished",
                )));
            }
        }
        Ok(())
    }

    /// Verifies, fsyncs and publishes the blob under its digest.
    pub fn finish(mut self) -> Result<Digest, BlobError> {
        let actual = Digest(self.hasher.clone().finalize().into());
        if let Some(expected) = self.expected
            && expected != actual
        {
            return Err(BlobError::DigestMismatch { expected, actual });
        }
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("blob writer already finished"))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&self.tmp, self.dir.join(actual.hex()))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(actual)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // After a successful rename the temp path no longer exists; otherwise discard.
        let _ = fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-blobs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn blob_write_verifies_digest_and_publishes() {
        let dir = temp_dir("ok");
        let store = BlobStore::open(&dir).expect("open");
        let d = Digest::of(b"abc");
        let mut w = store.writer(Some(d), 10).expect("writer");
        w.write_chunk(b"ab").expect("chunk");
        w.write_chunk(b"c").expect("chunk");
        assert_eq!(w.finish().expect("finish"), d);
        assert_eq!(store.read(&d).expect("read"), b"abc");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn blob_write_wrong_digest_leaves_nothing() {
        let dir = temp_dir("bad");
        let store = BlobStore::open(&dir).expect("open");
        let d = Digest::of(b"other");
        let mut w = store.writer(Some(d), 10).expect("writer");
        w.write_chunk(b"abc").expect("chunk");
        assert!(matches!(w.finish(), Err(BlobError::DigestMismatch { .. })));
        assert_eq!(
            fs::read_dir(dir.join("blobs/sha256")).expect("dir").count(),
            0
        );
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn blob_write_over_limit_fails() {
        let dir = temp_dir("big");
        let store = BlobStore::open(&dir).expect("open");
        let mut w = store.writer(None, 2).expect("writer");
        assert!(matches!(
            w.write_chunk(b"abc"),
            Err(BlobError::TooLarge { limit: 2 })
        ));
        let _ = fs::remove_dir_all(dir);
    }
}
