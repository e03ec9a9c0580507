//! The data plane: `/fn/{name}[@{version}]/{rest...}`. Picks the version, answers from the
//! response cache when the function has one, enforces the body limit and the version's
//! admission gate, loads the version (cold start if needed), runs the guest on a fresh
//! instance with the path rewritten to `/{rest...}`, adds `x-kiln-version`,
//! `x-kiln-cache` and `server-timing` to the response, and writes the request's usage
//! record ([`super::usage`]) when its body has been sent. A request drawn for the traffic
//! policy's shadow, or looked up in the response cache, has its body read whole once it
//! is admitted, within the server's body budget ([`super::whole`]); a shadow copy is sent
//! once the primary answered ([`super::shadow`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{Body, BodyStats, LimitedBody, Tapped, full};
use super::pace::{MinRate, paced};
use super::shadow;
use super::usage::Usage;
use super::whole::{Input, admit_and_read, cached};
use crate::api::ApiError;
use crate::app::App;
use crate::auth::{AuthError, Caller};
use crate::cache::responses::{self, CacheStatus};
use crate::deploy::{Admitted, RouteError, VersionEntry};
use crate::runtime::{ResponseBody, Timings};

/// What `/fn/{target}/` names: a function, and a version or an alias of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FnTarget<'a> {
    pub name: &'a str,
    /// `@N`.
    pub pinned: Option<u32>,
    /// `:alias`.
    pub alias: Option<&'a str>,
}

/// Splits `/fn/{name}[@{version}|:{alias}]{/rest}` into its parts; `rest` is at least `/`.
pub fn parse_fn_path(path: &str) -> Result<(FnTarget<'_>, &str), ApiError> {
    let tail = path.strip_prefix("/fn/").unwrap_or(path);
    let (target, rest) = match tail.find('/') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, "/"),
    };
    let (name, pinned, alias) = match (target.split_once('@'), target.split_once(':')) {
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidRequest(format!(
                "/fn/{target}: name a version (@N) or an alias (:name), not both"
            )));
        }
        (Some((name, v)), None) => {
            let v = v.parse::<u32>().map_err(|_| {
                ApiError::InvalidRequest(format!(
                    "invalid version {v:?} in /fn/{target}: expected a number"
                ))
            })?;
            (name, Some(v), None)
        }
        (None, Some((name, alias))) => (name, None, Some(alias)),
        (None, None) => (target, None, None),
    };
    if name.is_empty() {
        return Err(ApiError::NoRoute(
            "/fn/ needs a function name: /fn/{name}/...".into(),
        ));
    }
    Ok((
        FnTarget {
            name,
            pinned,
            alias,
        },
        rest,
    ))
}

/// Request header forcing a version (and response header naming the one that answered).
pub const VERSION_HEADER: &str = "x-kiln-version";
/// A guest's statement of what the request predicted (a class label or a value): recorded
/// with the request's usage, for accuracy against posted feedback, and removed from the
/// response.
pub const PREDICTION_HEADER: &str = "x-kiln-prediction";
/// Longest prediction kept (a longer header is dropped, not cut).
const MAX_PREDICTION_BYTES: usize = 256;

/// The prediction an `x-kiln-prediction` header states: its trimmed text, unless empty,
/// longer than 256 bytes or not text.
pub fn prediction_of(v: &HeaderValue) -> Option<String> {
    v.to_str()
        .ok()
        .map(str::trim)
        .filter(|p| !p.is_empty() && p.len() <= MAX_PREDICTION_BYTES)
        .map(str::to_string)
}

/// A response and the concurrency permit its body holds (none for a cache hit).
pub(super) type Served = (Response<Body>, Option<Admitted>);

