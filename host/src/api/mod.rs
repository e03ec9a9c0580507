//! The control plane: JSON over HTTP under `/v1`. The only module that turns requests into
//! calls on the stores, the runtime and the registry. Every call needs an API key with the
//! right scope, and every call made with a key (refusals included) is written to the audit
//! log. Calls without a valid key (401) and over a rate limit (429) are counted in
//! `kiln_auth_refusals_total` instead: they carry no identity, and anyone could flood them.
//! A call runs to its end (its audit entry included) even if the client hangs up.
//!
//! | method | path | what | needs |
//! |---|---|---|---|
//! | `PUT`, `HEAD` | `/v1/blobs/sha256:{hex}` | upload (digest verified) / check a blob | deploy |
//! | `GET` | `/v1/functions` | list functions (the tenant's; all for admin) | a key |
//! | `GET`, `DELETE` | `/v1/functions/{name}` | show / delete a function | owner / deploy |
//! | `GET` | `/v1/functions/{name}/versions` | list versions | owner |
//! | `POST` | `/v1/functions/{name}/versions` | deploy: `application/wasm` body or JSON manifest | deploy |
//! | `GET` | `/v1/functions/{name}/versions/{v}` | show one version | owner |
//! | `GET` | `/v1/functions/{name}/versions/{v}/stats` | recent requests, errors, latency, cold starts, cache hits | owner |
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
mod error;
pub mod functions;
mod keys;
mod rollout;
mod traffic;
pub mod usage;

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

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
    PutBlob(&'a str),
    HeadBlob(&'a str),
    ListFunctions,
    ShowFunction(&'a str),
    DeleteFunction(&'a str),
    ListVersions(&'a str),
    CreateVersion(&'a str),
    ShowVersion(&'a str, &'a str),
    VersionStats(&'a str, &'a str),
    ClearCache(&'a str),
    GetTraffic(&'a str),
    PutTraffic(&'a str),
    GetAlias(&'a str, &'a str),
    PutAlias(&'a str, &'a str),
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

impl<'a> Op<'a> {
    fn parse(method: &Method, segments: &[&'a str], path: &str) -> Result<Op<'a>, ApiError> {
        let not_allowed =
            |allow: &'static str| ApiError::MethodNotAllowed(method.to_string(), allow);
        Ok(match (segments, method) {
            (["blobs", d], &Method::PUT) => Op::PutBlob(d),
            (["blobs", d], &Method::HEAD) => Op::HeadBlob(d),
            (["blobs", _], _) => return Err(not_allowed("PUT, HEAD")),
            (["functions"], &Method::GET) => Op::ListFunctions,
            (["functions"], _) => return Err(not_allowed("GET")),
            (["functions", n], &Method::GET) => Op::ShowFunction(n),
            (["functions", n], &Method::DELETE) => Op::DeleteFunction(n),
            (["functions", _], _) => return Err(not_allowed("GET, DELETE")),
            (["functions", n, "versions"], &Method::GET) => Op::ListVersions(n),
            (["functions", n, "versions"], &Method::POST) => Op::CreateVersion(n),
            (["functions", _, "versions"], _) => return Err(not_allowed("GET, POST")),
            (["functions", n, "versions", v], &Method::GET) => Op::ShowVersion(n, v),
            (["functions", _, "versions", _], _) => return Err(not_allowed("GET")),
            (["functions", n, "versions", v, "stats"], &Method::GET) => Op::VersionStats(n, v),
            (["functions", _, "versions", _, "stats"], _) => return Err(not_allowed("GET")),
            (["functions", n, "cache"], &Method::DELETE) => Op::ClearCache(n),
            (["functions", _, "cache"], _) => return Err(not_allowed("DELETE")),
            (["functions", n, "traffic"], &Method::GET) => Op::GetTraffic(n),
            (["functions", n, "traffic"], &Method::PUT) => Op::PutTraffic(n),
            (["functions", _, "traffic"], _) => return Err(not_allowed("GET, PUT")),
            (["functions", n, "aliases", a], &Method::GET) => Op::GetAlias(n, a),
            (["functions", n, "aliases", a], &Method::PUT | &Method::DELETE) => Op::PutAlias(n, a),
            (["functions", _, "aliases", _], _) => return Err(not_allowed("GET, PUT, DELETE")),
            (["functions", n, "promote"], &Method::POST) => Op::Promote(n),
            (["functions", _, "promote"], _) => return Err(not_allowed("POST")),
            (["functions", n, "history"], &Method::GET) => Op::History(n),
            (["functions", _, "history"], _) => return Err(not_allowed("GET")),
            (["functions", n, "rollback"], &Method::POST) => Op::Rollback(n),
            (["functions", n, "rollout"], &Method::GET) => Op::GetRollout(n),
            (["functions", n, "rollout"], &Method::POST) => Op::StartRollout(n),
            (["functions", _, "rollback"], _) => return Err(not_allowed("POST")),
            (["functions", _, "rollout"], _) => return Err(not_allowed("GET, POST")),
            (["functions", n, "rollout", a], &Method::POST) => Op::ControlRollout(n, a),
            (["functions", _, "rollout", _], _) => return Err(not_allowed("POST")),
            (["usage"], &Method::GET) => Op::Usage,
            (["usage"], _) => return Err(not_allowed("GET")),
            (["keys"], &Method::POST) => Op::CreateKey,
            (["keys"], &Method::GET) => Op::ListKeys,
            (["keys"], _) => return Err(not_allowed("GET, POST")),
            (["keys", id], &Method::DELETE) => Op::RevokeKey(id),
            (["keys", _], _) => return Err(not_allowed("DELETE")),
            (["audit"], &Method::GET) => Op::Audit,
            (["audit"], _) => return Err(not_allowed("GET")),
            (["cluster"], &Method::GET) => Op::Cluster,
            (["cluster"], _) => return Err(not_allowed("GET")),
            _ => return Err(ApiError::NoRoute(format!("{method} {path}"))),
        })
    }

    /// The audit log's name for it, and what it acts on.
    fn describe(self) -> (&'static str, &'a str) {
        match self {
            Op::PutBlob(d) => ("blob.put", d),
            Op::HeadBlob(d) => ("blob.check", d),
            Op::ListFunctions => ("function.list", ""),
            Op::ShowFunction(n) => ("function.show", n),
            Op::DeleteFunction(n) => ("function.delete", n),
            Op::ListVersions(n) => ("version.list", n),
            Op::CreateVersion(n) => ("version.create", n),
            Op::ShowVersion(n, _) => ("version.show", n),
            Op::VersionStats(n, _) => ("version.stats", n),
            Op::ClearCache(n) => ("cache.clear", n),
            Op::GetTraffic(n) => ("traffic.show", n),
            Op::PutTraffic(n) => ("traffic.set", n),
            Op::GetAlias(n, _) => ("alias.show", n),
            Op::PutAlias(n, _) => ("alias.set", n),
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
            | Op::ClearCache(n)
            | Op::GetTraffic(n)
            | Op::PutTraffic(n)
            | Op::GetAlias(n, _)
            | Op::PutAlias(n, _)
            | Op::Promote(n)
            | Op::History(n)
            | Op::Rollback(n)
            | Op::GetRollout(n)
            | Op::StartRollout(n)
            | Op::ControlRollout(n, _) => app.registry.function(n).map(|f| f.owner.to_string()),
            Op::RevokeKey(id) => app.auth.tenant_of_key(id).map(|t| t.to_string()),
            _ => None,
        }
    }

    /// Checks that `caller` may do it (what depends on the request's content is checked
    /// by the handler: blob ownership, usage and audit filters).
    fn authorize(self, app: &App, caller: &Caller) -> Result<(), ApiError> {
        caller.authenticated()?;
        let owner = |name: &str| app.registry.function(name).map(|f| f.owner.clone());
        match self {
            Op::PutBlob(_) | Op::HeadBlob(_) => caller.may_upload()?,
            Op::ListFunctions => {}
            Op::ShowFunction(n)
            | Op::ListVersions(n)
            | Op::ShowVersion(n, _)
            | Op::VersionStats(n, _)
            | Op::GetTraffic(n)
            | Op::GetAlias(n, _)
            | Op::History(n)
            | Op::GetRollout(n) => {
                if let Some(o) = owner(n) {
                    caller.may_read(n, &o)?;
                }
            }
            Op::DeleteFunction(n)
            | Op::ClearCache(n)
            | Op::PutTraffic(n)
            | Op::PutAlias(n, _)
            | Op::Promote(n)
            | Op::Rollback(n)
            | Op::StartRollout(n)
            | Op::ControlRollout(n, _) => {
                caller.may_deploy(n, owner(n).as_deref(), false)?;
            }
            Op::CreateVersion(n) => caller.may_deploy(n, owner(n).as_deref(), true)?,
            Op::Usage => caller.need(&Scope::UsageRead)?,
            Op::CreateKey | Op::ListKeys | Op::RevokeKey(_) | Op::Cluster => {
                caller.need(&Scope::Admin)?
            }
            Op::Audit => caller.need(&Scope::AuditRead)?,
        }
        Ok(())
    }
}

/// Dispatches a `/v1/...` request: authenticates, authorizes, runs it, audits it. The work
/// runs in a task of its own, so a client that hangs up cannot cut a change (or its audit
/// entry) short.
pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let app = app.clone();
    tokio::spawn(async move { handle_to_end(&app, req).await })
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::Internal(anyhow::anyhow!(
                "control-plane task: {e}"
            )))
        })
}

async fn handle_to_end(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').skip(2).collect();
    let method = req.method().clone();
    let op = Op::parse(&method, &segments, &path)?;
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
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    match op {
        Op::PutBlob(d) => blobs::put(app, d, req, caller).await,
        Op::HeadBlob(d) => blobs::head(app, d, caller).await,
        Op::ListFunctions => functions::list(app, caller, &req),
        Op::ShowFunction(n) => functions::show(app, n, &req),
        Op::DeleteFunction(n) => functions::delete(app, n, caller).await,
        Op::ListVersions(n) => functions::versions(app, n, &req),
        Op::CreateVersion(n) => functions::create_version(app, n, req, caller).await,
        Op::ShowVersion(n, v) => functions::version(app, n, v, &req),
        Op::VersionStats(n, v) => traffic::stats(app, n, v, req.uri().query().unwrap_or("")),
        Op::ClearCache(n) => functions::clear_cache(app, n),
        Op::GetTraffic(n) => traffic::get(app, n, None),
        Op::PutTraffic(n) => traffic::put(app, n, None, req, caller).await,
        Op::GetAlias(n, a) => traffic::get(app, n, Some(a)),
        Op::PutAlias(n, a) => traffic::put(app, n, Some(a), req, caller).await,
        Op::Promote(n) => traffic::promote(app, n, req, caller).await,
        Op::History(n) => traffic::history(app, n, caller).await,
        Op::Rollback(n) => traffic::rollback(app, n, req, caller).await,
        Op::GetRollout(n) => rollout::get(app, n).await,
        Op::StartRollout(n) => rollout::start(app, n, req, caller).await,
        Op::ControlRollout(n, a) => rollout::control(app, n, a, req, caller).await,
        Op::Usage => usage::get(app, req.uri().query().unwrap_or(""), caller).await,
        Op::CreateKey => keys::create(app, req, caller).await,
        Op::ListKeys => keys::list(app),
        Op::RevokeKey(id) => keys::revoke(app, id).await,
        Op::Audit => audit::get(app, req.uri().query().unwrap_or(""), caller).await,
        Op::Cluster => cluster(app).await,
    }
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
    body: Incoming,
    max: usize,
    what: &str,
) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt;
    Ok(http_body_util::Limited::new(body, max)
        .collect()
        .await
        .map_err(|e| ApiError::TooLarge(format!("{what}: {e}")))?
        .to_bytes())
}

/// Reads a small JSON request body whole and parses it.
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    body: Incoming,
    max: usize,
    what: &str,
) -> Result<T, ApiError> {
    let bytes = read_small_body(body, max, what).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid {what}: {e}")))
}

/// Reads a small optional JSON body (rollbacks, rollout actions); empty: the default.
pub(crate) async fn read_optional_json<T: serde::de::DeserializeOwned + Default>(
    body: Incoming,
    what: &str,
) -> Result<T, ApiError> {
    let bytes = read_small_body(body, 16 << 10, what).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid {what}: {e}")))
}

/// Decodes a query parameter value: `%XX` escapes and `+` (times carry `+01:00` offsets
/// and `:`; header lists carry `,`).
pub(crate) fn percent_decode(s: &str) -> Result<String, String> {
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
            b'+' => {
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
