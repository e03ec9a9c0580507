//! One request: a fresh `Store` (limits, epoch deadline), instantiate from the version's
//! `ProxyPre`, call `wasi:http/incoming-handler.handle`, and wait for the guest's response
//! head under the version's timeout. The handler keeps running in its own task while it
//! streams the body, still bounded by the same deadline.

use std::ops::DerefMut;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Body;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use super::engine::{EPOCH_TICK, Runtime};
use super::loaded::LoadedVersion;
use super::outbound::Outbound;
use super::state::{GuestUsage, HostState};
use crate::nn::{Device, InferenceTime, NnCtx, VersionModels};

/// Body of a guest's response, streamed from the guest as it writes it.
pub type ResponseBody = wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// Where the time of one invocation went (for `server-timing` and metering).
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Mapping the compiled artifact, when this request found the version cold.
    pub cold: Option<super::ColdStart>,
    /// Creating the store and instantiating the component.
    pub instantiate: Duration,
    /// From the call into the guest until it produced a response head.
    pub handler: Duration,
    /// Native inference (`wasi:nn` compute) inside the handler, per device.
    pub inference_cpu: Duration,
    pub inference_gpu: Duration,
    /// Inference cache hits and misses inside the handler.
    pub inference_cache: (u64, u64),
    /// Most rows in a backend run the handler's computes shared, and whether any went
    /// through a batching queue (`server-timing` says `batch=N` then).
    pub batch: (u32, bool),
    /// Guest time and memory, final once the guest has finished (read them then).
    pub usage: Arc<GuestUsage>,
    /// Inference per device, final once the guest has finished.
    pub inference: Arc<InferenceTime>,
    /// Where the guest's output is kept for the function's authors (`None`: host log only).
    pub log: Option<super::logs::RequestLog>,
}

/// A guest's answer, or why there is none.
pub type InvokeOutcome = Result<http::Response<ResponseBody>, InvokeError>;

/// Why an invocation produced no response; each has a fixed HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The guest ran past its `timeout_ms` (504).
    #[error("the function did not answer within its timeout of {0} ms")]
    Timeout(u64),
    /// The guest trapped: panic, out of memory, stack overflow... (500).
    #[error("the function trapped: {0}")]
    Trap(String),
    /// The guest returned without setting a response (500).
    #[error("the function returned without sending a response")]
    NoResponse,
    /// The guest answered with a `wasi:http` error code instead of a response (500).
    #[error("the function answered with an error: {0}")]
    GuestError(String),
    /// The host failed to set up the request (500, logged).
    #[error("internal error running the function: {0:#}")]
    Internal(anyhow::Error),
}

impl Runtime {
    /// Runs one request on a fresh instance of `loaded`, its guest seeing `vars`.
    pub async fn invoke<B>(
        &self,
        loaded: Arc<LoadedVersion>,
        models: Arc<VersionModels>,
        outbound: &Outbound,
        vars: &[(String, String)],
        req: http::Request<B>,
        timings: &mut Timings,
    ) -> InvokeOutcome
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let timeout_ms = loaded.limits.timeout_ms;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        let started = Instant::now();
        let inference = timings.inference.clone();
        let nn = NnCtx::new(
            models,
            self.models.clone(),
            started + Duration::from_millis(timeout_ms),
            inference.clone(),
        );

