//! `/v1/keys`: create (the secret is in the answer, this once), list and revoke API keys.
//! Admin only.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{ApiError, AuditDetail};
use crate::app::App;
use crate::auth::{ApiKey, Caller, NewKey};
use crate::server::{Body, json_response};

/// Largest key request accepted, in bytes.
const MAX_KEY_REQUEST_BYTES: usize = 64 << 10;

fn key_json(k: &ApiKey) -> serde_json::Value {
    serde_json::to_value(k).unwrap_or_default()
}

/// `POST /v1/keys` `{"tenant", "scopes": [...], "rate"?}`.
pub(super) async fn create(
    app: &Arc<App>,
    req: Request<Incoming>,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let new: NewKey =
        super::read_json(req.into_body(), MAX_KEY_REQUEST_BYTES, "key request").await?;
    let (key, secret) = app.auth.create(&new, caller).await.map_err(|e| match e {
        crate::auth::KeyError::Invalid(why) => ApiError::InvalidRequest(why),
        crate::auth::KeyError::Store(e) => ApiError::Internal(e),
    })?;
    let mut json = key_json(&key);
    json["key"] = secret.into();
    let mut resp = json_response(StatusCode::CREATED, &json);
    super::created_at(&mut resp, &format!("/v1/keys/{}", key.id));
    let scopes: Vec<String> = key.scopes.iter().map(ToString::to_string).collect();
    resp.extensions_mut().insert(AuditDetail {
        detail: format!(
            "key {} for tenant {} with scopes {}",
            key.id,
            key.tenant,
            scopes.join(" ")
        ),
        subject: Some(key.tenant.to_string()),
    });
    Ok(resp)
}

/// `GET /v1/keys`: every key, never a secret.
pub(super) fn list(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    let keys: Vec<_> = app.auth.list().iter().map(|k| key_json(k)).collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"keys": keys}),
    ))
}

/// `DELETE /v1/keys/{id}`: refused from the next request on.
pub(super) async fn revoke(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let key = app
        .auth
        .revoke(id)
        .await?
        .ok_or_else(|| ApiError::KeyNotFound(id.to_string()))?;
    Ok(json_response(StatusCode::OK, &key_json(&key)))
}
