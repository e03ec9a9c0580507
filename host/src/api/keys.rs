//! `/v1/keys`: create (the secret is in the answer, this once), list and revoke API keys.
//! Admin only.

use std::sync::Arc;

use http::{Request, Response, StatusCode};

use super::idempotency::{self, Begun};
use super::page::Paging;
use super::{ApiError, AuditDetail};
use crate::app::App;
use crate::auth::{ApiKey, Caller, NewKey};
use crate::server::{Body, json_response};

/// Largest key request accepted, in bytes.
const MAX_KEY_REQUEST_BYTES: usize = 64 << 10;

fn key_json(k: &ApiKey) -> serde_json::Value {
    serde_json::to_value(k).unwrap_or_default()
}

/// `POST /v1/keys` `{"tenant", "scopes": [...], "rate"?}`, with an optional
/// `Idempotency-Key`.
pub(super) async fn create(
    app: &Arc<App>,
    req: Request<Body>,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let idempotency_key = match idempotency::key_of(req.headers()) {
        Ok(k) => k,
        Err(e) => {
            crate::server::drain(req.into_body()).await;
            return Err(e);
        }
    };
    let body =
        super::read_small_body(req.into_body(), MAX_KEY_REQUEST_BYTES, "key request").await?;
    let canonical = idempotency::canonical_json(&body);
    let parts: [&[u8]; 1] = [&canonical];
    let claimed =
        match idempotency::begin(app, caller, "key.create", "", idempotency_key, &parts).await? {
            Begun::Replay(resp) => return Ok(resp),
            Begun::Run(c) => c,
        };
    let result = make(app, &body, caller).await;
    idempotency::settle(app, claimed, result).await
}

async fn make(app: &App, body: &[u8], caller: &Caller) -> Result<Response<Body>, ApiError> {
    let new: NewKey = serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid key request: {e}")))?;
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

/// Most keys one page of the list holds.
const MAX_PAGE: usize = 1000;

/// A key's place in the list: by creation time, then id.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Place(i64, String);

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

impl std::str::FromStr for Place {
    type Err = ();
    fn from_str(s: &str) -> Result<Place, ()> {
        let (at, id) = s.split_once('.').ok_or(())?;
        Ok(Place(at.parse().map_err(|_| ())?, id.to_string()))
    }
}

/// `GET /v1/keys?limit&cursor`: every key (never a secret), oldest first, a page at a time.
pub(super) fn list(app: &Arc<App>, query: &str) -> Result<Response<Body>, ApiError> {
    let paging = Paging::parse("keys", MAX_PAGE, query)?;
    let (page, next) = paging.of_sorted(app.auth.list(), |k| Place(k.created_at, k.id.clone()))?;
    let keys: Vec<_> = page.iter().map(|k| key_json(k)).collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"keys": keys, "next_cursor": next}),
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
