//! Kiln: a serverless platform for WebAssembly inference functions.
//!
//! A user uploads a `wasi:http/proxy` component; Kiln compiles it once at deploy time,
//! persists the compiled artifact, and serves every HTTP request to it from a fresh,
//! limited wasmtime instance. A request flows through the modules in one direction:
//!
//! ```text
//! server -> auth (key, tenant, rate limits) -> deploy (pick a version) -> cache::responses
//!   -> runtime (instantiate + call the guest) -> nn -> cache::inference -> backend
//!   \-> meter (usage record into the ledger, billed to the key's tenant) once the response is sent
//!   \-> api (control plane: blobs, functions, versions, caches, usage, keys, audit) -> store
//! ```
//!
//! Nothing in [`runtime`] knows about HTTP routing or SQL; [`api`] is the only place that
//! turns JSON into calls on the other modules.

pub mod api;
pub mod app;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod common;
pub mod config;
pub mod deploy;
pub mod manifest;
pub mod meter;
pub mod monitor;
pub mod nn;
pub mod runtime;
pub mod server;
pub mod store;

/// Now, in unix milliseconds (0 if the clock is before 1970): what records, history and
/// rollouts store.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
