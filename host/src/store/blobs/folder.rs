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
        for d in [dir, compiled] {
            let Ok(entries) = fs::read_dir(d) else {
                continue;
            };
            for entry in entries.flatten() {
                if is_temp(&entry.file_name().to_string_lossy()) {
                    let _ = fs::remove_file(entry.path());
                }
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

    /// Removes the least recently used files (blobs and compiled artifacts) until they
    /// take at most `limit` bytes; returns how many it removed. `keep`, and whatever was
    /// used in the last [`IN_USE`] (a reader may be about to open it), stay. Only for a
    /// cache: on a single node the folder is the truth and is never trimmed.
    pub(super) fn trim(&self, limit: u64, keep: &Path) -> usize {
        let files = self.cached_files();
        let mut total: u64 = files.iter().map(|(_, _, n)| n).sum();
        let recent = std::time::SystemTime::now()
            .checked_sub(IN_USE)
            .unwrap_or(std::time::UNIX_EPOCH);
        let mut removed = 0;
        for (used, path, size) in files {
            if total <= limit {
                break;
            }
            if path != keep && used < recent && fs::remove_file(&path).is_ok() {
                total -= size;
                removed += 1;
                tracing::debug!(path = %path.display(), size, "evicted from the local blob cache");
            }
        }
        removed
    }

    /// Every file of the cache (blobs and compiled artifacts, no temp files): last use,
    /// path and size, least recently used first.
    fn cached_files(&self) -> Vec<(std::time::SystemTime, PathBuf, u64)> {
        let mut files = Vec::new();
        for dir in [&self.dir, &self.compiled] {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if is_temp(&entry.file_name().to_string_lossy()) {
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
        files
    }
}

/// Files used this recently are never evicted: whoever just asked for one may not have
/// opened it yet.
const IN_USE: std::time::Duration = std::time::Duration::from_secs(60);

/// Temp files of uploads, downloads and compiles (`.tmp-*`, `*.tmp-*`): never cached
/// content, removed at start.
fn is_temp(name: &str) -> bool {
    name.starts_with(".tmp-") || name.contains(".tmp-")
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
    pub(super) fn finish(self) -> Result<Digest, BlobError> {
        self.verify()?.publish()
    }

    /// Verifies the digest and fsyncs the temp file, without publishing it yet.
    pub(super) fn verify(mut self) -> Result<Staged, BlobError> {
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
        Ok(Staged {
            dir: self.dir.clone(),
            tmp: std::mem::take(&mut self.tmp),
            digest: actual,
        })
    }
}

/// A verified upload not yet under its name: removed when dropped unpublished.
#[derive(Debug)]
pub(super) struct Staged {
    dir: PathBuf,
    tmp: PathBuf,
    digest: Digest,
}

impl Staged {
    /// The temp file holding the verified bytes.
    pub(super) fn path(&self) -> &Path {
        &self.tmp
    }

    pub(super) fn digest(&self) -> Digest {
        self.digest
    }

    /// Renames the bytes into place under their digest and fsyncs the directory.
    pub(super) fn publish(mut self) -> Result<Digest, BlobError> {
        let tmp = std::mem::take(&mut self.tmp);
        fs::rename(&tmp, self.dir.join(self.digest.hex()))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(self.digest)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Once verified, the temp file belongs to its `Staged`; otherwise discard.
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
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
        // The oldest, once used again, is the newest, and too recent to evict at all.
        assert!(store.touch(&paths[0]));
        assert_eq!(store.trim(8, &paths[1]), 1);
        assert!(paths[0].exists() && paths[1].exists() && !paths[2].exists());
        assert_eq!(store.trim(0, &paths[1]), 0, "kept, and just used");
        assert!(paths[0].exists() && paths[1].exists());
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
