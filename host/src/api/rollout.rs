//! `/v1/functions/{name}/rollout`: start a progressive rollout (`POST`), see it (`GET`),
//! and `POST .../rollout/{pause,resume,abort}`.

use std::sync::Arc;

use http::{Request, Response, StatusCode};

use super::{ApiError, AuditDetail};
use crate::app::{Actor, App, Control, TrafficError};
use crate::auth::Caller;
use crate::deploy::{Rollout, RolloutRequest};
use crate::server::{Body, json_response};

/// Largest rollout request accepted, in bytes.
const MAX_REQUEST_BYTES: usize = 16 << 10;

/// The rollout as stored, plus (while it runs) how its current step looks right now.
fn rollout_json(app: &App, r: &Rollout) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    v["percent"] = r.percent().into();
    if r.state.active()
        && let Some(f) = app.registry.function(&r.function)
    {
        let now = crate::unix_ms();
        let seconds = crate::meter::ended_seconds(r.elapsed(now));
        let stats = |version: u32| {
            f.versions
                .get(&version)
                .map(|e| serde_json::to_value(e.routed.stats_in(&seconds)).unwrap_or_default())
        };
        v["current"] = serde_json::json!({
            "candidate": stats(r.candidate),
            "stable": stats(r.stable),
            "next_check_in_ms": (r.step_started_ms + r.interval_ms as i64 - now).max(0),
        });
    }
    v
}

/// `POST /v1/functions/{name}/rollout` `{"to", "steps"?, "interval"?, "min_requests"?,
/// "max_error_rate"?, "max_p99_ratio"?}`: 201 with the rollout, its first step applied.
pub(super) async fn start(
    app: &Arc<App>,
    name: &str,
    req: Request<Body>,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let request: RolloutRequest =
        super::read_json(req.into_body(), MAX_REQUEST_BYTES, "rollout request").await?;
    let r = app
        .start_rollout(name, &request, &Actor::of(caller))
        .await?;
    let mut resp = json_response(StatusCode::CREATED, &rollout_json(app, &r));
    super::created_at(&mut resp, &format!("/v1/functions/{name}/rollout"));
    resp.extensions_mut().insert(AuditDetail {
        detail: format!(
            "v{} -> v{} steps {:?} every {} ms",
            r.stable, r.candidate, r.steps, r.interval_ms
        ),
        subject: None,
    });
    Ok(resp)
}

/// `GET /v1/functions/{name}/rollout`: the rollout in progress, else the latest one.
pub(super) async fn get(app: &Arc<App>, name: &str) -> Result<Response<Body>, ApiError> {
    if app.registry.function(name).is_none() {
        return Err(TrafficError::NoFunction(name.to_string()).into());
    }
    let r = app
        .rollout(name)
        .await?
        .ok_or_else(|| TrafficError::NoRollout(name.to_string()))?;
    Ok(json_response(StatusCode::OK, &rollout_json(app, &r)))
}

/// What a rollout action may carry.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionRequest {
    reason: Option<String>,
}

/// `POST /v1/functions/{name}/rollout/{pause|resume|abort}` (`{"reason"?}`).
pub(super) async fn control(
    app: &Arc<App>,
    name: &str,
    action: &str,
    req: Request<Body>,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let control = match action {
        "pause" => Control::Pause,
        "resume" => Control::Resume,
        "abort" => Control::Abort,
        other => {
            return Err(ApiError::NoRoute(format!(
                "rollout action {other:?}: use pause, resume or abort"
            )));
        }
    };
    let reason = super::read_optional_json::<ActionRequest>(req.into_body(), "rollout action")
        .await?
        .reason;
    let r = app
        .control_rollout(name, control, &Actor::of(caller), reason.as_deref())
        .await?;
    let mut resp = json_response(StatusCode::OK, &rollout_json(app, &r));
    resp.extensions_mut().insert(AuditDetail {
        detail: reason.unwrap_or_default(),
        subject: None,
    });
    Ok(resp)
}