        let mut store = Store::new(
            &self.engine,
            HostState::new(
                &loaded.function,
                &loaded.limits,
                nn,
                timings.usage.clone(),
                outbound.clone(),
                timings.log.clone(),
                vars,
            ),
        );
        store.limiter(|s| &mut s.limits);
        let cpu = self.config.meter_guest_time.then(|| timings.usage.clone());
        // Every epoch tick the guest yields to the executor: a guest in a busy loop holds
        // its worker thread for one tick at most, never for its whole timeout (on a node
        // with as many looping guests as cores, nobody else would be served). The
        // deadline itself is the timer around the call; the tick count is its backstop.
        let ticks = timeout_ms.div_ceil(EPOCH_TICK.as_millis() as u64) + 1;
        let mut ticked = 0u64;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            ticked += 1;
            Ok(match ticked > ticks {
                true => UpdateDeadline::Interrupt,
                // tokio's own yield: the task goes behind every other ready one (a plain
                // wake would put it back in the worker's next-to-run slot).
                false => UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())),
            })
        });

        let (tx, rx) = tokio::sync::oneshot::channel();
        let (req, out) = {
            let mut http = store.data_mut().http();
            let req = http
                .new_incoming_request(Scheme::Http, req)
                .map_err(|e| InvokeError::Internal(e.into()))?;
            let out = http
                .new_response_outparam(tx)
                .map_err(|e| InvokeError::Internal(e.into()))?;
            (req, out)
        };
        let instantiated = {
            let instantiate = CpuTimed {
                inner: std::pin::pin!(loaded.pre.instantiate_async(&mut store)),
                usage: cpu.clone(),
            };
            tokio::time::timeout_at(deadline, instantiate).await
        };
        let proxy = match instantiated {
            Ok(Ok(proxy)) => proxy,
            Ok(Err(e)) => return Err(classify(e, timeout_ms)),
            Err(_) => return Err(InvokeError::Timeout(timeout_ms)),
        };
        timings.instantiate = started.elapsed();

        // Run the handler inline: most guests write their whole response and return before
        // anyone reads it, and then no task is spawned. Only a guest still running once its
        // response head is out (streaming a body) moves to its own task, still under the
        // same deadline.
        let called = Instant::now();
        let mut call = CpuTimed {
            inner: Box::pin(async move {
                let call = proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out);
                match tokio::time::timeout_at(deadline, call).await {
                    Ok(result) => result,
                    Err(_) => Err(wasmtime::Error::from(Trap::Interrupt)),
                }
            }),
            usage: cpu,
        };
        let mut rx = rx;
        let (head, finished) = tokio::select! {
            biased;
            finished = &mut call => (rx.await, Some(finished)),
            head = &mut rx => (head, None),
        };
        timings.handler = called.elapsed();
        timings.inference_cpu = inference.on(Device::Cpu);
        timings.inference_gpu = inference.on(Device::Gpu);
        timings.inference_cache = inference.cache();
        timings.batch = inference.batch();
        match head {
            Ok(Ok(response)) => {
                if finished.is_none() {
                    tokio::spawn(async move {
                        if let Err(e) = call.await {
                            tracing::debug!("guest failed after sending its response head: {e:#}");
                        }
                    });
                }
                Ok(response)
            }
            Ok(Err(code)) => Err(InvokeError::GuestError(format!("{code:?}"))),
            // No response was set: the call's own result says why (finish it if needed).
            Err(_) => {
                let finished = match finished {
                    Some(f) => f,
                    None => call.await,
                };
                match finished {
                    Ok(()) => Err(InvokeError::NoResponse),
                    Err(e) => Err(classify(e, timeout_ms)),
                }
            }
        }
    }
}

/// Adds the time spent inside each poll of `inner` to `usage`. A guest runs only inside
/// such polls (on a fiber; an async host call that waits suspends it and ends the poll),
/// so this is the time the guest and its synchronous host calls were running on a thread,
/// never time spent waiting. Two monotonic clock reads (vDSO, tens of nanoseconds) per
/// poll, a handful of polls per request: the thread CPU clock measured the same within
/// noise here but costs a system call (about 1 µs) per read.
struct CpuTimed<P> {
    inner: Pin<P>,
    usage: Option<Arc<GuestUsage>>,
}

impl<P> Future for CpuTimed<P>
where
    P: DerefMut + Unpin,
    P::Target: Future,
{
    type Output = <P::Target as Future>::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(usage) = &this.usage else {
            return this.inner.as_mut().poll(cx);
        };
        let started = Instant::now();
        let polled = this.inner.as_mut().poll(cx);
        usage.add_cpu(started.elapsed().as_nanos() as u64);
        polled
    }
}

/// Turns a wasmtime error into the outcome a client should see.
fn classify(e: wasmtime::Error, timeout_ms: u64) -> InvokeError {
    if let Some(trap) = e.downcast_ref::<Trap>() {
        return match trap {
            Trap::Interrupt => InvokeError::Timeout(timeout_ms),
            Trap::StackOverflow => InvokeError::Trap("wasm stack overflow".into()),
            Trap::UnreachableCodeReached => {
                InvokeError::Trap("unreachable code reached (a panic or abort in the guest)".into())
            }
            other => InvokeError::Trap(other.to_string()),
        };
    }
    // Limit breaches (memory growth past `memory_mb`, resource table full) and host-side
    // traps arrive as plain errors; the root cause is the readable part.
    InvokeError::Trap(e.root_cause().to_string())
}
