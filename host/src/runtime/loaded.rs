//! Loaded versions: a bounded LRU of `ProxyPre`s keyed by version id, plus the versions
//! kept loaded whatever the LRU evicts (those traffic policies name, and each policy's
//! previous target, so that switching back is never a cold start).
//!
//! A miss maps the version's compiled artifact from disk (`Component::deserialize_file`) and
//! pre-instantiates it: the cold start. Concurrent misses on one version share a single load.
//! A node without the artifact fetches the one another node compiled with the same engine
//! from the shared blob store; only when there is none (a single node's data dir copied
//! without `compiled/`, an engine upgrade) is it rebuilt from the component blob, shared,
//! and logged, since that is a compile, not a cold start.

use std::collections::HashMap;
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
use super::state::HostState;
use crate::common::Digest;
use crate::common::Limits;

/// Where a cold start got the version's compiled code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactSource {
    /// Mapped from this node's compiled artifact.
    Local,
    /// Downloaded from the shared blob store (compiled by another node), then mapped.
    Shared,
    /// Compiled here from the component: no node had an artifact for this engine.
    Compiled,
}

impl ArtifactSource {
    /// `map`, `fetch` or `compile`: what `server-timing` says of a cold start.
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactSource::Local => "map",
            ArtifactSource::Shared => "fetch",
            ArtifactSource::Compiled => "compile",
        }
    }
}

/// One cold start: how long loading the version took and where its code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColdStart {
    pub took: Duration,
    pub source: ArtifactSource,
}

/// A version ready to serve: compiled, linked, pre-instantiated.
pub struct LoadedVersion {
    pub(super) pre: ProxyPre<HostState>,
    pub(super) function: Arc<str>,
    pub(super) limits: Limits,
}

impl LoadedVersion {
    /// The function it is a version of.
    pub fn function(&self) -> &str {
        &self.function
    }
}

type Slot = Arc<OnceCell<Arc<LoadedVersion>>>;

/// The LRU of loaded versions, and the kept ones.
pub(super) struct LoadedCache {
    slots: Mutex<LruCache<i64, Slot>>,
    kept: Mutex<Kept>,
}

/// Versions kept loaded: by function, the ids; by id, the version once loaded.
#[derive(Default)]
struct Kept {
    by_function: HashMap<String, Vec<i64>>,
    versions: HashMap<i64, Option<Arc<LoadedVersion>>>,
}

impl LoadedCache {
    pub(super) fn new(capacity: usize) -> Self {
        LoadedCache {
            slots: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
            kept: Mutex::default(),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The kept version `id`, if it is kept and loaded.
    fn kept_version(&self, id: i64) -> Option<Arc<LoadedVersion>> {
        self.kept().versions.get(&id).cloned().flatten()
    }

    /// Holds on to a freshly loaded version if it is one to keep.
    fn remember(&self, id: i64, v: &Arc<LoadedVersion>) {
        if let Some(slot) = self.kept().versions.get_mut(&id) {
            *slot = Some(v.clone());
        }
    }

    fn slot(&self, id: i64) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get_or_insert(id, Slot::default).clone()
    }
}

impl Runtime {
    /// The loaded version with id `id`, loading it if needed. Returns the cold start when
    /// this call did the load.
    pub async fn load(
        &self,
        id: i64,
        function: &str,
        digest: &Digest,
        limits: Limits,
    ) -> anyhow::Result<(Arc<LoadedVersion>, Option<ColdStart>)> {
        let slot = self.loaded.slot(id);
        if let Some(v) = slot.get() {
            return Ok((v.clone(), None));
        }
        // Evicted from the LRU but kept: back into it, warm.
        if let Some(v) = self.loaded.kept_version(id) {
            let _ = slot.set(v.clone());
            return Ok((v, None));
        }
        let mut cold = None;
        let v = slot
            .get_or_try_init(|| async {
                let started = Instant::now();
                let (component, source) = self.map_artifact(digest).await?;
                let pre = self.link(&component)?;
                let loaded = Self::proxy(function, pre, limits)?;
                cold = Some(ColdStart {
                    took: started.elapsed(),
                    source,
                });
                anyhow::Ok(Arc::new(loaded))
            })
            .await?;
        if let Some(t) = cold {
            tracing::debug!(function, %digest, micros = t.took.as_micros() as u64, source = t.source.as_str(), "cold start");
            self.loaded.remember(id, v);
        }
        Ok((v.clone(), cold))
    }

    /// Puts a freshly compiled version into the LRU so its first request is warm.
    pub fn insert_loaded(&self, id: i64, version: Arc<LoadedVersion>) {
        let slot = self.loaded.slot(id);
        let _ = slot.set(version.clone());
        self.loaded.remember(id, &version);
    }

