//! The data plane: `/fn/{name}[@{version}]/{rest...}`. Picks the version, enforces the body
//! limit and the version's admission gate, loads the version (cold start if needed), runs
//! the guest on a fresh instance with the path rewritten to `/{rest...}`, and adds
//! `x-kiln-version` and `server-timing` to the guest's response.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{Body, Holding, LimitedBody};
use crate::api::ApiError;
use crate::app::App;
use crate::meter::Outcome;
use crate::runtime::{InvokeError, Timings};

/// Splits `/fn/{name}[@{version}]{/rest}` into its parts; `rest` is at least `/`.
pub fn parse_fn_path(path: &str) -> Result<(&str, Option<u32>, &str), ApiError> {
    let tail = path.strip_prefix("/fn/").unwrap_or(path);
    let (target, rest) = match tail.find('/') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, "/"),
    };
    let (name, pinned) = match target.split_once('@') {
        Some((name, v)) => {
            let v = v.parse::<u32>().map_err(|_| {
                ApiError::InvalidRequest(format!(
                    "invalid version {v:?} in /fn/{target}: expected a number"
                ))
            })?;
            (name, Some(v))
        }
        None => (target, None),
    };
    if name.is_empty() {
        return Err(ApiError::NoRoute(
            "/fn/ needs a function name: /fn/{name}/...".into(),
        ));
    }
    Ok((name, pinned, rest))
}

/// Serves one data-plane request.
pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (name, pinned, rest) = parse_fn_path(req.uri().path())?;
    let entry = app.registry.route(name, pinned)?;
    let record = &entry.record;
    let started = Instant::now();
    let rejected = || entry.metrics.record(Outcome::Rejected, None, false);
    let max_body = app.config.max_body_bytes;
    if let Some(len) = content_length(&req)
        && len > max_body
    {
        rejected();
        if len <= super::body::DRAIN_CAP as u64 {
            super::body::drain(req.into_body()).await;
        }
        return Err(ApiError::TooLarge(format!(
            "request body of {len} bytes exceeds the limit of {max_body} bytes"
        )));
    }
    let admitted = match entry
        .admission
        .admit(Duration::from_millis(record.limits.timeout_ms))
        .await
    {
        Ok(a) => a,
        Err(e) => {
            rejected();
            return Err(e.into());
        }
    };
    let blob = app.blobs.path(&record.digest);
    let (loaded, cold) = app
        .runtime
        .load(
            record.id,
            &record.function,
            &record.digest,
            record.limits,
            &blob,
        )
        .await?;

    let path_and_query = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    let (mut parts, body) = req.into_parts();
    parts.uri = Uri::try_from(path_and_query)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid request path: {e}")))?;
    if !parts.headers.contains_key(header::HOST) {
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("localhost"));
    }
    let (body, tripped) = LimitedBody::new(body, max_body);

    let mut timings = Timings {
        cold,
        ..Timings::default()
    };
    let instance = app.metrics.instance();
    let outcome = app
        .runtime
        .invoke(
            loaded,
            entry.models.clone(),
            Request::from_parts(parts, body),
            &mut timings,
        )
        .await;
    drop(instance);
    let label = match &outcome {
        Ok(_) => Outcome::Ok,
        Err(InvokeError::Timeout(_)) => Outcome::Timeout,
        Err(InvokeError::NoResponse | InvokeError::GuestError(_)) => Outcome::GuestError,
        Err(InvokeError::Trap(_) | InvokeError::Internal(_)) => Outcome::Trap,
    };
    entry
        .metrics
        .record(label, Some(started.elapsed()), timings.cold.is_some());
    // A body that went over the limit makes the request invalid whatever the guest then
    // did with the truncated stream (answered, failed or trapped).
    if tripped.load(Ordering::Relaxed) {
        return Err(ApiError::TooLarge(format!(
            "request body exceeds the limit of {max_body} bytes"
        )));
    }
    let resp = outcome?;

    let (mut parts, body) = resp.into_parts();
    parts
        .headers
        .insert("x-kiln-version", HeaderValue::from(record.version));
    if let Ok(v) = HeaderValue::try_from(server_timing(&timings)) {
        parts.headers.insert("server-timing", v);
    }
    Ok(Response::from_parts(
        parts,
        Holding::new(body, admitted).boxed_unsync(),
    ))
}

fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn server_timing(t: &Timings) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut s = String::with_capacity(64);
    if let Some(cold) = t.cold {
        let _ = write!(s, "cold;dur={:.3}, ", ms(cold));
    }
    let _ = write!(
        s,
        "instantiate;dur={:.3}, handler;dur={:.3}",
        ms(t.instantiate),
        ms(t.handler)
    );
    let inference = t.inference_cpu + t.inference_gpu;
    if !inference.is_zero() {
        let device = if t.inference_gpu.is_zero() {
            "cpu"
        } else {
            "gpu"
        };
        let _ = write!(s, ", inference;dur={:.3};desc=\"{device}\"", ms(inference));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fn_paths_split_into_name_version_rest() {
        let ok = |p| parse_fn_path(p).map_err(|e| e.to_string());
        assert_eq!(ok("/fn/hello"), Ok(("hello", None, "/")));
        assert_eq!(ok("/fn/hello/"), Ok(("hello", None, "/")));
        assert_eq!(ok("/fn/hello@3/a/b"), Ok(("hello", Some(3), "/a/b")));
        assert!(ok("/fn/hello@x/").is_err());
        assert!(ok("/fn/").is_err());
    }
}
