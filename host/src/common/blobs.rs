//! [`BlobSource`]: how the runtime and `nn` get at blob bytes and share compiled artifacts,
//! whatever backs the blob store (a local folder, or an object store with a local cache).

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

use super::Digest;

/// Blob bytes on local disk, and compiled artifacts shared between nodes.
///
/// Called off the request path's fast lane only: on a cold start (the component's artifact
/// or blob is not on this node), at deploy, and when a model is first loaded.
pub trait BlobSource: Send + Sync {
    /// The local path of blob `digest`, fetched (and verified against its digest) first
    /// when only the shared store has it.
    fn local(&self, digest: Digest) -> BoxFuture<'_, anyhow::Result<PathBuf>>;

    /// Fetches the shared compiled artifact `name` into `dest`; `false` when no node has
    /// stored one (or the store keeps no shared artifacts: a single node).
    fn fetch_artifact<'a>(
        &'a self,
        name: &'a str,
        dest: &'a Path,
    ) -> BoxFuture<'a, anyhow::Result<bool>>;

    /// Shares the compiled artifact at `src` under `name`, so other nodes map it instead of
    /// compiling; a no-op for a single node.
    fn share_artifact<'a>(
        &'a self,
        name: &'a str,
        src: &'a Path,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
}
