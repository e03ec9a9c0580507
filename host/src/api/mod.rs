//! The control plane: JSON over HTTP under `/v1`. The only module that turns requests into
//! calls on the stores, the runtime and the registry. Every call needs an API key with the
//! right scope, and every call made with a key (refusals included) is written to the audit
//! log. Calls without a valid key (401) and over a rate limit (429) are counted in
//! `kiln_auth_refusals_total` instead: they carry no identity, and anyone could flood them.
//! A call runs to its end (its audit entry included) even if the client hangs up.
//! Every `GET` also answers `HEAD`; every list is paged the same way ([`page`]).
//!
//! | method | path | what | needs |
//! |---|---|---|---|
//! | `GET` | `/v1/openapi.json` | this API's OpenAPI 3.1 description | nothing |
//! | `PUT`, `HEAD` | `/v1/blobs/sha256:{hex}` | upload (digest verified) / check a blob | deploy |
//! | `GET` | `/v1/functions` | list functions (the tenant's; all for admin) | a key |
//! | `GET`, `DELETE` | `/v1/functions/{name}` | show / delete a function | owner / deploy |
//! | `GET` | `/v1/functions/{name}/versions` | list versions | owner |
//! | `POST` | `/v1/functions/{name}/versions` | deploy: `application/wasm` body or JSON manifest | deploy |
//! | `GET` | `/v1/functions/{name}/versions/{v}` | show one version | owner |
//! | `GET` | `/v1/functions/{name}/versions/{v}/stats` | recent requests, errors, latency, cold starts, cache hits | owner |
//! | `GET` | `/v1/functions/{name}/versions/{v}/drift` | input and prediction drift of its monitored models | owner |
//! | `POST` | `/v1/functions/{name}/versions/{v}/reference` | make a window's traffic its monitors' reference | deploy |
//! | `GET` | `/v1/functions/{name}/logs` | what its guests printed: by version, request id, since; `follow=true` streams (SSE) | owner |
//! | `GET` | `/v1/functions/{name}/versions/{v}/quality` | predictions, labelled ones, accuracy (mae, rmse) | owner |
//! | `POST` | `/v1/feedback` | ground truth for requests by id (JSON or NDJSON) | the request's tenant |
//! | `GET` | `/v1/budgets` | tenants' monthly budgets with the month's spend | admin |
//! | `PUT`, `DELETE` | `/v1/budgets/{tenant}` | set / remove a tenant's budget | admin |
//! | `DELETE` | `/v1/functions/{name}/cache` | drop the function's cached responses and inference results | deploy |
//! | `GET`, `PUT` | `/v1/functions/{name}/traffic` | read / replace the traffic policy | owner / deploy |
//! | `GET`, `PUT`, `DELETE` | `/v1/functions/{name}/aliases/{alias}` | a named policy (`/fn/{name}:{alias}/`) | owner / deploy |
//! | `POST` | `/v1/functions/{name}/promote` | copy one alias's policy onto another (`default`: the main one) | deploy |
//! | `POST` | `/v1/functions/{name}/rollback` | back to the previous policy (main, or an alias's) | deploy |
//! | `GET` | `/v1/functions/{name}/history` | traffic changes, rollout steps, rollbacks, newest first | owner |
//! | `POST`, `GET` | `/v1/functions/{name}/rollout` | start a progressive rollout / see it | deploy / owner |
//! | `POST` | `/v1/functions/{name}/rollout/{pause,resume,abort}` | control the rollout in progress | deploy |
//! | `GET` | `/v1/usage` | usage totals (grouped) or records as CSV | `usage:read` |
//! | `POST`, `GET` | `/v1/keys` | create a key (its secret shown once) / list keys | admin |
//! | `DELETE` | `/v1/keys/{id}` | revoke a key, at once | admin |
//! | `GET` | `/v1/audit` | the audit log, newest first | `audit:read` |
//! | `GET` | `/v1/cluster` | the live nodes: id, address, version, heartbeat, loaded versions, in-flight requests | admin |

