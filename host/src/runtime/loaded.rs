//! Loaded versions: a bounded LRU of `ProxyPre`s keyed by version id.
//!
//! A miss maps the version's compiled artifact from disk (`Component::deserialize_file`) and
//! pre-instantiates it: the cold start. Concurrent misses on one version share a single load.
//! If the artifact is missing (new data dir copy, engine upgrade), it is rebuilt once from
//! the component blob and logged, since that is a compile, not a cold start.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lru::LruCache;
use tokio::sync::OnceCell;
use wasmtime::component::Component;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use super::compile::compile_and_persist;
use super::engine::Runtime;
use super::limits::Limits;
use super::state::HostState;
use crate::store::Digest;

/// A version ready to serve: compiled, linked, pre-instantiated.
pub struct LoadedVersion {
    pub(super) pre: ProxyPre<HostState>,
    pub(super) function: Arc<str>,
    pub(super) limits: Limits,
}

type Slot = Arc<OnceCell<Arc<LoadedVersion>>>;

/// The LRU of loaded versions.
pub(super) struct LoadedCache {
    slots: Mutex<LruCache<i64, Slot>>,
}

impl LoadedCache {
    pub(super) fn new(capacity: usize) -> Self {
        LoadedCache {
            slots: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn slot(&self, id: i64) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get_or_insert(id, Slot::default).clone()
    }
}

impl Runtime {
    /// The loaded version with id `id`, loading it if needed. Returns the cold-start time when
    /// this call did the load.
    pub async fn load(
        &self,
        id: i64,
        function: &str,
        digest: &Digest,
        limits: Limits,
        blob: &Path,
    ) -> anyhow::Result<(Arc<LoadedVersion>, Option<Duration>)> {
        let slot = self.loaded.slot(id);
        if let Some(v) = slot.get() {
            return Ok((v.clone(), None));
        }
        let mut cold = None;
        let v = slot
            .get_or_try_init(|| async {
                let started = Instant::now();
                let component = self.map_artifact(digest, blob).await?;
                let pre = self.link(&component)?;
                let loaded = Self::proxy(function, pre, limits)?;
                cold = Some(started.elapsed());
                anyhow::Ok(Arc::new(loaded))
            })
            .await?;
        if let Some(t) = cold {
            tracing::debug!(function, %digest, micros = t.as_micros() as u64, "cold start");
        }
        Ok((v.clone(), cold))
    }

    /// Puts a freshly compiled version into the LRU so its first request is warm.
    pub fn insert_loaded(&self, id: i64, version: Arc<LoadedVersion>) {
        let slot = self.loaded.slot(id);
        let _ = slot.set(version);
    }

    /// Drops a version from memory (function deleted); in-flight requests keep their `Arc`.
    pub fn unload(&self, id: i64) {
        let mut slots = self.loaded.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.pop(&id);
    }

    /// Number of versions currently held in memory.
    pub fn loaded_count(&self) -> usize {
        let slots = self.loaded.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.iter().filter(|(_, s)| s.initialized()).count()
    }

    async fn map_artifact(&self, digest: &Digest, blob: &Path) -> anyhow::Result<Component> {
        let artifact = self.artifact_path(digest);
        let engine = self.engine.clone();
        let blob = blob.to_path_buf();
        let digest = *digest;
        tokio::task::spawn_blocking(move || {
            if artifact.exists() {
                // SAFETY: the artifact was written by this process's compile step (never
                // uploaded bytes), is named by the engine fingerprint, and wasmtime checks its
                // header against the engine before use.
                #[allow(unsafe_code)]
                let mapped = unsafe { Component::deserialize_file(&engine, &artifact) };
                match mapped {
                    Ok(c) => return Ok(c),
                    Err(e) => tracing::warn!(%digest, "compiled artifact unusable, recompiling: {e:#}"),
                }
            }
            tracing::warn!(%digest, "no compiled artifact for this engine; recompiling from the blob");
            let bytes = std::fs::read(&blob)
                .with_context(|| format!("reading component blob {}", blob.display()))?;
            Ok(compile_and_persist(&engine, &bytes, &artifact)?)
        })
        .await?
    }
}
