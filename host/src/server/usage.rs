//! The usage record of one data-plane request, gathered while it is served and written
//! once: into `/metrics`, the version's recent statistics (what rollout gates judge), and
//! the ledger when metering is on, all with the same outcome and status.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{HeaderValue, Response};
use http_body_util::BodyExt;

use super::body::{Body, BodyStats, End, Finishing, OnEnd};
use crate::api::ApiError;
use crate::app::App;
use crate::cache::responses::CacheStatus;
use crate::deploy::{Admitted, VersionEntry};
use crate::meter::{Durability, Outcome, UsageRecord};
use crate::nn::{Device, InferenceTime};
use crate::runtime::{GuestUsage, InvokeError};

/// What the usage record of one request has gathered so far. It is written exactly once:
/// when the response body ends, when the request fails, or (dropped unwritten) when the
/// client went away first; into the version's recent stats always, into the ledger when
/// metering is on.
pub(super) struct Usage {
    app: Arc<App>,
    entry: Arc<VersionEntry>,
    tenant: Arc<str>,
    written: bool,
    /// A shadow copy: billed like any request, but kept out of the version's request
    /// statistics (it is judged by comparison instead).
    pub(super) shadow: bool,
    /// Routed by the main policy: counted in what rollout gates judge.
    pub(super) routed: bool,
    /// The alias the request came through (`/fn/{name}:{alias}/`): picks its variables.
    pub(super) alias: Option<Arc<str>>,
    /// Its function's variable values as admission saw them (`None`: its version declares
    /// none, so nothing was taken).
    pub(super) variables: Option<Arc<crate::deploy::variables::FunctionVariables>>,
    request_id: String,
    start_ms: i64,
    pub(super) started: Instant,
    head: bool,
    pub(super) cold: bool,
    pub(super) cache: &'static str,
    pub(super) bytes_in: u64,
    pub(super) body_stats: Option<Arc<BodyStats>>,
    pub(super) guest: Option<(Arc<GuestUsage>, Arc<InferenceTime>)>,
    /// What the request predicted, when its guest said (`x-kiln-prediction`) or a cached
    /// answer carried it; otherwise its model's class, if any.
    pub(super) prediction: Option<String>,
}

impl Usage {
    /// The tenant billed for the request.
    pub(super) fn tenant(&self) -> &Arc<str> {
        &self.tenant
    }

    /// The request's `x-kiln-request-id`.
    pub(super) fn request_id(&self) -> &str {
        &self.request_id
    }

    pub(super) fn new(
        app: &Arc<App>,
        entry: &Arc<VersionEntry>,
        tenant: Arc<str>,
        request_id: &HeaderValue,
        caching: bool,
        head: bool,
    ) -> Usage {
        Usage {
            app: app.clone(),
            entry: entry.clone(),
            tenant,
            written: false,
            shadow: false,
            routed: false,
            alias: None,
            variables: None,
            request_id: request_id.to_str().unwrap_or_default().to_string(),
            start_ms: crate::unix_ms(),
            started: Instant::now(),
            head,
            cold: false,
            cache: if caching { "miss" } else { "off" },
            bytes_in: 0,
            body_stats: None,
            guest: None,
            prediction: None,
        }
    }

    /// Writes the record (once); in strict mode the receiver completes when it is durable.
    pub(super) fn write(
        &mut self,
        outcome: Outcome,
        status: u16,
        bytes_out: u64,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        if std::mem::replace(&mut self.written, true) {
            return None;
        }
        let wall = self.started.elapsed();
        let hit = self.cache == CacheStatus::Hit.as_str();
        // A response-cache hit ran no guest: it is no invocation (the cache counts it).
        if !hit {
            let ran = outcome != Outcome::Rejected;
            self.entry
                .metrics
                .record(outcome, status, ran.then_some(wall), self.cold);
        }
        let error = status >= 500
            || matches!(
                outcome,
                Outcome::Trap | Outcome::Timeout | Outcome::GuestError
            );
        if !hit && !self.shadow && !matches!(outcome, Outcome::Rejected | Outcome::Cancelled) {
            self.entry.admission.observe(outcome == Outcome::Timeout);
        }
        if !self.shadow {
            let window = match self.routed {
                true => &self.entry.routed,
                false => &self.entry.other,
            };
            window.record(wall, error, self.cold, hit);
        }
        if self.app.config.server.access_log {
            self.access_log(outcome, status, bytes_out, wall);
        }
        let ledger = self.app.ledger.as_ref()?;
        let us = |d: Duration| d.as_micros() as u64;
        let bytes_in = self
            .body_stats
            .as_ref()
            .map_or(self.bytes_in, |s| s.read.load(Ordering::Relaxed));
        let (cpu, memory, inf_cpu, inf_gpu, batch_rows) = match &self.guest {
            Some((g, nn)) => (
                us(g.cpu().saturating_sub(nn.inline())),
                g.memory_peak(),
                us(nn.on(Device::Cpu)),
                us(nn.on(Device::Gpu)),
                nn.batch().0,
            ),
            None => (0, 0, 0, 0, 0),
        };
        let mut r = UsageRecord {
            request_id: std::mem::take(&mut self.request_id),
            tenant: self.tenant.clone(),
            function: self.entry.function.clone(),
            version: self.entry.record.version,
            start_ms: self.start_ms,
            wall_us: us(wall),
            cpu_us: cpu,
            memory_peak_bytes: memory,
            inference_cpu_us: inf_cpu,
            inference_gpu_us: inf_gpu,
            batch_rows,
            bytes_in,
            bytes_out,
            cold: self.cold,
            cache: self.cache,
            outcome,
            status,
            cost: 0,
            prediction: self.prediction.take().or_else(|| {
                let (_, nn) = self.guest.as_ref()?;
                nn.prediction().map(|c| c.to_string())
            }),
        };
        r.cost = self.app.config.pricing.cost(&r);
        ledger.submit(r)
    }