/// Serves one data-plane request; `id` is its request id (the usage record's key).
pub async fn handle(
    app: &Arc<App>,
    req: Request<Incoming>,
    id: &HeaderValue,
) -> Result<Response<Body>, ApiError> {
    let started = app.config.server.access_log.then(Instant::now);
    let admitted = parse_fn_path(req.uri().path())
        .and_then(|(target, rest)| Ok((admit(app, &req, target)?, target.alias, rest)));
    let (admitted, alias, rest) = match admitted {
        Ok(a) => a,
        // Refused before a version was chosen: no usage record, so the line is the front
        // door's (those of admitted requests are written with their record).
        Err(e) => {
            if let Some(started) = started {
                super::router::access_line(id, req.method(), req.uri().path(), e.status(), started);
            }
            return Err(e);
        }
    };
    let alias = alias.map(Arc::<str>::from);
    let Admit {
        entry,
        tenant,
        owner,
        routed,
        shadow: shadowed,
        variables,
    } = admitted;
    let placement = &entry.responses;
    let head = req.method() == http::Method::HEAD;
    let mut usage = Usage::new(app, &entry, tenant, id, placement.is_some(), head);
    usage.routed = routed;
    usage.alias = alias;
    usage.variables = variables;
    let rest = rest.to_string();
    let req = req.map(|b| paced(b, MinRate::of(&app.config.server)));
    let cacheable = placement.is_some() && !responses::bypass(req.method(), req.headers());
    // A request copied to a shadow, or looked up in the response cache, is read whole,
    // after admission (a queued request holds no body bytes) and within the server's
    // body budget. The shadow gets the same bytes; both latencies are counted from when
    // the body is in.
    let mut primary_start = usage.started;
    let input = match shadowed.is_some() || cacheable {
        true => match admit_and_read(app, &entry, usage.tenant(), req).await {
            Ok(whole) => {
                primary_start = Instant::now();
                Input::Whole(whole)
            }
            Err(e) => {
                if let Some(to) = &shadowed {
                    shadow::skip(app, to);
                }
                usage.fail(&e).await;
                return Err(e);
            }
        },
        false => Input::Stream(req),
    };
    let copy = match (&input, shadowed) {
        (Input::Whole(w), Some(to)) => Some(shadow::copy_of(
            &w.parts,
            &w.body,
            &rest,
            id,
            owner,
            to,
            (usage.alias.clone(), usage.variables.clone()),
        )),
        _ => None,
    };
    let served = match (placement, input) {
        (Some(at), Input::Whole(whole)) if cacheable => {
            cached(app, &entry, whole, &rest, at, &mut usage).await
        }
        (Some(_), input) => {
            usage.cache = CacheStatus::Bypass.as_str();
            streamed(
                app,
                &entry,
                input,
                &rest,
                &mut usage,
                Some(CacheStatus::Bypass),
            )
            .await
        }
        (None, input) => streamed(app, &entry, input, &rest, &mut usage, None).await,
    };
    match served {
        Ok((mut resp, guard)) => {
            let h = resp.headers_mut();
            h.insert(VERSION_HEADER, HeaderValue::from(entry.record.version));
            if placement.is_some() {
                h.insert("x-kiln-cache", HeaderValue::from_static(usage.cache));
            }
            if let Some(copy) = copy {
                let (parts, body) = resp.into_parts();
                let (body, primary) = Tapped::new(body);
                let took = primary_start.elapsed();
                shadow::spawn(app.clone(), &entry, copy, parts.status, took, primary);
                resp = Response::from_parts(parts, body.boxed_unsync());
            }
            Ok(usage.finish(resp, guard).await)
        }
        Err(e) => {
            if let Some(copy) = copy {
                shadow::skip(app, &copy.to);
            }
            usage.fail(&e).await;
            Err(e)
        }
    }
}

/// What [`admit`] decided.
struct Admit {
    /// The version that serves the request.
    entry: Arc<VersionEntry>,
    /// The tenant billed: the key's, or the owner's when no key was needed.
    tenant: Arc<str>,
    /// The function's owner (who pays for its shadow copies).
    owner: Arc<str>,
    /// Routed by the main policy: neither forced nor through an alias.
    routed: bool,
    /// The shadow version the request is to be copied to, if drawn and eligible.
    shadow: Option<Arc<VersionEntry>>,
    /// The function's variable values as admitted, when its version (or its shadow's)
    /// declares any: what its guests read, even if the function is deleted and made again
    /// (by anyone) while the request waits.
    variables: Option<Arc<crate::deploy::variables::FunctionVariables>>,
}

