//! `Idempotency-Key` on the creates that make something new each time: a version
//! (`POST /v1/functions/{name}/versions`) and an API key (`POST /v1/keys`). A client whose
//! connection dropped cannot tell whether its create landed; retrying with the same key
//! and the same request gets the first answer again (`Idempotent-Replayed: true`) instead
//! of a second version or a second secret.
//!
//! Keys are the caller's own: scoped by the calling API key, the operation and what it
//! names. The same key on a different request is refused (422 `idempotency.key_reused`);
//! while the first is still running, a retry is told so (409 `idempotency.in_progress`).
//! Only a success is kept (a day, in the metadata store, so every node of a cluster
//! answers the same); after a failure the key is free and a retry runs again.

use http::{HeaderMap, HeaderValue, Response, header};
use http_body_util::BodyExt;

use super::ApiError;
use crate::app::App;
use crate::auth::Caller;
use crate::server::Body;
use crate::store::{Claim, StoredAnswer};

/// The request header.
pub(super) const HEADER: &str = "idempotency-key";
/// Set on an answer that is a replay of the first.
pub(super) const REPLAYED: &str = "idempotent-replayed";
/// Longest key accepted.
const MAX_KEY_LEN: usize = 255;
/// Largest answer kept for replay (a version's JSON is a few KiB).
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The request's key, checked before its body is read; `None` without the header.
pub(super) fn key_of(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(HEADER) else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .filter(|k| {
            (1..=MAX_KEY_LEN).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "Idempotency-Key must be 1 to {MAX_KEY_LEN} printable ASCII characters without spaces"
            ))
        })?;
    Ok(Some(key.to_string()))
}

/// A key this request holds: its answer is stored by [`settle`].
pub(super) struct Claimed {
    scope: String,
    key: String,
}

/// What to do with a request that carries a key.
pub(super) enum Begun {
    /// Run it (holding the claim, when it carried a key).
    Run(Option<Claimed>),
    /// Answer this: the first request's answer.
    Replay(Response<Body>),
}

/// Claims `key` for the caller's `op` on `target`, the request's content being `parts`
/// (hashed: the same key must come with the same request).
pub(super) async fn begin(
    app: &App,
    caller: &Caller,
    op: &str,
    target: &str,
    key: Option<String>,
    parts: &[&[u8]],
) -> Result<Begun, ApiError> {
    let Some(key) = key else {
        return Ok(Begun::Run(None));
    };
    let who = caller.key_id().or(caller.tenant()).unwrap_or("-");
    let scope = format!("{who}|{op}|{target}");
    let mut hash = blake3::Hasher::new();
    for p in parts {
        hash.update(&(p.len() as u64).to_le_bytes());
        hash.update(p);
    }
    let fingerprint = hash.finalize().to_hex().to_string();
    match app
        .meta
        .idempotency_claim(&scope, &key, &fingerprint, crate::unix_ms())
        .await?
    {
        Claim::New => Ok(Begun::Run(Some(Claimed { scope, key }))),
        Claim::InProgress => Err(ApiError::Conflict(
            format!(
                "a request with Idempotency-Key {key:?} is still running; retry once it has answered"
            ),
            "idempotency.in_progress",
        )),
        Claim::Reused => Err(ApiError::Unprocessable(
            format!(
                "Idempotency-Key {key:?} was used for a different request; use a new key for a new request"
            ),
            "idempotency.key_reused",
        )),
        Claim::Done(answer) => Ok(Begun::Replay(replay(answer, &key))),
    }
}

fn replay(answer: StoredAnswer, key: &str) -> Response<Body> {
    let mut resp = Response::new(crate::server::full(answer.body));
    *resp.status_mut() = http::StatusCode::from_u16(answer.status).unwrap_or_default();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(REPLAYED, HeaderValue::from_static("true"));
    if let Some(loc) = answer.location.and_then(|l| HeaderValue::try_from(l).ok()) {
        h.insert(header::LOCATION, loc);
    }
    resp.extensions_mut().insert(super::AuditDetail {
        detail: format!("replayed the first answer to Idempotency-Key {key:?}"),
        subject: None,
    });
    resp
}

/// Ends a request that held a claim: a success is stored for replay (and answered as
/// made); a failure gives the claim up, so a retry runs again.
pub(super) async fn settle(
    app: &App,
    claimed: Option<Claimed>,
    result: Result<Response<Body>, ApiError>,
) -> Result<Response<Body>, ApiError> {
    let Some(c) = claimed else {
        return result;
    };
    let resp = match result {
        Ok(r) if r.status().is_success() => r,
        other => {
            release(app, &c).await;
            return other;
        }
    };
    let (parts, body) = resp.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            release(app, &c).await;
            return Err(ApiError::Internal(anyhow::anyhow!("answer to keep: {e}")));
        }
    };
    let answer = StoredAnswer {
        status: parts.status.as_u16(),
        location: parts
            .headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: body.to_vec(),
    };
    // The thing is made: if the answer cannot be kept, the client still gets it (a retry
    // would then make another, as without a key).
    if let Err(e) = app.meta.idempotency_finish(&c.scope, &c.key, &answer).await {
        tracing::warn!("keeping the answer to Idempotency-Key {:?}: {e:#}", c.key);
        release(app, &c).await;
    }
    Ok(Response::from_parts(parts, crate::server::full(body)))
}

async fn release(app: &App, c: &Claimed) {
    if let Err(e) = app.meta.idempotency_release(&c.scope, &c.key).await {
        tracing::warn!("releasing Idempotency-Key {:?}: {e:#}", c.key);
    }
}
