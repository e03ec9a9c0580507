//! Shadow traffic: a share of a function's requests (the traffic policy's `shadow`) is
//! copied to another version after the primary has answered, and the copy's answer is
//! compared with the primary's (status, and the blake3 of the body) and thrown away: the
//! client never waits for it.
//!
//! What keeps copies from hurting the primaries: only requests with a known body of at
//! most [`MAX_COPY_BYTES`] (and not `HEAD`) are copied, the body is read within the
//! version's timeout; a copy starts once the primary's body has ended, only if one of the
//! shadow version's own copy slots is free (a quarter of its concurrency, apart from the
//! slots of the requests it serves; never waited for), so copies in flight are bounded;
//! and it runs on a runtime of its own whose threads have the lowest CPU priority, so a
//! busy machine runs primaries first. Each outcome lands in the shadow version's
//! [`ShadowWindow`](crate::meter::ShadowWindow) and in `kiln_shadow_*` metrics; latencies
//! on both sides are to the response head. A copy is billed like any request (request id
//! `<id>.shadow`), to the function's owner.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::full;
use super::data_plane;
use super::usage::Usage;
use crate::app::App;
use crate::deploy::variables::FunctionVariables;
use crate::deploy::{Admitted, VersionEntry};
use crate::meter::Outcome;

/// Largest request body copied to a shadow.
pub const MAX_COPY_BYTES: u64 = 1 << 20;

/// A request as the shadow will get it.
pub(super) struct ShadowCopy {
    /// The shadow version.
    pub(super) to: Arc<VersionEntry>,
    tenant: Arc<str>,
    parts: http::request::Parts,
    body: Bytes,
    rest: String,
    request_id: HeaderValue,
    /// The alias the primary came through and the values it was admitted with: the copy
    /// sees that alias's variables.
    vars: (Option<Arc<str>>, Option<Arc<FunctionVariables>>),
}

/// Whether a request drawn for the shadow can be copied: not `HEAD` (its body is never
/// read, so there is nothing to compare), with a body of known size within
/// [`MAX_COPY_BYTES`] (a large or streamed upload goes straight to the primary).
pub(super) fn eligible(req: &Request<Incoming>, max_body: u64) -> bool {
    req.method() != http::Method::HEAD
        && http_body::Body::size_hint(req.body())
            .exact()
            .is_some_and(|n| n <= MAX_COPY_BYTES.min(max_body))
}

/// The copy of a request for the shadow version `to`: the primary's head and the body
/// it read whole (the same bytes, shared).
pub(super) fn copy_of(
    parts: &http::request::Parts,
    body: &Bytes,
    rest: &str,
    request_id: &HeaderValue,
    owner: Arc<str>,
    to: Arc<VersionEntry>,
    vars: (Option<Arc<str>>, Option<Arc<FunctionVariables>>),
) -> ShadowCopy {
    let mut copy = Request::new(()).into_parts().0;
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    ShadowCopy {
        to,
        tenant: owner,
        parts: copy,
        body: body.clone(),
        rest: rest.to_string(),
        request_id: request_id.clone(),
        vars,
    }
}

/// Counts a copy to `to` that will not be sent (not eligible, the primary failed or
/// was cut short, or no copy slot was free).
pub(super) fn skip(app: &App, to: &VersionEntry) {
    to.shadow.skipped();
    app.metrics
        .shadowed(&to.function, to.record.version, "skipped", None);
}