/// Checks who calls (a key of the owning tenant with an invoke scope, or anyone for a
/// public function) and the key's and the function's rate limits; picks the version and,
/// when the policy has a shadow, whether this request is copied to it.
/// An anonymous caller learns nothing of private functions: they answer 401 as if absent.
fn admit(app: &App, req: &Request<Incoming>, target: FnTarget<'_>) -> Result<Admit, ApiError> {
    let FnTarget {
        name,
        pinned,
        alias,
    } = target;
    let caller = app.auth.authenticate(req.headers())?;
    let anonymous = matches!(caller, Caller::Anonymous);
    let Some(f) = app.registry.function(name) else {
        return Err(match anonymous {
            true => AuthError::Missing.into(),
            false => RouteError::NoFunction(name.to_string()).into(),
        });
    };
    caller.may_invoke(name, &f.owner, f.public)?;
    // `@N` in the path, or `x-kiln-version: N`, forces a version (even one at 0%).
    let forced = match (pinned, req.headers().get(VERSION_HEADER)) {
        (Some(n), _) => Some(n),
        (None, Some(v)) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u32>().ok())
                .ok_or_else(|| {
                    ApiError::InvalidRequest(format!(
                        "{VERSION_HEADER}: {v:?} is not a version number"
                    ))
                })?,
        ),
        (None, None) => None,
    };
    if let Some(l) = &f.limiter {
        l.check().map_err(|retry_after| AuthError::RateLimited {
            what: format!("function {name:?}"),
            rate: l.rate(),
            retry_after,
        })?;
    }
    let routing = f.routing_for(alias)?;
    // Forcing a version the policy does not route (a candidate at 0%, an old one) is
    // someone looking at one version: it needs the right to invoke the function as its
    // owner would, even when the function is public.
    if let Some(n) = forced {
        let routed = match routing {
            Some(r) => r.routes(n),
            None => f.latest().is_some_and(|v| v.record.version == n),
        };
        if !routed {
            if anonymous {
                return Err(AuthError::Forbidden(format!(
                    "version {n} of function {name:?} takes no public traffic: forcing it needs an API key with invoke rights on the function"
                ))
                .into());
            }
            caller.may_invoke(name, &f.owner, false)?;
        }
    }
    let entry = f
        .route_request(forced, routing, req.headers(), &app.sticky())?
        .clone();
    let tenant = match caller {
        Caller::Key(k) => k.tenant.clone(),
        Caller::Open | Caller::Anonymous => f.owner.clone(),
    };
    if app.budgets_exhausted.contains(&tenant) {
        return Err(ApiError::BudgetExhausted(format!(
            "tenant {tenant:?} has spent its hard budget for this month; raise it with kiln budgets set"
        )));
    }
    // A forced version is someone looking at one version: not shadowed.
    let drawn = match (forced, routing) {
        (None, Some(r)) => r
            .shadow_for(entry.record.version)
            .and_then(|v| f.versions.get(&v).cloned()),
        _ => None,
    };
    let shadow = drawn.filter(|to| {
        let eligible = shadow::eligible(req, app.config.max_body_bytes);
        if !eligible {
            shadow::skip(app, to);
        }
        eligible
    });
    // Taken only when a guest will read them: most versions declare none.
    let variables = (!entry.record.variables.is_empty()
        || shadow
            .as_ref()
            .is_some_and(|s| !s.record.variables.is_empty()))
    .then(|| f.variables.clone());
    Ok(Admit {
        entry,
        tenant,
        owner: f.owner.clone(),
        routed: forced.is_none() && alias.is_none_or(|a| a == crate::deploy::DEFAULT_ALIAS),
        shadow,
        variables,
    })
}

/// Refuses a body announced larger than the limit (reading a modest one first, so the
/// client sees the answer rather than a reset).
pub(super) async fn refuse_large(req: Request<Body>, max: u64) -> ApiError {
    let len = content_length(&req).unwrap_or(0);
    if len <= super::body::DRAIN_CAP as u64 {
        super::body::drain(req.into_body()).await;
    }
    ApiError::TooLarge(format!(
        "request body of {len} bytes exceeds the limit of {max} bytes"
    ))
}

/// The uncached path: the request body streams into the guest (or was read whole for a
/// shadow copy), its response out. `cache` is set when a cacheable function's request
/// bypasses the cache.
async fn streamed(
    app: &Arc<App>,
    entry: &VersionEntry,
    input: Input,
    rest: &str,
    usage: &mut Usage,
    cache: Option<CacheStatus>,
) -> Result<Served, ApiError> {
    let (resp, held, timings) = match input {
        Input::Stream(req) => {
            let max_body = app.config.max_body_bytes;
            if content_length(&req).is_some_and(|len| len > max_body) {
                return Err(refuse_large(req, max_body).await);
            }
            let (parts, body) = req.into_parts();
            let (body, stats) = LimitedBody::new(body, max_body);
            usage.body_stats = Some(stats.clone());
            let (resp, slot, timings) =
                run(app, entry, parts, body, rest, usage, Some(&stats), None).await?;
            (resp, slot, timings)
        }
        Input::Whole(w) => {
            usage.bytes_in = w.body.len() as u64;
            let (resp, slot, timings) =
                run(app, entry, w.parts, full(w.body), rest, usage, None, w.slot).await?;
            // The guest has answered: the request bytes are no longer held for it.
            drop(w.share);
            (resp, slot, timings)
        }
    };
    let (mut parts, body) = resp.into_parts();
    let cache = cache.map(|c| (c, Duration::ZERO));
    set_server_timing(&mut parts.headers, Some(&timings), cache);
    Ok((Response::from_parts(parts, body.boxed_unsync()), Some(held)))
}

