//! The wasmtime runtime: one [`Engine`](wasmtime::Engine) with a pooling allocator, the
//! compile step run once per component at deploy, the LRU of loaded (pre-instantiated)
//! versions, and the per-request [`Store`](wasmtime::Store) that runs a guest.
//!
//! Three phases, and nothing costly per request that could run earlier:
//! - startup ([`Runtime::new`]): engine, linker, epoch ticker;
//! - deploy ([`Runtime::compile`]): validate, compile, persist the `.cwasm`, pre-instantiate;
//! - request ([`Runtime::invoke`]): a fresh `Store` with limits and a deadline, instantiate,
//!   call `wasi:http/incoming-handler`.
//!
//! A version evicted from the LRU (or not loaded since a restart) is mapped back from its
//! compiled artifact on its next request: the cold start, a file map and no compilation.

mod breaker;
mod compile;
mod engine;
mod guest_log;
mod invoke;
mod limits;
mod loaded;
pub mod logs;
mod outbound;
mod state;

pub use breaker::{BreakerEvents, BreakerState, Breakers};
pub use compile::CompileError;
pub use engine::Runtime;
pub use invoke::{InvokeError, InvokeOutcome, ResponseBody, Timings};
pub use loaded::{ArtifactSource, ColdStart, LoadedVersion};
pub use outbound::{HostPattern, Outbound, parse_patterns};
pub use state::{GuestUsage, HostState};