/// Sends `copy` once the primary's body has ended (`answered` gives its hash), and
/// compares. The primary answered `status`, its head `primary_took` after it started.
pub(super) fn spawn(
    app: Arc<App>,
    primary: &VersionEntry,
    copy: ShadowCopy,
    status: StatusCode,
    primary_took: Duration,
    answered: tokio::sync::oneshot::Receiver<Option<blake3::Hash>>,
) {
    let wait = Duration::from_millis(primary.record.limits.timeout_ms);
    // Waiting for the primary costs nothing; it stays on the server's runtime, so the
    // slot check below never waits behind starved low-priority work.
    tokio::spawn(async move {
        let hash = match tokio::time::timeout(wait, answered).await {
            Ok(Ok(Some(hash))) => hash,
            _ => return skip(&app, &copy.to),
        };
        let Ok(slot) = copy.to.shadow_slots.try_admit() else {
            return skip(&app, &copy.to);
        };
        // A cold shadow version is loaded here, at normal priority: primaries it also
        // serves would otherwise wait on a load starved by the copies' low priority.
        let r = &copy.to.record;
        if let Err(e) = app
            .runtime
            .load(r.id, &r.function, &r.digest, r.limits)
            .await
        {
            tracing::warn!(function = %r.function, version = r.version, "shadow copy: {e:#}");
            return skip(&app, &copy.to);
        }
        let task = compare(app, copy, status, hash, primary_took, slot);
        match background() {
            Some(rt) => drop(rt.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    });
}

/// The runtime copies run on (`None` if it could not be made: then the server's).
fn background() -> Option<&'static tokio::runtime::Runtime> {
    static RUNTIME: std::sync::OnceLock<Option<tokio::runtime::Runtime>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("kiln-shadow")
                .on_thread_start(lowest_priority)
                .enable_all()
                .build()
                .map_err(|e| tracing::warn!("shadow runtime: {e}; copies share the server's"))
                .ok()
        })
        .as_ref()
}

/// Gives the calling thread the lowest CPU priority (nice 19): it runs when primaries
/// leave the CPU idle.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on the calling thread (Linux keeps a nice value per
        // thread; `gettid` names this one), no memory is shared with the kernel.
        #[allow(unsafe_code)]
        let failed = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 19) != 0
        };
        if failed {
            tracing::debug!("could not lower the priority of a shadow thread");
        }
    }
}

async fn compare(
    app: Arc<App>,
    copy: ShadowCopy,
    status: StatusCode,
    hash: blake3::Hash,
    primary_took: Duration,
    slot: Admitted,
) {
    let app = &app;
    let to = copy.to.clone();
    let id = HeaderValue::from_str(&format!(
        "{}.shadow",
        copy.request_id.to_str().unwrap_or_default()
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("shadow"));
    let head = copy.parts.method == http::Method::HEAD;
    let mut usage = Usage::new(app, &to, copy.tenant.clone(), &id, false, head);
    usage.shadow = true;
    (usage.alias, usage.variables) = copy.vars;
    let mut parts = copy.parts;
    // Like the primary's, the caller's key never reaches a guest (`run` strips it too).
    parts.headers.remove(header::AUTHORIZATION);
    let started = Instant::now();
    let ran = data_plane::run(
        app,
        &to,
        parts,
        full(copy.body),
        &copy.rest,
        &mut usage,
        None,
        Some(slot),
    )
    .await;
    let took = started.elapsed();
    let (matched, error) = match ran {
        Err(e) => {
            usage.fail(&e).await;
            (false, true)
        }
        Ok((resp, admitted, _)) => {
            let answered = resp.status();
            let mut body = resp.into_body();
            let mut hasher = blake3::Hasher::new();
            let (mut sent, mut failed) = (0u64, false);
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            hasher.update(d);
                            sent += d.len() as u64;
                        }
                    }
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            drop(admitted);
            let outcome = if failed { Outcome::Trap } else { Outcome::Ok };
            drop(usage.write(outcome, answered.as_u16(), sent));
            let error = failed || answered.is_server_error();
            (
                !failed && answered == status && hasher.finalize() == hash,
                error,
            )
        }
    };
    to.shadow.compared(matched, error, primary_took, took);
    let result = if matched { "match" } else { "mismatch" };
    app.metrics.shadowed(
        &to.function,
        to.record.version,
        result,
        Some((primary_took, took)),
    );
}
