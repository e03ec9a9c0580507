//! Loaded versions: a bounded LRU of `ProxyPre`s keyed by version id, plus the versions
//! kept loaded whatever the LRU evicts (those traffic policies name, and each policy's
//! previous target, so that switching back is never a cold start).
//!
//! A miss maps the version's compiled artifact from disk (`Component::deserialize_file`) and
//! pre-instantiates it: the cold start. Concurrent misses on one version share a single load.
//! If the artifact is missing (new data dir copy, engine upgrade), it is rebuilt once from
//! the component blob and logged, since that is a compile, not a cold start.

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
        // Evicted from the LRU but kept: back into it, warm.
        if let Some(v) = self.loaded.kept_version(id) {
            let _ = slot.set(v.clone());
            return Ok((v, None));
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

    /// Number of versions currently held in memory.
    pub fn loaded_count(&self) -> usize {
        let kept = self.loaded.kept();
        let slots = self.loaded.slots.lock().unwrap_or_else(|p| p.into_inner());
        let in_lru = slots.iter().filter(|(_, s)| s.initialized()).count();
        // Kept versions the LRU has evicted are in memory too.
        let evicted = kept
            .versions
            .iter()
            .filter(|(id, v)| v.is_some() && slots.peek(id).is_none_or(|s| !s.initialized()))
            .count();
        in_lru + evicted
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
