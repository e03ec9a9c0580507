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
mod monitor;
mod page;
mod rollout;
mod traffic;
pub mod usage;

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};

pub use error::ApiError;
pub use functions::CreateVersion;

use crate::app::App;
use crate::auth::{AuthError, Caller, Scope};
use crate::server::Body;

/// What a handler adds to its audit entry (set as a response extension): what it made,
/// and the tenant it acted on when the route does not say.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditDetail {
    pub detail: String,
    pub subject: Option<String>,
}

/// One control-plane operation, parsed from the method and path.
#[derive(Debug, Clone, Copy)]
enum Op<'a> {
    OpenApi,
    PutBlob(&'a str),
    HeadBlob(&'a str),
    ListFunctions,
    ShowFunction(&'a str),
    DeleteFunction(&'a str),
    ListVersions(&'a str),
    CreateVersion(&'a str),
    ShowVersion(&'a str, &'a str),
    VersionStats(&'a str, &'a str),
    VersionDrift(&'a str, &'a str),
    VersionQuality(&'a str, &'a str),
    SetReference(&'a str, &'a str),
    Feedback,
    ListBudgets,
    PutBudget(&'a str),
    DeleteBudget(&'a str),
    ClearCache(&'a str),
    GetTraffic(&'a str),
    PutTraffic(&'a str),
    GetAlias(&'a str, &'a str),
    PutAlias(&'a str, &'a str),
    DeleteAlias(&'a str, &'a str),
    Promote(&'a str),
    History(&'a str),
    Rollback(&'a str),
    GetRollout(&'a str),
    StartRollout(&'a str),
    ControlRollout(&'a str, &'a str),
    Usage,
    CreateKey,
    ListKeys,
    RevokeKey(&'a str),
    Audit,
    Cluster,
}

/// Every path of the API and the methods it takes (`Allow` on a 405): the router's own
/// table, which the OpenAPI document is checked against. `{...}` matches one segment.
pub(crate) const ROUTES: &[(&str, &str)] = &[
    ("/v1/openapi.json", "GET, HEAD"),
    ("/v1/blobs/{digest}", "PUT, HEAD"),
    ("/v1/functions", "GET, HEAD"),
    ("/v1/functions/{name}", "GET, HEAD, DELETE"),
    ("/v1/functions/{name}/versions", "GET, HEAD, POST"),
    ("/v1/functions/{name}/versions/{version}", "GET, HEAD"),
    ("/v1/functions/{name}/versions/{version}/stats", "GET, HEAD"),
    ("/v1/functions/{name}/versions/{version}/drift", "GET, HEAD"),
    (
        "/v1/functions/{name}/versions/{version}/quality",
        "GET, HEAD",
    ),
    ("/v1/functions/{name}/versions/{version}/reference", "POST"),
    ("/v1/feedback", "POST"),
    ("/v1/budgets", "GET, HEAD"),
    ("/v1/budgets/{tenant}", "PUT, DELETE"),
    ("/v1/functions/{name}/cache", "DELETE"),
    ("/v1/functions/{name}/traffic", "GET, HEAD, PUT"),
    (
        "/v1/functions/{name}/aliases/{alias}",
        "GET, HEAD, PUT, DELETE",
    ),
    ("/v1/functions/{name}/promote", "POST"),
    ("/v1/functions/{name}/history", "GET, HEAD"),
    ("/v1/functions/{name}/rollback", "POST"),
    ("/v1/functions/{name}/rollout", "GET, HEAD, POST"),
    ("/v1/functions/{name}/rollout/{action}", "POST"),
    ("/v1/usage", "GET, HEAD"),
    ("/v1/keys", "GET, HEAD, POST"),
    ("/v1/keys/{id}", "DELETE"),
    ("/v1/audit", "GET, HEAD"),
    ("/v1/cluster", "GET, HEAD"),
];

/// The entry of [`ROUTES`] whose template `segments` (the path after `/v1/`) fill.
fn route_of(segments: &[&str]) -> Option<&'static (&'static str, &'static str)> {
    ROUTES.iter().find(|(template, _)| {
        let parts: Vec<&str> = template.split('/').skip(2).collect();
        parts.len() == segments.len()
            && parts.iter().zip(segments).all(|(p, s)| {
                if p.starts_with('{') {
                    !s.is_empty()
                } else {
                    p == s
                }
            })
    })
}

impl<'a> Op<'a> {
    /// The operation of `method` on `segments` (the path after `/v1/`). `HEAD` is `GET`
    /// without the body (hyper leaves it out), except on blobs, where it is its own check.
    fn parse(method: &Method, segments: &[&'a str], path: &str) -> Result<Op<'a>, ApiError> {
        let Some((_, allow)) = route_of(segments) else {
            return Err(ApiError::NoRoute(format!("{method} {path}")));
        };
        let verb = match method {
            &Method::HEAD if segments.first() != Some(&"blobs") => &Method::GET,
            m => m,
        };
        Ok(match (segments, verb) {
            (["openapi.json"], &Method::GET) => Op::OpenApi,
            (["blobs", d], &Method::PUT) => Op::PutBlob(d),
            (["blobs", d], &Method::HEAD) => Op::HeadBlob(d),
            (["functions"], &Method::GET) => Op::ListFunctions,
            (["functions", n], &Method::GET) => Op::ShowFunction(n),
            (["functions", n], &Method::DELETE) => Op::DeleteFunction(n),
            (["functions", n, "versions"], &Method::GET) => Op::ListVersions(n),
            (["functions", n, "versions"], &Method::POST) => Op::CreateVersion(n),
            (["functions", n, "versions", v], &Method::GET) => Op::ShowVersion(n, v),
            (["functions", n, "versions", v, "stats"], &Method::GET) => Op::VersionStats(n, v),
            (["functions", n, "versions", v, "drift"], &Method::GET) => Op::VersionDrift(n, v),
            (["functions", n, "versions", v, "quality"], &Method::GET) => Op::VersionQuality(n, v),
            (["functions", n, "versions", v, "reference"], &Method::POST) => Op::SetReference(n, v),
            (["feedback"], &Method::POST) => Op::Feedback,
            (["budgets"], &Method::GET) => Op::ListBudgets,
            (["budgets", t], &Method::PUT) => Op::PutBudget(t),
            (["budgets", t], &Method::DELETE) => Op::DeleteBudget(t),
            (["functions", n, "cache"], &Method::DELETE) => Op::ClearCache(n),
            (["functions", n, "traffic"], &Method::GET) => Op::GetTraffic(n),
            (["functions", n, "traffic"], &Method::PUT) => Op::PutTraffic(n),
            (["functions", n, "aliases", a], &Method::GET) => Op::GetAlias(n, a),
            (["functions", n, "aliases", a], &Method::PUT) => Op::PutAlias(n, a),
            (["functions", n, "aliases", a], &Method::DELETE) => Op::DeleteAlias(n, a),
            (["functions", n, "promote"], &Method::POST) => Op::Promote(n),
            (["functions", n, "history"], &Method::GET) => Op::History(n),
            (["functions", n, "rollback"], &Method::POST) => Op::Rollback(n),
            (["functions", n, "rollout"], &Method::GET) => Op::GetRollout(n),
            (["functions", n, "rollout"], &Method::POST) => Op::StartRollout(n),
            (["functions", n, "rollout", a], &Method::POST) => Op::ControlRollout(n, a),
            (["usage"], &Method::GET) => Op::Usage,
            (["keys"], &Method::POST) => Op::CreateKey,
            (["keys"], &Method::GET) => Op::ListKeys,
            (["keys", id], &Method::DELETE) => Op::RevokeKey(id),
            (["audit"], &Method::GET) => Op::Audit,
            (["cluster"], &Method::GET) => Op::Cluster,
            _ => return Err(ApiError::MethodNotAllowed(method.to_string(), allow)),
        })
    }

    /// The audit log's name for it, and what it acts on.
    fn describe(self) -> (&'static str, &'a str) {
        match self {
            Op::OpenApi => ("openapi.read", ""),
            Op::PutBlob(d) => ("blob.put", d),
            Op::HeadBlob(d) => ("blob.check", d),
            Op::ListFunctions => ("function.list", ""),
            Op::ShowFunction(n) => ("function.show", n),
            Op::DeleteFunction(n) => ("function.delete", n),
            Op::ListVersions(n) => ("version.list", n),
            Op::CreateVersion(n) => ("version.create", n),
            Op::ShowVersion(n, _) => ("version.show", n),
            Op::VersionStats(n, _) => ("version.stats", n),
            Op::VersionDrift(n, _) => ("version.drift", n),
            Op::VersionQuality(n, _) => ("version.quality", n),
            Op::SetReference(n, _) => ("version.reference.set", n),
            Op::Feedback => ("feedback.post", ""),
            Op::ListBudgets => ("budget.list", ""),
            Op::PutBudget(t) => ("budget.set", t),
            Op::DeleteBudget(t) => ("budget.delete", t),
            Op::ClearCache(n) => ("cache.clear", n),
            Op::GetTraffic(n) => ("traffic.show", n),
            Op::PutTraffic(n) => ("traffic.set", n),
            Op::GetAlias(n, _) => ("alias.show", n),
            Op::PutAlias(n, _) => ("alias.set", n),
            Op::DeleteAlias(n, _) => ("alias.delete", n),
            Op::Promote(n) => ("alias.promote", n),
            Op::History(n) => ("history.show", n),
            Op::Rollback(n) => ("traffic.rollback", n),
            Op::GetRollout(n) => ("rollout.show", n),
            Op::StartRollout(n) => ("rollout.start", n),
            Op::ControlRollout(n, _) => ("rollout.control", n),
            Op::Usage => ("usage.read", ""),
            Op::CreateKey => ("key.create", ""),
            Op::ListKeys => ("key.list", ""),
            Op::RevokeKey(id) => ("key.revoke", id),
            Op::Audit => ("audit.read", ""),
            Op::Cluster => ("cluster.show", ""),
        }
    }

    /// The tenant whose function or key it acts on, when it names one that exists.
    fn subject(self, app: &App) -> Option<String> {
        match self {
            Op::ShowFunction(n)
            | Op::DeleteFunction(n)
            | Op::ListVersions(n)
            | Op::CreateVersion(n)
            | Op::ShowVersion(n, _)
            | Op::VersionStats(n, _)
            | Op::VersionDrift(n, _)
            | Op::VersionQuality(n, _)
            | Op::SetReference(n, _)
            | Op::ClearCache(n)
            | Op::GetTraffic(n)
            | Op::PutTraffic(n)
            | Op::GetAlias(n, _)
            | Op::PutAlias(n, _)
            | Op::DeleteAlias(n, _)
            | Op::Promote(n)
            | Op::History(n)
            | Op::Rollback(n)
            | Op::GetRollout(n)
            | Op::StartRollout(n)
            | Op::ControlRollout(n, _) => app.registry.function(n).map(|f| f.owner.to_string()),
            Op::RevokeKey(id) => app.auth.tenant_of_key(id).map(|t| t.to_string()),
            Op::PutBudget(t) | Op::DeleteBudget(t) => Some(t.to_string()),
            _ => None,
        }
    }

    /// Checks that `caller` may do it (what depends on the request's content is checked
    /// by the handler: blob ownership, usage and audit filters).
    fn authorize(self, app: &App, caller: &Caller) -> Result<(), ApiError> {
        caller.authenticated()?;
        let owner = |name: &str| app.registry.function(name).map(|f| f.owner.clone());
        match self {
            Op::OpenApi => {}
            Op::PutBlob(_) | Op::HeadBlob(_) => caller.may_upload()?,
            Op::ListFunctions | Op::Feedback => {}
            Op::ShowFunction(n)
            | Op::ListVersions(n)
            | Op::ShowVersion(n, _)
            | Op::VersionStats(n, _)
            | Op::VersionDrift(n, _)
            | Op::VersionQuality(n, _)
            | Op::GetTraffic(n)
            | Op::GetAlias(n, _)
            | Op::History(n)
            | Op::GetRollout(n) => {
                if let Some(o) = owner(n) {
                    caller.may_read(n, &o)?;
                }
            }
            Op::DeleteFunction(n)
            | Op::SetReference(n, _)
            | Op::ClearCache(n)
            | Op::PutTraffic(n)
            | Op::PutAlias(n, _)
            | Op::DeleteAlias(n, _)
            | Op::Promote(n)
            | Op::Rollback(n)
            | Op::StartRollout(n)
            | Op::ControlRollout(n, _) => {
                caller.may_deploy(n, owner(n).as_deref(), false)?;
            }
            Op::CreateVersion(n) => caller.may_deploy(n, owner(n).as_deref(), true)?,
            Op::Usage => caller.need(&Scope::UsageRead)?,
            Op::CreateKey
            | Op::ListKeys
            | Op::RevokeKey(_)
            | Op::Cluster
            | Op::ListBudgets
            | Op::PutBudget(_)
            | Op::DeleteBudget(_) => caller.need(&Scope::Admin)?,
            Op::Audit => caller.need(&Scope::AuditRead)?,
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const METHODS: [Method; 5] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
    ];

    fn openapi_operations() -> Vec<(String, String)> {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("openapi.json")).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut ops = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                if METHODS
                    .iter()
                    .any(|m| m.as_str().eq_ignore_ascii_case(method))
                {
                    ops.push((path.clone(), method.to_ascii_uppercase()));
                }
            }
        }
        ops.sort();
        ops
    }

    fn routed_operations() -> Vec<(String, String)> {
        let mut ops: Vec<(String, String)> = ROUTES
            .iter()
            .flat_map(|(path, allow)| allow.split(", ").map(|m| (path.to_string(), m.to_string())))
            .collect();
        ops.sort();
        ops
    }

    #[test]
    fn every_route_is_in_the_openapi_document_and_nothing_else_is() {
        assert_eq!(openapi_operations(), routed_operations());
    }

    #[test]
    fn the_router_takes_exactly_the_methods_its_table_names() {
        for (template, allow) in ROUTES {
            let path = template
                .split('/')
                .map(|p| if p.starts_with('{') { "x" } else { p })
                .collect::<Vec<_>>()
                .join("/");
            let segments: Vec<&str> = path.split('/').skip(2).collect();
            for m in &METHODS {
                let listed = allow.split(", ").any(|a| a == m.as_str());
                match Op::parse(m, &segments, &path) {
                    Ok(_) => assert!(listed, "{m} {template} is routed but not in its Allow"),
                    Err(ApiError::MethodNotAllowed(_, a)) => {
                        assert!(!listed, "{m} {template} is listed but refused");
                        assert_eq!(a, *allow);
                    }
                    Err(e) => panic!("{m} {template}: {e}"),
                }
            }
        }
        for bad in [
            "/v1/nothing",
            "/v1/functions/x/y",
            "/v1/functions//versions",
        ] {
            let segments: Vec<&str> = bad.split('/').skip(2).collect();
            assert!(matches!(
                Op::parse(&Method::GET, &segments, bad),
                Err(ApiError::NoRoute(_))
            ));
        }
    }
}
