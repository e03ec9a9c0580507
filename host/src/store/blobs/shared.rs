//! The bucket behind a cluster's blobs: an S3-compatible object store reached with
//! `object_store`, keyed `<prefix>/blobs/sha256/<hex>` and `<prefix>/compiled/<name>`.
//!
//! Uploads stream from the local file (multipart past one part); downloads stream into a
//! temp file beside their destination while hashing, and only verified bytes are renamed
//! into place. The local copies are a cache bounded by size, least recently used evicted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{
    GetOptions, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, WriteMultipart,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::BlobError;
use super::folder::Folder;
use crate::common::Digest;

/// Bytes per part of a multipart upload, and the largest upload sent in one request.
const PART_BYTES: usize = 8 << 20;
/// Parts of one upload in flight at once (so at most this many parts are in memory).
const PARTS_IN_FLIGHT: usize = 2;
/// Bound on one call to the bucket that moves no body (head, probe).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where blobs are stored, as `--blobs` / `KILN_BLOBS_URL` / `[store] blobs` names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BlobsUrl {
    /// `<data>/blobs` (the default).
    #[default]
    Folder,
    /// An S3-compatible bucket.
    S3(S3Url),
}

/// `s3://bucket[/prefix]?endpoint=http://host:port&region=R`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// A custom endpoint (MinIO, Ceph, moto...): requests are path-style.
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

impl std::str::FromStr for BlobsUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() || s == "folder" || s == "local" {
            return Ok(BlobsUrl::Folder);
        }
        let Some(rest) = s.strip_prefix("s3://") else {
            return Err(format!(
                "invalid blobs URL {s:?}: use s3://bucket[/prefix]?endpoint=http://host:port&region=R, or leave it unset for the local folder"
            ));
        };
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(format!("invalid blobs URL {s:?}: no bucket name"));
        }
        let mut url = S3Url {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: None,
            region: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = crate::api::percent_decode(v)?;
            match k {
                "endpoint" => url.endpoint = Some(v),
                "region" => url.region = Some(v),
                other => {
                    return Err(format!(
                        "invalid blobs URL {s:?}: unknown parameter {other:?} (known: endpoint, region)"
                    ));
                }
            }
        }
        Ok(BlobsUrl::S3(url))
    }
}

/// The bucket, and the bound on the local cache of it.
pub(super) struct Shared {
    store: Arc<AmazonS3>,
    url: S3Url,
    cache_bytes: u64,
    /// One trim at a time; a trim that finds one running is skipped.
    trimming: std::sync::Mutex<()>,
}

