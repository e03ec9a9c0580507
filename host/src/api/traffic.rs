//! `/v1/functions/{name}/traffic` (read and replace the traffic policy) and
//! `/v1/functions/{name}/history` (every traffic change, newest first).

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{ApiError, AuditDetail};
use crate::app::App;
use crate::auth::Caller;
use crate::deploy::{RouteError, TrafficPolicy};
use crate::server::{Body, json_response};

/// Largest policy accepted, in bytes.
const MAX_POLICY_BYTES: usize = 64 << 10;
/// History entries returned.
const HISTORY_LIMIT: u32 = 1000;

fn policy_json(app: &App, name: &str) -> Result<serde_json::Value, ApiError> {
    let f = app
        .registry
        .function(name)
        .ok_or_else(|| RouteError::NoFunction(name.to_string()))?;
    let routing = f.routing.as_ref();
    Ok(serde_json::json!({
        "function": name,
        "policy": routing.map(|r| &r.policy),
        "revision": routing.map_or(0, |r| r.revision),
        "latest_version": f.latest().map(|v| v.record.version),
    }))
}

/// `GET /v1/functions/{name}/traffic`: the policy (`null`: the newest version serves all).
pub(super) fn get(app: &Arc<App>, name: &str) -> Result<Response<Body>, ApiError> {
    Ok(json_response(StatusCode::OK, &policy_json(app, name)?))
}

/// `PUT /v1/functions/{name}/traffic` `{"weights": {"3": 90, "4": 10}, "sticky"?}`.
pub(super) async fn put(
    app: &Arc<App>,
    name: &str,
    req: Request<Incoming>,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let policy: TrafficPolicy =
        super::read_json(req.into_body(), MAX_POLICY_BYTES, "traffic policy").await?;
    let (app2, name2, actor) = (
        app.clone(),
        name.to_string(),
        caller.key_id().map(str::to_string),
    );
    let routing = tokio::task::spawn_blocking(move || {
        app2.set_traffic(&name2, policy, actor.as_deref(), "traffic", "set by API")
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("traffic task: {e}")))??;
    let mut resp = json_response(StatusCode::OK, &policy_json(app, name)?);
    resp.extensions_mut().insert(AuditDetail {
        detail: format!(
            "revision {}: {}",
            routing.revision,
            serde_json::to_string(&routing.policy).unwrap_or_default()
        ),
        subject: None,
    });
    Ok(resp)
}

/// `POST /v1/functions/{name}/rollback` (`{"reason"?}`): back to the previous policy.
pub(super) async fn rollback(
    app: &Arc<App>,
    name: &str,
    req: Request<Incoming>,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let reason = super::read_reason(req.into_body(), "rollback request")
        .await?
        .unwrap_or_else(|| "rollback requested".into());
    let (app2, name2, actor) = (
        app.clone(),
        name.to_string(),
        caller.key_id().map(str::to_string),
    );
    let reason2 = reason.clone();
    tokio::task::spawn_blocking(move || app2.rollback_traffic(&name2, actor.as_deref(), &reason2))
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("rollback task: {e}")))??;
    let mut resp = json_response(StatusCode::OK, &policy_json(app, name)?);
    resp.extensions_mut().insert(AuditDetail {
        detail: reason,
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
    let n: u32 = version.parse().map_err(|_| {
        ApiError::InvalidRequest(format!("invalid version {version:?}: expected a number"))
    })?;
    let mut window = std::time::Duration::from_secs(60);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("window", w)) => {
                window = humantime::parse_duration(
                    &super::percent_decode(w).map_err(ApiError::InvalidRequest)?,
                )
                .ok()
                .filter(|w| (1..=600).contains(&w.as_secs()))
                .ok_or_else(|| {
                    ApiError::InvalidRequest(format!(
                        "window={w:?}: a duration from 1s to 10m, e.g. 60s or 5m"
                    ))
                })?;
            }
            _ => {
                return Err(ApiError::InvalidRequest(format!(
                    "unknown parameter {pair:?} (known: window)"
                )));
            }
        }
    }
    let entry = app.registry.route(name, Some(n))?;
    let mut json = serde_json::to_value(entry.stats.stats(window)).unwrap_or_default();
    json["function"] = name.into();
    json["version"] = n.into();
    json["shadow"] = serde_json::to_value(entry.shadow.stats(window)).unwrap_or_default();
    Ok(json_response(StatusCode::OK, &json))
}

/// `GET /v1/functions/{name}/history`: newest first.
pub(super) fn history(app: &Arc<App>, name: &str) -> Result<Response<Body>, ApiError> {
    let entries = app.meta.history(name, HISTORY_LIMIT)?;
    if entries.is_empty() && app.registry.function(name).is_none() {
        return Err(RouteError::NoFunction(name.to_string()).into());
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"function": name, "history": entries}),
    ))
}
