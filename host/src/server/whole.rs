//! Requests read whole before they run: those looked up in the response cache (the body
//! is part of the key) and those copied to a shadow. Each is admitted first (a queued
//! request holds no body bytes), then read within the version's timeout and within the
//! server's budget of buffered request bytes (`[server] body_buffer_mb`): one that would
//! go over is answered 503 `server.busy` at once instead of growing the server's memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, header};
use http_body_util::BodyExt;

use super::body::{Body, full};
use super::data_plane::{Served, content_length, refuse_large, run, set_server_timing};
use super::usage::Usage;
use crate::api::ApiError;
use crate::app::App;
use crate::cache::Lookup;
use crate::cache::Placement;
use crate::cache::responses::{self, CacheStatus, CachedResponse};
use crate::common::BudgetShare;
use crate::deploy::{Admitted, VersionEntry};
use crate::runtime::{InvokeError, ResponseBody};

/// A request as the data plane runs it: streaming, or read whole after admission.
pub(super) enum Input {
    Stream(Request<Body>),
    Whole(Whole),
}

/// A request whose body was read whole after admission: the concurrency slot it was
/// admitted with (none for a request without a body: it reads nothing, and a cache hit
/// runs nothing) and the share of the body budget its bytes hold until the guest has
/// answered.
pub(super) struct Whole {
    pub(super) parts: http::request::Parts,
    pub(super) body: bytes::Bytes,
    pub(super) slot: Option<Admitted>,
    pub(super) share: BudgetShare,
}

/// Takes a concurrency slot of `entry`, then reads the body whole (at most
/// `max_body_bytes`, within the body budget and `tenant`'s part of it: the tenant billed),
/// all within the version's timeout. A request
/// without a body takes no slot here: a cache hit then needs none, a miss takes one to run.
pub(super) async fn admit_and_read(
    app: &App,
    entry: &VersionEntry,
    tenant: &Arc<str>,
    req: Request<Body>,
) -> Result<Whole, ApiError> {
    let max_body = app.config.max_body_bytes;
    if content_length(&req).is_some_and(|len| len > max_body) {
        return Err(refuse_large(req, max_body).await);
    }
    let started = Instant::now();
    let timeout = Duration::from_millis(entry.record.limits.timeout_ms);
    let (parts, body) = req.into_parts();
    let mut share = app.body_budget.share(tenant);
    if http_body::Body::size_hint(&body).exact() == Some(0) {
        return Ok(Whole {
            parts,
            body: bytes::Bytes::new(),
            slot: None,
            share,
        });
    }
    let slot = Some(entry.admission.admit(timeout).await?);
    let left = timeout.saturating_sub(started.elapsed());
    let rate = super::MinRate::of(&app.config.server);
    let body = tokio::time::timeout(left, read_body(body, max_body, rate, &mut share))
        .await
        .map_err(|_| {
            ApiError::RequestTimeout(format!(
                "the request body did not arrive within {} ms",
                timeout.as_millis()
            ))
        })??;
    Ok(Whole {
        parts,
        body,
        slot,
        share,
    })
}