mod audit;
mod blobs;
mod budgets;
mod error;
pub mod functions;
mod idempotency;
mod keys;
mod logs;
mod monitor;
mod ops;
mod page;
mod rollout;
mod traffic;
pub mod usage;
mod variables;

use std::sync::Arc;

use http::{Request, Response, StatusCode};

pub use error::ApiError;
pub use functions::CreateVersion;
use ops::Op;

use crate::app::App;
use crate::auth::{AuthError, Caller};
use crate::server::Body;

/// What a handler adds to its audit entry (set as a response extension): what it made,
/// and the tenant it acted on when the route does not say.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditDetail {
    pub detail: String,
    pub subject: Option<String>,
}

/// Dispatches a `/v1/...` request: authenticates, authorizes, runs it, audits it. The work
/// runs in a task of its own, so a client that hangs up cannot cut a change (or its audit
/// entry) short.
pub async fn handle(
    app: &Arc<App>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    let rate = crate::server::MinRate::of(&app.config.server);
    let req = req.map(|b| crate::server::paced(b, rate));
    let app = app.clone();
    tokio::spawn(async move { handle_to_end(&app, req).await })
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::Internal(anyhow::anyhow!(
                "control-plane task: {e}"
            )))
        })
}

async fn handle_to_end(app: &Arc<App>, req: Request<Body>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let decoded = path
        .split('/')
        .skip(2)
        .map(decode_segment)
        .collect::<Result<Vec<String>, ApiError>>()?;
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let method = req.method().clone();
    let op = Op::parse(&method, &segments, &path)?;
    if let Op::OpenApi = op {
        // The contract is public: clients and fuzzers read it before they hold a key.
        crate::server::drain(req.into_body()).await;
        return Ok(openapi());
    }
    let caller = match app.auth.authenticate(req.headers()) {
        Ok(Caller::Anonymous) => Err(AuthError::Missing),
        other => other,
    };
    let caller = match caller {
        Ok(c) => c,
        Err(e) => {
            crate::server::drain(req.into_body()).await;
            return Err(e.into());
        }
    };
    let subject = op.subject(app);
    let result = match op.authorize(app, &caller) {
        Ok(()) => dispatch(app, op, &caller, req).await,
        Err(e) => {
            crate::server::drain(req.into_body()).await;
            Err(e)
        }
    };
    let status = match &result {
        Ok(r) => r.status(),
        Err(e) => e.status(),
    };
    if status != StatusCode::TOO_MANY_REQUESTS {
        let (action, target) = op.describe();
        let (detail, subject) = match &result {
            Ok(r) => {
                let note = r
                    .extensions()
                    .get::<AuditDetail>()
                    .cloned()
                    .unwrap_or_default();
                (note.detail, note.subject.or(subject))
            }
            Err(e) => (format!("{e:#}"), subject),
        };
        app.auth
            .record(
                Some(&caller),
                action,
                target,
                subject.as_deref(),
                status.as_u16(),
                &detail,
            )
            .await;
    }
    result
}