impl Shared {
    /// Builds the client (credentials from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, or the platform's usual sources); no request is made.
    pub(super) fn open(url: &S3Url, cache_bytes: u64) -> anyhow::Result<Self> {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&url.bucket);
        if let Some(region) = &url.region {
            builder = builder.with_region(region);
        }
        if let Some(endpoint) = &url.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let store = builder
            .build()
            .map_err(|e| anyhow::anyhow!("configuring the blob bucket {}: {e}", url.bucket))?;
        Ok(Shared {
            store: Arc::new(store),
            url: url.clone(),
            cache_bytes,
            trimming: std::sync::Mutex::new(()),
        })
    }

    pub(super) fn describe(&self) -> String {
        let mut s = format!("s3://{}", self.url.bucket);
        if !self.url.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.url.prefix);
        }
        if let Some(e) = &self.url.endpoint {
            s.push_str(&format!(" at {e}"));
        }
        s
    }

    fn key(&self, parts: &[&str]) -> Key {
        let mut all: Vec<&str> = Vec::with_capacity(parts.len() + 1);
        if !self.url.prefix.is_empty() {
            all.extend(self.url.prefix.split('/').filter(|p| !p.is_empty()));
        }
        all.extend_from_slice(parts);
        Key::from_iter(all)
    }

    fn blob_key(&self, digest: &Digest) -> Key {
        self.key(&["blobs", "sha256", &digest.hex()])
    }

    fn artifact_key(&self, name: &str) -> Key {
        self.key(&["compiled", name])
    }

    async fn head(&self, key: &Key) -> Result<Option<u64>, BlobError> {
        let options = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        match tokio::time::timeout(CALL_TIMEOUT, self.store.get_opts(key, options)).await {
            Ok(Ok(r)) => Ok(Some(r.meta.size)),
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(None),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(BlobError::Unavailable(format!(
                "no answer from {} within {CALL_TIMEOUT:?}",
                self.describe()
            ))),
        }
    }

    /// The size of blob `digest` in the bucket, or `None`.
    pub(super) async fn size(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
        self.head(&self.blob_key(digest)).await
    }

    /// Whether the bucket is there and takes writes: a marker object is read, and written
    /// when missing (S3 answers a missing bucket like a missing object, so only a write
    /// tells them apart).
    pub(super) async fn check(&self) -> Result<(), BlobError> {
        let key = self.key(&["ready"]);
        if self.head(&key).await?.is_some() {
            return Ok(());
        }
        let put = self.store.put_opts(
            &key,
            PutPayload::from_static(b"kiln"),
            PutOptions::default(),
        );
        match tokio::time::timeout(CALL_TIMEOUT, put).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(BlobError::Unavailable(format!(
                "no answer from {} within {CALL_TIMEOUT:?}",
                self.describe()
            ))),
        }
    }

    /// Puts the verified bytes of blob `digest` (at `path`) into the bucket, writing over
    /// whatever is there: a damaged object is repaired by the next upload of its bytes.
    pub(super) async fn upload(&self, digest: &Digest, path: &Path) -> Result<(), BlobError> {
        self.upload_file(&self.blob_key(digest), path).await
    }

    /// Shares a compiled artifact (overwriting: same name, same engine, same bytes).
    pub(super) async fn upload_artifact(&self, name: &str, src: &Path) -> Result<(), BlobError> {
        self.upload_file(&self.artifact_key(name), src).await
    }

    async fn upload_file(&self, key: &Key, path: &Path) -> Result<(), BlobError> {
        let mut file = tokio::fs::File::open(path).await?;
        let len = file.metadata().await?.len();
        if len <= PART_BYTES as u64 {
            let mut buf = Vec::with_capacity(len as usize);
            file.read_to_end(&mut buf).await?;
            self.store
                .put_opts(key, PutPayload::from(buf), PutOptions::default())
                .await
                .map_err(unavailable)?;
            return Ok(());
        }
        let upload = self
            .store
            .put_multipart_opts(key, PutMultipartOptions::default())
            .await
            .map_err(unavailable)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; 1 << 20];
        let result: Result<(), BlobError> = async {
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(unavailable)?;
                writer.write(&buf[..n]);
            }
        }
        .await;
        match result {
            Ok(()) => {
                writer.finish().await.map_err(unavailable)?;
                Ok(())
            }
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Downloads blob `digest` into the local folder, hashing as it streams; bytes that do
    /// not hash to the digest are dropped and reported as [`BlobError::Corrupt`].
    pub(super) async fn download_blob(
        &self,
        digest: &Digest,
        local: &Folder,
    ) -> Result<(), BlobError> {
        let result = self
            .store
            .get_opts(&self.blob_key(digest), GetOptions::default())
            .await;
        let mut stream = match result {
            Ok(r) => r.into_stream(),
            Err(object_store::Error::NotFound { .. }) => return Err(BlobError::NotFound(*digest)),
            Err(e) => return Err(unavailable(e)),
        };
        let mut writer = local.writer(Some(*digest), u64::MAX)?;
        while let Some(chunk) = stream.next().await {
            writer.write_chunk(&chunk.map_err(unavailable)?)?;
        }
        match tokio::task::spawn_blocking(move || writer.finish()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(BlobError::DigestMismatch { expected, actual })) => {
                tracing::error!(%expected, %actual, store = %self.describe(), "corrupt blob in the shared store refused");
                Err(BlobError::Corrupt { expected, actual })
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(BlobError::Io(std::io::Error::other(e))),
        }
    }

    /// Downloads compiled artifact `name` to `dest` (temp file, fsync, rename); `false`
    /// when the bucket has none.
    pub(super) async fn download_artifact(
        &self,
        name: &str,
        dest: &Path,
    ) -> Result<bool, BlobError> {
        let result = self
            .store
            .get_opts(&self.artifact_key(name), GetOptions::default())
            .await;
        let mut stream = match result {
            Ok(r) => r.into_stream(),
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(unavailable(e)),
        };
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let tmp = TempFile(temp_path(dest));
        let written: Result<(), BlobError> = async {
            let mut file = tokio::fs::File::create(&tmp.0).await?;
            while let Some(chunk) = stream.next().await {
                file.write_all(&chunk.map_err(unavailable)?).await?;
            }
            file.sync_all().await?;
            Ok(())
        }
        .await;
        written?;
        tokio::fs::rename(&tmp.0, dest).await?;
        Ok(true)
    }

    /// Evicts the least recently used local copies until the cache is within its bound.
    /// Evicting a file in use is safe: a mapped artifact stays mapped, and a blob is read
    /// whole by whoever opened it.
    /// `keep` (what the caller is about to use) is never evicted.
    pub(super) fn trim_cache(&self, local: &Folder, keep: &Path) {
        let Ok(_trimming) = self.trimming.try_lock() else {
            return;
        };
        local.trim(self.cache_bytes, keep);
    }
}

/// A temp file removed when dropped (a download cancelled with its request included);
/// after the rename nothing is left to remove.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_path(dest: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned());
    dest.with_file_name(format!(
        ".tmp-{}-{n}-{}",
        std::process::id(),
        name.unwrap_or_default()
    ))
}

fn unavailable(e: object_store::Error) -> BlobError {
    BlobError::Unavailable(format!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_urls_parse_bucket_prefix_endpoint_and_region() {
        assert_eq!("".parse::<BlobsUrl>(), Ok(BlobsUrl::Folder));
        let url: BlobsUrl = "s3://kiln/prod/eu?endpoint=http://127.0.0.1:9000&region=eu-west-1"
            .parse()
            .expect("parse");
        assert_eq!(
            url,
            BlobsUrl::S3(S3Url {
                bucket: "kiln".into(),
                prefix: "prod/eu".into(),
                endpoint: Some("http://127.0.0.1:9000".into()),
                region: Some("eu-west-1".into()),
            })
        );
        let bare: BlobsUrl = "s3://kiln".parse().expect("bare");
        assert!(matches!(bare, BlobsUrl::S3(u) if u.prefix.is_empty() && u.endpoint.is_none()));
        for bad in [
            "gs://x",
            "s3://",
            "s3:///p",
            "s3://b?secret=1",
            "/tmp/blobs",
        ] {
            assert!(bad.parse::<BlobsUrl>().is_err(), "{bad}");
        }
    }
}