/// The cached path: the body is read whole (it is part of the key); a hit answers from
/// the cache, a miss runs the guest once for every concurrent identical request and stores
/// a storable answer.
pub(super) async fn cached(
    app: &Arc<App>,
    entry: &VersionEntry,
    whole: Whole,
    rest: &str,
    at: &Placement,
    usage: &mut Usage,
) -> Result<Served, ApiError> {
    let Whole {
        parts,
        body,
        slot,
        share,
    } = whole;
    usage.bytes_in = body.len() as u64;
    let record = &entry.record;
    let vary = record
        .cache
        .responses
        .as_ref()
        .map_or(&[][..], |p| p.vary.as_slice());
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    let vars = super::data_plane::guest_vars(entry, usage)?;
    let key = responses::key(
        at.scope,
        &record.digest,
        &vars,
        &parts.method,
        &path_and_query,
        vary,
        &parts.headers,
        &body,
    );
    let looked = Instant::now();
    let wait = Duration::from_millis(record.limits.timeout_ms);
    match app.responses.lookup(at, key, wait).await {
        Lookup::Hit(stored, age) => {
            usage.cache = CacheStatus::Hit.as_str();
            usage.prediction = stored.prediction.clone();
            let mut resp = Response::new(full(stored.body.clone()));
            *resp.status_mut() = stored.status;
            *resp.headers_mut() = stored.headers.clone();
            resp.headers_mut()
                .insert(header::AGE, HeaderValue::from(age.as_secs()));
            set_server_timing(
                resp.headers_mut(),
                None,
                Some((CacheStatus::Hit, looked.elapsed())),
            );
            // A hit runs nothing and needs no request bytes: both are given back now.
            drop((slot, share));
            Ok((resp, None))
        }
        Lookup::Miss(mut fill) => {
            let lookup = looked.elapsed();
            let (resp, slot, timings) =
                run(app, entry, parts, full(body), rest, usage, None, slot).await?;
            // The guest has answered: the request bytes are no longer held for it.
            drop(share);
            let (mut head, body) = resp.into_parts();
            let body = if responses::storable(head.status, &head.headers) {
                match collect_up_to(body, app.responses.max_entry()).await {
                    Ok(Ok(bytes)) => {
                        let stored = CachedResponse {
                            status: head.status,
                            headers: head.headers.clone(),
                            body: bytes.clone(),
                            prediction: usage
                                .prediction
                                .clone()
                                .or_else(|| timings.inference.prediction().map(|c| c.to_string())),
                        };
                        let size = stored.size();
                        fill.store(at, Arc::new(stored), size);
                        full(bytes)
                    }
                    Ok(Err(partial)) => partial,
                    Err(e) => {
                        return Err(ApiError::Invoke(InvokeError::GuestError(format!(
                            "the response body failed: {e}"
                        ))));
                    }
                }
            } else {
                body.boxed_unsync()
            };
            drop(fill);
            set_server_timing(
                &mut head.headers,
                Some(&timings),
                Some((CacheStatus::Miss, lookup)),
            );
            Ok((Response::from_parts(head, body), Some(slot)))
        }
    }
}

/// Reads a request body whole, refusing it past `max` bytes (413) or past what `share`
/// can take from the body budget (503 `server.busy`, at once). The share grows with the
/// bytes that arrive: a client announcing a large body and sending little holds little.
async fn read_body(
    mut body: Body,
    max: u64,
    rate: super::MinRate,
    share: &mut BudgetShare,
) -> Result<bytes::Bytes, ApiError> {
    let busy = |e: crate::common::OverBudget| {
        ApiError::Busy(format!(
            "the server holds too many request bodies in memory ({e}); try again"
        ))
    };
    let announced = http_body::Body::size_hint(&body)
        .exact()
        .unwrap_or(0)
        .min(max);
    share.grow(announced).map_err(busy)?;
    let mut buf = bytes::BytesMut::with_capacity(announced as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match super::too_slow(&e) {
            true => ApiError::RequestTimeout(super::too_slow_message(rate)),
            false => ApiError::InvalidRequest(format!("reading the request body: {e}")),
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let len = (buf.len() + data.len()) as u64;
        if len > max {
            return Err(ApiError::TooLarge(format!(
                "request body exceeds the limit of {max} bytes"
            )));
        }
        share
            .grow(len.saturating_sub(share.bytes()))
            .map_err(busy)?;
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

/// Reads `body` whole if it is at most `max` bytes; otherwise gives back a body that
/// replays what was read and streams the rest.
async fn collect_up_to(
    mut body: ResponseBody,
    max: u64,
) -> Result<Result<bytes::Bytes, Body>, super::BodyError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(data) = frame.data_ref() {
            buf.extend_from_slice(data);
        }
        if buf.len() as u64 > max {
            let head = futures::stream::once(futures::future::ready(Ok(http_body::Frame::data(
                buf.freeze(),
            ))));
            let tail = http_body_util::BodyStream::new(body);
            let stream = futures::StreamExt::chain(head, tail);
            return Ok(Err(http_body_util::StreamBody::new(stream).boxed_unsync()));
        }
    }
    Ok(Ok(buf.freeze()))
}
