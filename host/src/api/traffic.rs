//! `/v1/functions/{name}/traffic` (read and replace the traffic policy),
//! `/v1/functions/{name}/aliases/{alias}` (named policies), `.../promote`, `.../rollback`,
//! `.../versions/{v}/stats` and `.../history` (every traffic change, newest first).

use std::sync::Arc;

use http::{Request, Response, StatusCode};

use super::page::Paging;
use super::{ApiError, AuditDetail};
use crate::app::{Actor, App};
use crate::auth::Caller;
use crate::deploy::{DEFAULT_ALIAS, RouteError, TrafficPolicy};
use crate::server::{Body, json_response};

/// Largest policy accepted, in bytes.
const MAX_POLICY_BYTES: usize = 64 << 10;
/// Most history entries one page holds.
const MAX_HISTORY_PAGE: usize = 1000;

/// The main policy (with every alias), or alias `alias`'s.
fn policy_json(app: &App, name: &str, alias: Option<&str>) -> Result<serde_json::Value, ApiError> {
    let f = app
        .registry
        .function(name)
        .ok_or_else(|| RouteError::NoFunction(name.to_string()))?;
    let routing = f.routing_for(alias)?;
    let mut v = serde_json::json!({
        "function": name,
        "policy": routing.map(|r| &r.policy),
        "revision": routing.map_or(0, |r| r.revision),
        "latest_version": f.latest().map(|v| v.record.version),
    });
    match alias {
        Some(a) if a != DEFAULT_ALIAS => v["alias"] = a.into(),
        _ => {
            v["aliases"] = f
                .aliases
                .iter()
                .map(|(a, r)| {
                    (
                        a.clone(),
                        serde_json::json!({"policy": r.policy, "revision": r.revision}),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
    }
    Ok(v)
}

/// [`policy_json`] after a change, which may have removed the alias.
fn changed_json(app: &App, name: &str, alias: Option<&str>) -> Result<serde_json::Value, ApiError> {
    match policy_json(app, name, alias) {
        Err(ApiError::Route(RouteError::NoAlias(..))) => {
            Ok(serde_json::json!({"function": name, "alias": alias, "policy": null}))
        }
        other => other,
    }
}

/// `GET /v1/functions/{name}/traffic` (`alias` `None`) or `.../aliases/{alias}`: the
/// policy (`null` for the main one: the newest version serves all).
pub(super) fn get(
    app: &Arc<App>,
    name: &str,
    alias: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    Ok(tagged(&policy_json(app, name, alias)?))
}

/// A policy answer with its revision as entity tag, `"N"`: sent back in `If-Match`, the
/// next change is made only if nobody changed the policy in between (412 otherwise).
fn tagged(policy: &serde_json::Value) -> Response<Body> {
    let mut resp = json_response(StatusCode::OK, policy);
    if let Some(revision) = policy["revision"].as_u64()
        && let Ok(tag) = http::HeaderValue::try_from(format!("\"{revision}\""))
    {
        resp.headers_mut().insert(http::header::ETAG, tag);
    }
    resp
}

/// The revision an `If-Match: "N"` names (`*` or none: any).
fn if_match(headers: &http::HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(http::header::IF_MATCH) else {
        return Ok(None);
    };
    let v = v.to_str().unwrap_or_default().trim();
    if v == "*" {
        return Ok(None);
    }
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .and_then(|v| v.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "If-Match: {v:?} is not a policy revision's entity tag (\"N\", as ETag gives it)"
            ))
        })
}

/// `PUT /v1/functions/{name}/traffic` or `.../aliases/{alias}`
/// `{"weights": {"3": 90, "4": 10}, "sticky"?, "shadow"?}`; `DELETE .../aliases/{alias}`
/// (`policy` `None`) removes the alias.
pub(super) async fn put(
    app: &Arc<App>,
    name: &str,
    alias: Option<&str>,
    req: Request<Body>,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    if req.method() == http::Method::DELETE && alias == Some(DEFAULT_ALIAS) {
        return Err(ApiError::InvalidRequest(format!(
            "{DEFAULT_ALIAS:?} is the main policy and cannot be removed; set it with PUT /v1/functions/{name}/traffic"
        )));
    }
    let if_revision = if_match(req.headers())?;
    let policy: Option<TrafficPolicy> = match req.method() == http::Method::DELETE {
        true => None,
        false => Some(super::read_json(req.into_body(), MAX_POLICY_BYTES, "traffic policy").await?),
    };
    let detail = serde_json::to_string(&policy).unwrap_or_default();
    app.set_traffic(
        name,
        alias,
        policy,
        &Actor::of(caller),
        "set by API",
        if_revision,
    )
    .await?;
    let mut resp = tagged(&changed_json(app, name, alias)?);
    resp.extensions_mut().insert(AuditDetail {
        detail: format!(
            "{}{detail}",
            alias.map(|a| format!("alias {a}: ")).unwrap_or_default()
        ),
        subject: None,
    });
    Ok(resp)
}

/// What `POST /v1/functions/{name}/rollback` may carry.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    reason: Option<String>,
    /// Roll back this alias's policy instead of the main one.
    alias: Option<String>,
}