    /// One access-log line of a data-plane request, as it ends (`[server] access_log`).
    fn access_log(&self, outcome: Outcome, status: u16, bytes_out: u64, wall: Duration) {
        tracing::info!(
            target: "kiln::access",
            request_id = self.request_id,
            tenant = &*self.tenant,
            function = &*self.entry.function,
            version = self.entry.record.version,
            alias = self.alias.as_deref(),
            shadow = self.shadow,
            status,
            outcome = outcome.as_str(),
            duration_ms = wall.as_secs_f64() * 1000.0,
            cold = self.cold,
            cache = self.cache,
            bytes_out,
            "{status} {} v{}",
            self.entry.function,
            self.entry.record.version
        );
    }

    fn strict(&self) -> bool {
        !self.written
            && self.app.ledger.is_some()
            && self.app.config.metering.durability == Durability::Strict
    }

    /// Writes the record of a request answered with an error (no body to wait for).
    pub(super) async fn fail(mut self, e: &ApiError) {
        if let Some(ack) = self.write(outcome_of(e), e.status().as_u16(), 0) {
            let _ = ack.await;
        }
    }

    /// Attaches the record to `resp`'s body: it is written when the body ends (`cancelled`
    /// when it is dropped before), and in strict mode the body's end waits for it. A
    /// response without a body to wait on (HEAD, empty) is recorded here, and in strict
    /// mode only answered once durable.
    pub(super) async fn finish(
        mut self,
        resp: Response<Body>,
        guard: Option<Admitted>,
    ) -> Response<Body> {
        let status = resp.status();
        let (parts, body) = resp.into_parts();
        let bodiless = self.head
            || http_body::Body::is_end_stream(&body)
            || http_body::Body::size_hint(&body).exact() == Some(0)
            || status == http::StatusCode::NO_CONTENT
            || status == http::StatusCode::NOT_MODIFIED;
        // Nothing to send: the answer is complete now (hyper drops such a body unpolled).
        if bodiless {
            let strict = self.strict();
            if let Some(ack) = self.write(Outcome::Ok, status.as_u16(), 0)
                && strict
            {
                let _ = ack.await;
            }
        }
        // What the head declares: a server stops polling a body at its content-length.
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let strict = self.strict();
        let timeout = Duration::from_millis(self.entry.record.limits.timeout_ms);
        let on_end: Option<OnEnd> = (!self.written).then(|| {
            Box::new(move |sent: u64, how: End| {
                let outcome = match how {
                    End::Complete => Outcome::Ok,
                    // The client left after the head: what it used is billed, as cancelled.
                    End::Abandoned => Outcome::Cancelled,
                    // Cut short by the guest: it trapped, or ran out of time mid-stream.
                    End::Failed if self.started.elapsed() >= timeout => Outcome::Timeout,
                    End::Failed => Outcome::Trap,
                };
                self.write(outcome, status.as_u16(), sent)
            }) as OnEnd
        });
        Response::from_parts(
            parts,
            Finishing::new(body, guard, on_end, strict)
                .declared(declared)
                .boxed_unsync(),
        )
    }
}

impl Drop for Usage {
    fn drop(&mut self) {
        // Neither answered nor failed: the client went away while the function ran. What
        // it used is still billed.
        drop(self.write(Outcome::Cancelled, 499, 0));
    }
}

pub(super) fn outcome_of(e: &ApiError) -> Outcome {
    match e {
        ApiError::Invoke(InvokeError::Timeout(_)) => Outcome::Timeout,
        ApiError::Invoke(InvokeError::NoResponse | InvokeError::GuestError(_)) => {
            Outcome::GuestError
        }
        ApiError::Invoke(_) | ApiError::Internal(_) => Outcome::Trap,
        _ => Outcome::Rejected,
    }
}
