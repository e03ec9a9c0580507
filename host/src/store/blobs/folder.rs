//! The local folder of blob files, `<data>/blobs/sha256/<hex>`: the blobs themselves on a
//! single node, the local cache of the bucket's on a cluster node.
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

use super::BlobError;
use crate::common::Digest;

/// The blob directory, and the compiled-artifact directory it shares a cache bound with.
#[derive(Debug)]
pub(super) struct Folder {
    dir: PathBuf,
    compiled: PathBuf,
    next_tmp: AtomicU64,
}

impl Folder {
    /// Opens (creating) `dir`, removing temp files left by a crash.
    pub(super) fn open(dir: &Path, compiled: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Folder {
            dir: dir.to_path_buf(),
            compiled: compiled.to_path_buf(),
            next_tmp: AtomicU64::new(0),
        })
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path a blob lives at (whether or not it exists).
    pub(super) fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Size of a stored blob, or `None`.
    pub(super) fn size(&self, digest: &Digest) -> Option<u64> {
        fs::metadata(self.path(digest)).ok().map(|m| m.len())
    }

    /// Whether the file at `path` exists; marks it used (its modification time orders the
    /// cache's evictions).
    pub(super) fn touch(&self, path: &Path) -> bool {
        match fs::File::options().append(true).open(path) {
            Ok(f) => {
                let _ = f.set_modified(std::time::SystemTime::now());
                true
            }
            Err(_) => path.exists(),
        }
    }

    /// A fresh temp path in the same directory as `path` (so a rename publishes it).
    pub(super) fn temp_beside(&self, path: &Path) -> PathBuf {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let dir = path.parent().unwrap_or(&self.dir);
        dir.join(format!(".tmp-{}-{n}", std::process::id()))
    }

    /// Starts a streamed write; `expected` is checked at [`BlobWriter::finish`] when given.
    pub(super) fn writer(&self, expected: Option<Digest>, limit: u64) -> io::Result<BlobWriter> {
        let tmp = self.temp_beside(&self.dir.join("x"));
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

    /// Whether the folder is there and writable.
    pub(super) fn check(&self) -> io::Result<()> {
        let probe = self.temp_beside(&self.dir.join("x"));
        File::create(&probe)?;
        fs::remove_file(&probe)
    }

    /// Removes the least recently used files (blobs and compiled artifacts) but `keep`
    /// until they take at most `limit` bytes; returns how many it removed. Only for a
    /// cache: on a single node the folder is the truth and is never trimmed.
    pub(super) fn trim(&self, limit: u64, keep: &Path) -> usize {
        let files = self.cached_files();
        let mut total: u64 = files.iter().map(|(_, n)| n).sum();
        let mut removed = 0;
        for (path, size) in files {
            if total <= limit {
                break;
            }
            if path != keep && fs::remove_file(&path).is_ok() {
                total -= size;
                removed += 1;
                tracing::debug!(path = %path.display(), size, "evicted from the local blob cache");
            }
        }
        removed
    }

    /// Every file of the cache (blobs and compiled artifacts, no temp files): path and size,
    /// least recently used first.
    fn cached_files(&self) -> Vec<(PathBuf, u64)> {
        let mut files = Vec::new();
        for dir in [&self.dir, &self.compiled] {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                    continue;
                }
                if let Ok(m) = entry.metadata()
                    && m.is_file()
                {
                    let used = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                    files.push((used, entry.path(), m.len()));
                }
            }
        }
        files.sort();
        files.into_iter().map(|(_, p, n)| (p, n)).collect()
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

    /// Verifies, fsyncs and publishes the blob under its digest (in the folder only: the
    /// store's [`finish`](super::BlobStore::finish) also puts it in the bucket).
    pub(super) fn finish(mut self) -> Result<Digest, BlobError> {
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

    fn open(dir: &Path) -> Folder {
        Folder::open(&dir.join("blobs/sha256"), &dir.join("compiled")).expect("open")
    }

    #[test]
    fn blob_write_verifies_digest_and_publishes() {
        let dir = temp_dir("ok");
        let store = open(&dir);
        let d = Digest::of(b"abc");
        let mut w = store.writer(Some(d), 10).expect("writer");
        w.write_chunk(b"ab").expect("chunk");
        w.write_chunk(b"c").expect("chunk");
        assert_eq!(w.finish().expect("finish"), d);
        assert_eq!(fs::read(store.path(&d)).expect("read"), b"abc");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn blob_write_wrong_digest_leaves_nothing() {
        let dir = temp_dir("bad");
        let store = open(&dir);
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
    fn trim_evicts_the_least_recently_used_first() {
        let dir = temp_dir("trim");
        let store = open(&dir);
        let mut paths = Vec::new();
        for (i, bytes) in [b"aaaa", b"bbbb", b"cccc"].iter().enumerate() {
            let mut w = store.writer(None, 10).expect("writer");
            w.write_chunk(*bytes).expect("chunk");
            let path = store.path(&w.finish().expect("finish"));
            let f = File::options().append(true).open(&path).expect("open");
            f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64))
                .expect("mtime");
            paths.push(path);
        }
        // The oldest, once used again, is the newest.
        assert!(store.touch(&paths[0]));
        assert_eq!(store.trim(8, &paths[1]), 1);
        assert!(paths[0].exists() && paths[1].exists() && !paths[2].exists());
        assert_eq!(store.trim(0, &paths[1]), 1);
        assert!(!paths[0].exists() && paths[1].exists());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn blob_write_over_limit_fails() {
        let dir = temp_dir("big");
        let store = open(&dir);
        let mut w = store.writer(None, 2).expect("writer");
        assert!(matches!(
            w.write_chunk(b"abc"),
            Err(BlobError::TooLarge { limit: 2 })
        ));
        let _ = fs::remove_dir_all(dir);
    }
}
