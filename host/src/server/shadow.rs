//! Shadow traffic: a share of a function's requests (the traffic policy's `shadow`) is
//! copied to another version after the primary has answered. The copy runs on its own
//! task, only if the shadow version has a free concurrency slot (it never queues), and its
//! answer is compared with the primary's (status, and the blake3 of the body) and thrown
//! away: the client never waits for it. Each comparison lands in the shadow version's
//! [`ShadowWindow`](crate::meter::ShadowWindow) and in `kiln_shadow_*` metrics. A copy is
//! billed like any request (request id `<id>.shadow`), to the tenant the primary billed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::BodyExt;

use super::body::{Body, full};
use super::data_plane::{self, Usage};
use crate::api::ApiError;
use crate::app::App;
use crate::deploy::VersionEntry;
use crate::meter::Outcome;

/// A request as the shadow will get it.
pub(super) struct ShadowCopy {
    to: Arc<VersionEntry>,
    tenant: Arc<str>,
    parts: http::request::Parts,
    body: Bytes,
    rest: String,
    request_id: HeaderValue,
}

/// Reads the request body whole (within the body limit) and keeps a copy for the shadow
/// version `to`; gives back the request with the same bytes for the primary.
pub(super) async fn read_whole(
    app: &App,
    primary: &VersionEntry,
    req: Request<Body>,
    rest: &str,
    request_id: &HeaderValue,
    tenant: Arc<str>,
    to: Arc<VersionEntry>,
) -> Result<(Request<Body>, ShadowCopy), ApiError> {
    let max_body = app.config.max_body_bytes;
    if data_plane::content_length(&req).is_some_and(|len| len > max_body) {
        return Err(data_plane::refuse_large(primary, req, max_body).await);
    }
    let (parts, body) = req.into_parts();
    let body = data_plane::read_body(primary, body, max_body).await?;
    let mut copy = Request::new(()).into_parts().0;
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    let shadow = ShadowCopy {
        to,
        tenant,
        parts: copy,
        body: body.clone(),
        rest: rest.to_string(),
        request_id: request_id.clone(),
    };
    Ok((Request::from_parts(parts, full(body)), shadow))
}

/// Counts a copy that will not be sent (the primary failed or was cut short).
pub(super) fn skip(app: &App, copy: &ShadowCopy) {
    copy.to.shadow.skipped();
    app.metrics
        .shadowed(&copy.to.function, copy.to.record.version, "skipped", None);
}

/// Sends `copy` once the primary's body has ended (`answered` gives its hash), and
/// compares. The primary answered `status`; its request started at `started`.
pub(super) fn spawn(
    app: Arc<App>,
    primary: &VersionEntry,
    copy: ShadowCopy,
    status: StatusCode,
    started: Instant,
    answered: tokio::sync::oneshot::Receiver<Option<blake3::Hash>>,
) {
    let wait = Duration::from_millis(primary.record.limits.timeout_ms);
    tokio::spawn(async move {
        match tokio::time::timeout(wait, answered).await {
            Ok(Ok(Some(hash))) => {
                let primary_took = started.elapsed();
                compare(&app, copy, status, hash, primary_took).await;
            }
            _ => skip(&app, &copy),
        }
    });
}

async fn compare(
    app: &Arc<App>,
    copy: ShadowCopy,
    status: StatusCode,
    hash: blake3::Hash,
    primary_took: Duration,
) {
    let to = copy.to.clone();
    let id = HeaderValue::from_str(&format!(
        "{}.shadow",
        copy.request_id.to_str().unwrap_or_default()
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("shadow"));
    let head = copy.parts.method == http::Method::HEAD;
    let mut usage = Usage::new(app, &to, copy.tenant.clone(), &id, false, head);
    usage.shadow = true;
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
        false,
    )
    .await;
    let (matched, error) = match ran {
        Err(ApiError::Overloaded(_)) => {
            usage.discard();
            to.shadow.skipped();
            app.metrics
                .shadowed(&to.function, to.record.version, "skipped", None);
            return;
        }
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
    let took = started.elapsed();
    to.shadow.compared(matched, error, primary_took, took);
    let result = if matched { "match" } else { "mismatch" };
    app.metrics.shadowed(
        &to.function,
        to.record.version,
        result,
        Some((primary_took, took)),
    );
}