/// `POST /v1/functions/{name}/rollback` (`{"reason"?, "alias"?}`): back to the previous policy.
pub(super) async fn rollback(
    app: &Arc<App>,
    name: &str,
    req: Request<Body>,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let body: RollbackRequest =
        super::read_optional_json(req.into_body(), "rollback request").await?;
    let reason = body.reason.unwrap_or_else(|| "rollback requested".into());
    app.rollback_traffic(name, body.alias.as_deref(), &Actor::of(caller), &reason)
        .await?;
    let mut resp = json_response(
        StatusCode::OK,
        &changed_json(app, name, body.alias.as_deref())?,
    );
    resp.extensions_mut().insert(AuditDetail {
        detail: reason,
        subject: None,
    });
    Ok(resp)
}

/// What `POST /v1/functions/{name}/promote` takes.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteRequest {
    from: String,
    to: String,
    reason: Option<String>,
}

/// `POST /v1/functions/{name}/promote` `{"from": "staging", "to": "prod", "reason"?}`:
/// copies one alias's policy onto another at once. Every version of both the new and
/// the replaced policy is loaded before it answers, so switching either way is warm.
pub(super) async fn promote(
    app: &Arc<App>,
    name: &str,
    req: Request<Body>,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let body: PromoteRequest =
        super::read_json(req.into_body(), MAX_POLICY_BYTES, "promote request").await?;
    let (routing, previous) = app
        .promote(
            name,
            &body.from,
            &body.to,
            &Actor::of(caller),
            body.reason.as_deref(),
        )
        .await?;
    let versions = routing
        .policy
        .weights
        .keys()
        .chain(previous.iter().flat_map(|p| p.weights.keys()))
        .copied();
    app.warm(name, versions).await;
    let mut resp = json_response(StatusCode::OK, &policy_json(app, name, Some(&body.to))?);
    resp.extensions_mut().insert(AuditDetail {
        detail: format!(
            "{} -> {}: {}",
            body.from,
            body.to,
            serde_json::to_string(&routing.policy).unwrap_or_default()
        ),
        subject: None,
    });
    Ok(resp)
}

/// `GET /v1/functions/{name}/versions/{v}/stats[?window=5m]`: the version's requests over
/// the window (default 60 s, at most 10 min).
pub(super) fn stats(
    app: &Arc<App>,
    name: &str,
    version: &str,
    query: &str,
) -> Result<Response<Body>, ApiError> {
    let n = super::version_number(version)?;
    let window = super::window_param(
        query,
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(600),
        "from 1s to 10m, e.g. 60s or 5m",
    )?;
    let entry = app.registry.route(name, Some(n))?;
    let stats = crate::meter::Window::combined(&[&entry.routed, &entry.other], window);
    let mut json = serde_json::to_value(stats).unwrap_or_default();
    json["function"] = name.into();
    json["version"] = n.into();
    json["shadow"] = serde_json::to_value(entry.shadow.stats(window)).unwrap_or_default();
    Ok(json_response(StatusCode::OK, &json))
}

/// `GET /v1/functions/{name}/history?limit&cursor`: newest first, a page at a time; a
/// tenant sees only the entries of its own time as the owner.
pub(super) async fn history(
    app: &Arc<App>,
    name: &str,
    query: &str,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let paging = Paging::parse("history", MAX_HISTORY_PAGE, query)?;
    let tenant = Actor::of(caller).tenant;
    let entries = app
        .meta
        .history(
            name,
            paging.limit as u32 + 1,
            paging.after()?,
            tenant.as_deref(),
        )
        .await?;
    if entries.is_empty() && app.registry.function(name).is_none() {
        return Err(RouteError::NoFunction(name.to_string()).into());
    }
    let (entries, next) = paging.finish(entries, |e| e["seq"].as_i64().unwrap_or(0));
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"function": name, "history": entries, "next_cursor": next}),
    ))
}