async fn dispatch(
    app: &Arc<App>,
    op: Op<'_>,
    caller: &Caller,
    req: Request<Body>,
) -> Result<Response<Body>, ApiError> {
    let query = req.uri().query().unwrap_or("").to_string();
    let query = query.as_str();
    match op {
        Op::OpenApi => Ok(openapi()),
        Op::PutBlob(d) => blobs::put(app, d, req, caller).await,
        Op::HeadBlob(d) => blobs::head(app, d, caller).await,
        Op::ListFunctions => functions::list(app, caller, &req),
        Op::ShowFunction(n) => functions::show(app, n, &req),
        Op::DeleteFunction(n) => functions::delete(app, n, caller).await,
        Op::ListVersions(n) => functions::versions(app, n, &req),
        Op::CreateVersion(n) => functions::create_version(app, n, req, caller).await,
        Op::ShowVersion(n, v) => functions::version(app, n, v, &req),
        Op::VersionStats(n, v) => traffic::stats(app, n, v, query),
        Op::VersionDrift(n, v) => monitor::drift(app, n, v, query).await,
        Op::SetReference(n, v) => monitor::set_reference(app, caller, n, v, req).await,
        Op::Logs(n) => logs::get(app, n, query),
        Op::GetVariables(n) => variables::get(app, n, query),
        Op::ChangeVariables(n) => variables::change(app, n, req, caller).await,
        Op::VersionQuality(n, v) => monitor::quality(app, n, v, query).await,
        Op::Feedback => monitor::feedback(app, req, caller).await,
        Op::ListBudgets => budgets::list(app).await,
        Op::PutBudget(t) => budgets::put(app, t, req).await,
        Op::DeleteBudget(t) => budgets::delete(app, t).await,
        Op::ClearCache(n) => functions::clear_cache(app, n),
        Op::GetTraffic(n) => traffic::get(app, n, None),
        Op::PutTraffic(n) => traffic::put(app, n, None, req, caller).await,
        Op::GetAlias(n, a) => traffic::get(app, n, Some(a)),
        Op::PutAlias(n, a) | Op::DeleteAlias(n, a) => {
            traffic::put(app, n, Some(a), req, caller).await
        }
        Op::Promote(n) => traffic::promote(app, n, req, caller).await,
        Op::History(n) => traffic::history(app, n, query, caller).await,
        Op::Rollback(n) => traffic::rollback(app, n, req, caller).await,
        Op::GetRollout(n) => rollout::get(app, n).await,
        Op::StartRollout(n) => rollout::start(app, n, req, caller).await,
        Op::ControlRollout(n, a) => rollout::control(app, n, a, req, caller).await,
        Op::Usage => usage::get(app, query, caller).await,
        Op::CreateKey => keys::create(app, req, caller).await,
        Op::ListKeys => keys::list(app, query),
        Op::RevokeKey(id) => keys::revoke(app, id).await,
        Op::Audit => audit::get(app, query, caller).await,
        Op::Cluster => cluster(app).await,
    }
}

/// The OpenAPI 3.1 description of this API (`openapi.json` beside this file), with this
/// build's version.
static OPENAPI: std::sync::LazyLock<bytes::Bytes> = std::sync::LazyLock::new(|| {
    let mut doc: serde_json::Value =
        serde_json::from_str(include_str!("openapi.json")).unwrap_or_default();
    doc["info"]["version"] = env!("CARGO_PKG_VERSION").into();
    serde_json::to_vec(&doc).unwrap_or_default().into()
});

/// `GET /v1/openapi.json`: needs no key.
fn openapi() -> Response<Body> {
    let mut resp = Response::new(crate::server::full(OPENAPI.clone()));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// `GET /v1/cluster`: every node alive (a heartbeat within the last
/// [`crate::app::LIVE_WITHIN`]) as it last reported itself, and which one answers.
async fn cluster(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    let nodes = app.nodes().await.map_err(ApiError::Internal)?;
    Ok(crate::server::json_response(
        StatusCode::OK,
        &serde_json::json!({
            "node": app.node_id,
            "database": app.meta.describe(),
            "live_within_ms": crate::app::LIVE_WITHIN.as_millis() as u64,
            // What this node divides every rate limit by (its count at the last heartbeat).
            "rate_limit_nodes": app.live_nodes(),
            "nodes": nodes,
        }),
    ))
}

/// Marks `resp` (a 201) as having made the resource at `path` (`Location`, relative to
/// this server: right behind any proxy).
pub(crate) fn created_at(resp: &mut Response<Body>, path: &str) {
    if let Ok(v) = http::HeaderValue::try_from(path) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
}

/// Reads a small request body (a manifest, a policy) whole, refusing it past `max` bytes;
/// `what` names it in the error.
pub(crate) async fn read_small_body(
    body: Body,
    max: usize,
    what: &str,
) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt;
    Ok(http_body_util::Limited::new(body, max)
        .collect()
        .await
        .map_err(|e| match e.downcast_ref::<crate::server::BodyError>() {
            Some(e) => body_error(e, what),
            None => ApiError::TooLarge(format!("{what}: {e}")),
        })?
        .to_bytes())
}