    /// Keeps versions `ids` of `function` loaded whatever the LRU evicts (each from its
    /// next load on, if it is not loaded now), replacing the function's previous set; an
    /// empty set lets them all go. All functions together keep at most
    /// `[runtime] kept_versions`: past that, versions are left to the LRU.
    pub fn keep_loaded(&self, function: &str, ids: &[i64]) {
        let mut kept = self.loaded.kept();
        let others: usize = kept
            .by_function
            .iter()
            .filter(|(f, _)| f.as_str() != function)
            .map(|(_, ids)| ids.len())
            .sum();
        let room = self.config.kept_versions.saturating_sub(others);
        if ids.len() > room {
            tracing::warn!(
                function,
                wanted = ids.len(),
                room,
                "more versions to keep loaded than [runtime] kept_versions allows; the rest are left to the LRU"
            );
        }
        let ids = &ids[..ids.len().min(room)];
        let previous = match ids.is_empty() {
            true => kept.by_function.remove(function),
            false => kept.by_function.insert(function.to_string(), ids.to_vec()),
        };
        for id in previous.unwrap_or_default() {
            if !ids.contains(&id) {
                kept.versions.remove(&id);
            }
        }
        let slots = self.loaded.slots.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            let loaded = slots.peek(id).and_then(|s| s.get().cloned());
            let entry = kept.versions.entry(*id).or_insert(None);
            if entry.is_none() {
                *entry = loaded;
            }
        }
    }

    /// Drops a version from memory (function deleted); in-flight requests keep their `Arc`.
    pub fn unload(&self, id: i64) {
        let mut slots = self.loaded.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.pop(&id);
    }

    /// The ids of the versions currently held in memory.
    pub fn loaded_ids(&self) -> std::collections::HashSet<i64> {
        let kept = self.loaded.kept();
        let slots = self.loaded.slots.lock().unwrap_or_else(|p| p.into_inner());
        let in_lru = slots
            .iter()
            .filter(|(_, s)| s.initialized())
            .map(|(id, _)| *id);
        // Kept versions the LRU has evicted are in memory too.
        let kept = kept
            .versions
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(id, _)| *id);
        in_lru.chain(kept).collect()
    }

    /// The version's compiled code: this node's artifact, else the one another node shared,
    /// else compiled now from the component blob (and shared).
    async fn map_artifact(&self, digest: &Digest) -> anyhow::Result<(Component, ArtifactSource)> {
        let artifact = self.artifact_path(digest);
        if let Some(c) = self.deserialize(digest, &artifact).await? {
            return Ok((c, ArtifactSource::Local));
        }
        let name = self.artifact_name(digest);
        match self.blobs.fetch_artifact(&name, &artifact).await {
            Ok(true) => {
                if let Some(c) = self.deserialize(digest, &artifact).await? {
                    return Ok((c, ArtifactSource::Shared));
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(%digest, "fetching the shared compiled artifact: {e:#}"),
        }
        tracing::warn!(%digest, "no compiled artifact for this engine; recompiling from the blob");
        let blob = self.blobs.local(*digest).await?;
        let engine = self.engine.clone();
        let dest = artifact.clone();
        let component = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&blob)
                .with_context(|| format!("reading component blob {}", blob.display()))?;
            anyhow::Ok(compile_and_persist(&engine, &bytes, &dest)?)
        })
        .await??;
        if let Err(e) = self.blobs.share_artifact(&name, &artifact).await {
            tracing::warn!(%digest, "sharing the compiled artifact: {e:#}");
        }
        Ok((component, ArtifactSource::Compiled))
    }

    /// Maps the artifact at `path`; `None` when it is missing or unusable (then removed, so
    /// it is fetched or rebuilt).
    async fn deserialize(&self, digest: &Digest, path: &Path) -> anyhow::Result<Option<Component>> {
        let engine = self.engine.clone();
        let path = path.to_path_buf();
        let digest = *digest;
        Ok(tokio::task::spawn_blocking(move || {
            if !path.exists() {
                return None;
            }
            // SAFETY: the artifact was written by Kiln's compile step, on this node or (fetched
            // from the shared bucket, which is trusted like the database) another node of the
            // cluster. Uploaded bytes never land here: precompiled uploads are refused, and
            // blobs are stored under their digest, not under artifact names. It is named by
            // the engine fingerprint, and wasmtime checks its header against the engine.
            #[allow(unsafe_code)]
            let mapped = unsafe { Component::deserialize_file(&engine, &path) };
            match mapped {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(%digest, "compiled artifact unusable: {e:#}");
                    let _ = std::fs::remove_file(&path);
                    None
                }
            }
        })
        .await?)
    }
}