/// Runs the guest: admission (unless `permit` is a slot already taken), load (cold start),
/// a fresh instance. Returns the guest's response head, the concurrency permit its body
/// must hold, and where the time went.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run<B>(
    app: &Arc<App>,
    entry: &VersionEntry,
    mut parts: http::request::Parts,
    body: B,
    rest: &str,
    usage: &mut Usage,
    stats: Option<&BodyStats>,
    permit: Option<Admitted>,
) -> Result<(Response<ResponseBody>, Admitted, Timings), ApiError>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    let record = &entry.record;
    let admitted = match permit {
        Some(p) => p,
        None => {
            entry
                .admission
                .admit(Duration::from_millis(record.limits.timeout_ms))
                .await?
        }
    };
    let (loaded, cold) = app
        .runtime
        .load(record.id, &record.function, &record.digest, record.limits)
        .await?;

    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    parts.uri = Uri::try_from(path_and_query)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid request path: {e}")))?;
    if !parts.headers.contains_key(header::HOST) {
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("localhost"));
    }
    // The caller's key is Kiln's, never the function's: a guest that echoed or forwarded
    // it could act as its caller.
    parts.headers.remove(header::AUTHORIZATION);

    let mut timings = Timings {
        cold,
        log: Some(crate::runtime::logs::RequestLog {
            book: app.logs.clone(),
            key: entry.log_key.clone(),
            version: record.version,
            request_id: usage.request_id().into(),
        }),
        ..Timings::default()
    };
    usage.cold = cold.is_some();
    usage.guest = Some((timings.usage.clone(), timings.inference.clone()));
    let vars = guest_vars(entry, usage)?;
    let instance = app.metrics.instance();
    let outcome = app
        .runtime
        .invoke(
            loaded,
            entry.models.clone(),
            &entry.outbound,
            &vars,
            Request::from_parts(parts, body),
            &mut timings,
        )
        .await;
    drop(instance);
    // A body that went over the limit makes the request invalid whatever the guest then
    // did with the truncated stream (answered, failed or trapped).
    if stats.is_some_and(|s| s.tripped.load(Ordering::Relaxed)) {
        return Err(ApiError::TooLarge(format!(
            "request body exceeds the limit of {} bytes",
            app.config.max_body_bytes
        )));
    }
    // So does one the client sent too slowly: the guest never had its whole body.
    if stats.is_some_and(|s| s.slow.load(Ordering::Relaxed)) {
        return Err(ApiError::RequestTimeout(super::too_slow_message(
            MinRate::of(&app.config.server),
        )));
    }
    let mut resp = outcome?;
    // The guest's own statement of what it predicted is the platform's, not the client's.
    if let Some(p) = resp.headers_mut().remove(PREDICTION_HEADER) {
        usage.prediction = prediction_of(&p);
    }
    Ok((resp, admitted, timings))
}

/// The variables `entry`'s guest sees on `usage`'s request: its function's values as
/// admitted, for the alias it came through; none unless the version declares some.
pub(super) fn guest_vars(
    entry: &VersionEntry,
    usage: &Usage,
) -> Result<Vec<(String, String)>, ApiError> {
    match &usage.variables {
        Some(values) if !entry.record.variables.is_empty() => {
            Ok(values.resolve(&entry.record.variables, usage.alias.as_deref())?)
        }
        _ => Ok(Vec::new()),
    }
}

pub(super) fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Sets `server-timing`: `cache` (response cache), `cold`, `instantiate`, `handler`,
/// `inference` (backend time, by device) and `inference-cache`.
pub(super) fn set_server_timing(
    headers: &mut http::HeaderMap,
    t: Option<&Timings>,
    cache: Option<(CacheStatus, Duration)>,
) {
    if let Ok(v) = HeaderValue::try_from(server_timing(t, cache)) {
        headers.insert("server-timing", v);
    }
}