/// What a client hears when its request body failed to arrive: 408 when it came too
/// slowly (`[server] min_body_bytes_per_s`), else 400.
pub(crate) fn body_error(e: &crate::server::BodyError, what: &str) -> ApiError {
    match crate::server::too_slow(e) {
        true => ApiError::RequestTimeout(format!(
            "the {what} arrived slower than this server accepts ([server] min_body_bytes_per_s); send it faster"
        )),
        false => ApiError::InvalidRequest(format!("reading the {what} failed: {e}")),
    }
}

/// Reads a small JSON request body whole and parses it.
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    body: Body,
    max: usize,
    what: &str,
) -> Result<T, ApiError> {
    let bytes = read_small_body(body, max, what).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid {what}: {e}")))
}

/// Reads a small optional JSON body (rollbacks, rollout actions); empty: the default.
pub(crate) async fn read_optional_json<T: serde::de::DeserializeOwned + Default>(
    body: Body,
    what: &str,
) -> Result<T, ApiError> {
    let bytes = read_small_body(body, 16 << 10, what).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid {what}: {e}")))
}

/// A version number from a path segment.
pub(crate) fn version_number(version: &str) -> Result<u32, ApiError> {
    version.parse().map_err(|_| {
        ApiError::InvalidRequest(format!("invalid version {version:?}: expected a number"))
    })
}

/// The `window=` of a query that takes only it (`15m`, `1h`): `default` when absent, else
/// within `range`; `hint` says the range to a client (`from 1s to 10m, e.g. 60s or 5m`).
pub(crate) fn window_param(
    query: &str,
    default: std::time::Duration,
    range: std::ops::RangeInclusive<std::time::Duration>,
    hint: &str,
) -> Result<std::time::Duration, ApiError> {
    let mut window = default;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("window", w)) => {
                let w = percent_decode(w).map_err(ApiError::InvalidRequest)?;
                window = humantime::parse_duration(&w)
                    .ok()
                    .filter(|d| range.contains(d))
                    .ok_or_else(|| {
                        ApiError::InvalidRequest(format!("window={w:?}: a duration {hint}"))
                    })?;
            }
            _ => {
                return Err(ApiError::InvalidRequest(format!(
                    "unknown parameter {pair:?} (known: window)"
                )));
            }
        }
    }
    Ok(window)
}

/// The usage ledger, which monitoring and budgets read (metering must be on); `what`
/// names what needs it.
pub(crate) fn ledger<'a>(app: &'a App, what: &str) -> Result<&'a crate::meter::Ledger, ApiError> {
    app.ledger.as_ref().ok_or_else(|| {
        ApiError::Conflict(
            format!(
                "metering is off on this server ([metering] enabled = false): {what} live in its usage ledger"
            ),
            "metering.off",
        )
    })
}

/// Decodes a query parameter value: `%XX` escapes and `+` (times carry `+01:00` offsets
/// and `:`; header lists carry `,`).
pub(crate) fn percent_decode(s: &str) -> Result<String, String> {
    decode(s, true)
}

/// Decodes one path segment: `%XX` escapes (a client may send a digest's `:` as `%3A`);
/// `+` is itself.
fn decode_segment(s: &str) -> Result<String, ApiError> {
    decode(s, false).map_err(|e| ApiError::InvalidRequest(format!("path: {e}")))
}

fn decode(s: &str, plus_is_space: bool) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad %-escape in {s:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8"))
}