/// The `server-timing` value: one buffer, durations written as integer milliseconds and
/// microseconds (`dur=0.042`), on every response (float formatting cost 4k instructions here).
fn server_timing(t: Option<&Timings>, cache: Option<(CacheStatus, Duration)>) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(96);
    let mut entry = |name: &str, dur: Option<Duration>, desc: Option<&str>| {
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(name);
        if let Some(d) = dur {
            // Rounded half up to the microsecond (`{:.3}` of the milliseconds was the same
            // but at exact half-microseconds, where it followed the float).
            let us = (d.as_nanos() + 500) / 1000;
            let _ = write!(out, ";dur={}.{:03}", us / 1000, us % 1000);
        }
        if let Some(desc) = desc {
            let _ = write!(out, ";desc=\"{desc}\"");
        }
    };
    if let Some((status, took)) = cache {
        entry("cache", Some(took), Some(status.as_str()));
    }
    if let Some(t) = t {
        if let Some(cold) = t.cold {
            entry("cold", Some(cold.took), Some(cold.source.as_str()));
        }
        entry("instantiate", Some(t.instantiate), None);
        entry("handler", Some(t.handler), None);
        let inference = t.inference_cpu + t.inference_gpu;
        if !inference.is_zero() {
            let device = if t.inference_gpu.is_zero() {
                "cpu"
            } else {
                "gpu"
            };
            match t.batch {
                (rows, true) => {
                    let desc = format!("{device} batch={rows}");
                    entry("inference", Some(inference), Some(&desc));
                }
                _ => entry("inference", Some(inference), Some(device)),
            }
        }
        let (hits, misses) = t.inference_cache;
        if hits + misses > 0 {
            let desc = match (hits, misses) {
                (_, 0) => "hit",
                (0, _) => "miss",
                _ => "partial",
            };
            entry("inference-cache", None, Some(desc));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fn_paths_split_into_name_version_rest() {
        let ok = |p| {
            parse_fn_path(p)
                .map(|(t, rest)| (t.name, t.pinned, t.alias, rest))
                .map_err(|e| e.to_string())
        };
        assert_eq!(ok("/fn/hello"), Ok(("hello", None, None, "/")));
        assert_eq!(ok("/fn/hello/"), Ok(("hello", None, None, "/")));
        assert_eq!(ok("/fn/hello@3/a/b"), Ok(("hello", Some(3), None, "/a/b")));
        assert_eq!(
            ok("/fn/hello:prod/x"),
            Ok(("hello", None, Some("prod"), "/x"))
        );
        assert!(ok("/fn/hello@x/").is_err());
        assert!(ok("/fn/hello@1:prod/").is_err());
        assert!(ok("/fn/").is_err());
    }

    #[test]
    fn server_timing_names_each_stage_in_milliseconds() {
        let t = Timings {
            instantiate: Duration::from_micros(42),
            handler: Duration::from_micros(1_234_567),
            inference_cpu: Duration::from_micros(7),
            inference_cache: (1, 0),
            ..Timings::default()
        };
        assert_eq!(
            server_timing(
                Some(&t),
                Some((CacheStatus::Miss, Duration::from_micros(5)))
            ),
            "cache;dur=0.005;desc=\"miss\", instantiate;dur=0.042, handler;dur=1234.567, \
             inference;dur=0.007;desc=\"cpu\", inference-cache;desc=\"hit\""
        );
        assert_eq!(server_timing(None, None), "");
        let batched = Timings {
            inference_cpu: Duration::from_micros(7),
            batch: (8, true),
            ..Timings::default()
        };
        assert!(
            server_timing(Some(&batched), None)
                .ends_with("inference;dur=0.007;desc=\"cpu batch=8\""),
            "{}",
            server_timing(Some(&batched), None)
        );
        // Rounded to the microsecond, not truncated.
        let at = |ns| server_timing(None, Some((CacheStatus::Hit, Duration::from_nanos(ns))));
        assert_eq!(at(1_499), "cache;dur=0.001;desc=\"hit\"");
        assert_eq!(at(1_501), "cache;dur=0.002;desc=\"hit\"");
        assert_eq!(at(999_999), "cache;dur=1.000;desc=\"hit\"");
    }
}
