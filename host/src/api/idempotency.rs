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
//!
//! "The same request" is judged on its meaning: JSON bodies compare with their object
//! keys sorted and query strings with their pairs sorted. The kept answer is sealed
//! under a key derived from the caller's bearer key and the `Idempotency-Key` (a created
//! API key's secret is in it): the store holds nothing a reader of the database could use,
//! and only the caller that made the first request can have its answer replayed. A
//! request without a bearer key (`--insecure` before the first key) has nothing to seal
//! under but the `Idempotency-Key`, which the store holds: a new key's answer is then not
//! kept (a retry is refused anyway: that key turned authentication on).

use http::{HeaderMap, HeaderValue, Response, header};
use http_body_util::BodyExt;

use super::ApiError;
use crate::app::App;
use crate::auth::Caller;
use crate::common::seal;
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

/// Context of the keys answers are sealed under (fixed: changing it strands kept answers).
const SEAL_CONTEXT: &str = "kiln 2026-12-06 idempotency answer";

/// Operations whose answer carries a secret (a new API key's).
const SECRET_OPS: &[&str] = &["key.create"];

/// A request's `Idempotency-Key`, with the key its answer is sealed under.
pub(super) struct IdempotencyKey {
    key: String,
    seal: [u8; seal::KEY_LEN],
    /// The request carried no bearer key (`--insecure` with none yet): its seal comes
    /// from the `Idempotency-Key` alone, which the store holds.
    bearer_less: bool,
}

impl IdempotencyKey {
    /// Whether the answer to `op` may be kept for replay: not one carrying a secret when
    /// there was no bearer key to seal it under.
    fn may_keep(&self, op: &str) -> bool {
        !(self.bearer_less && SECRET_OPS.contains(&op))
    }
}

/// The request's key, checked before its body is read; `None` without the header.
pub(super) fn key_of(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
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
    // The bearer key as the server reads it (without auth, there is none to hide behind).
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .map_or("", |(_, token)| token.trim());
    Ok(Some(IdempotencyKey {
        seal: seal::derive_key(SEAL_CONTEXT, &[bearer.as_bytes(), key.as_bytes()]),
        key: key.to_string(),
        bearer_less: bearer.is_empty(),
    }))
}

/// `body` as a fingerprint should see it: JSON with its object keys sorted (so the same
/// document sent with its fields in another order is the same request), else as sent.
pub(super) fn canonical_json(body: &[u8]) -> Vec<u8> {
    // serde_json's map is ordered by key (no `preserve_order` here; a unit test holds it).
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_vec(&v).ok())
        .unwrap_or_else(|| body.to_vec())
}

/// A query string as a fingerprint should see it: its pairs sorted.
pub(super) fn canonical_query(query: &str) -> Vec<u8> {
    let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort_unstable();
    pairs.join("&").into_bytes()
}

/// A key this request holds: its answer is stored by [`settle`].
pub(super) struct Claimed {
    scope: String,
    key: IdempotencyKey,
    token: String,
    /// Whether the answer may be kept: not one carrying a secret that only the
    /// `Idempotency-Key` (held by the store) would seal. Such a request still holds the
    /// claim while it runs, so racing retries are told to wait.
    keep: bool,
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
    key: Option<IdempotencyKey>,
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
    let mut token = [0u8; 16];
    getrandom::fill(&mut token)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("drawing a claim token: {e}")))?;
    let token = hex::encode(token);
    let name = &key.key;
    match app
        .meta
        .idempotency_claim(&scope, name, &fingerprint, &token, None)
        .await?
    {
        Claim::New => {
            let keep = key.may_keep(op);
            Ok(Begun::Run(Some(Claimed {
                scope,
                key,
                token,
                keep,
            })))
        }
        Claim::InProgress => Err(ApiError::Conflict(
            format!(
                "a request with Idempotency-Key {name:?} is still running; retry once it has answered"
            ),
            "idempotency.in_progress",
        )),
        Claim::Reused => Err(reused(name)),
        Claim::Done(answer) => {
            // Sealed for the caller that made it: any other credential cannot open it.
            let body =
                seal::open(&key.seal, scope.as_bytes(), &answer.body).map_err(|_| reused(name))?;
            Ok(Begun::Replay(replay(answer, body, name)))
        }
    }
}

fn reused(key: &str) -> ApiError {
    ApiError::Unprocessable(
        format!(
            "Idempotency-Key {key:?} was used for a different request; use a new key for a new request"
        ),
        "idempotency.key_reused",
    )
}

fn replay(answer: StoredAnswer, body: Vec<u8>, key: &str) -> Response<Body> {
    let mut resp = Response::new(crate::server::full(body));
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
        Ok(r) if r.status().is_success() && c.keep => r,
        other => {
            release(app, &c).await;
            return other;
        }
    };
    let (parts, body) = resp.into_parts();
    // Answers are JSON documents of a few KiB; one that is not whole or too large to keep
    // still reaches the client (the thing is made), just without a replay.
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            release(app, &c).await;
            return Err(ApiError::Internal(anyhow::anyhow!(
                "the answer failed: {e}"
            )));
        }
    };
    let location = parts
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // The thing is made: if the answer cannot be kept, the client still gets it (a retry
    // would then make another, as without a key).
    if let Err(e) = keep(app, &c, parts.status.as_u16(), location, &body).await {
        tracing::warn!(
            "keeping the answer to Idempotency-Key {:?}: {e:#}",
            c.key.key
        );
        release(app, &c).await;
    }
    Ok(Response::from_parts(parts, crate::server::full(body)))
}

/// Stores the answer `c`'s request made, sealed.
async fn keep(
    app: &App,
    c: &Claimed,
    status: u16,
    location: Option<String>,
    body: &[u8],
) -> anyhow::Result<()> {
    if body.len() > MAX_ANSWER_BYTES {
        anyhow::bail!(
            "the answer is {} bytes, over {MAX_ANSWER_BYTES}",
            body.len()
        );
    }
    let answer = StoredAnswer {
        status,
        location,
        body: seal::seal(&c.key.seal, c.scope.as_bytes(), body)?,
    };
    let kept = app
        .meta
        .idempotency_finish(&c.scope, &c.key.key, &c.token, &answer)
        .await?;
    if !kept {
        anyhow::bail!("the claim was taken over by a later request (this one ran too long)");
    }
    Ok(())
}

async fn release(app: &App, c: &Claimed) {
    match app
        .meta
        .idempotency_release(&c.scope, &c.key.key, &c.token)
        .await
    {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            "Idempotency-Key {:?}: the claim was taken over by a later request before this one failed",
            c.key.key
        ),
        Err(e) => tracing::warn!("releasing Idempotency-Key {:?}: {e:#}", c.key.key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_request_written_differently_has_one_fingerprint() {
        assert_eq!(
            canonical_json(br#"{"tenant":"a","scopes":["invoke:*"],"rate":"5/s"}"#),
            canonical_json(
                b"{ \"rate\": \"5/s\",\n \"scopes\": [\"invoke:*\"], \"tenant\": \"a\" }"
            ),
        );
        assert_ne!(
            canonical_json(br#"{"scopes":["a","b"]}"#),
            canonical_json(br#"{"scopes":["b","a"]}"#),
            "array order is meaning"
        );
        assert_eq!(canonical_json(b"not json"), b"not json");
        assert_eq!(
            canonical_query("timeout_ms=5&memory_mb=64"),
            canonical_query("memory_mb=64&timeout_ms=5&")
        );
        assert_ne!(canonical_query("a=1&b=2"), canonical_query("a=2&b=1"));
    }

    #[test]
    fn a_new_keys_answer_is_kept_only_when_a_bearer_key_seals_it() {
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_static("first-key"));
        let open = key_of(&h).unwrap().unwrap();
        assert!(
            !open.may_keep("key.create"),
            "the secret would be sealed by the key alone"
        );
        assert!(
            open.may_keep("version.create"),
            "a version's answer holds no secret"
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer kiln_secret"),
        );
        assert!(key_of(&h).unwrap().unwrap().may_keep("key.create"));
    }

    #[test]
    fn the_answer_is_sealed_for_the_bearer_that_made_it() {
        let headers = |bearer: &str| {
            let mut h = HeaderMap::new();
            h.insert(HEADER, HeaderValue::from_static("retry-1"));
            h.insert(
                header::AUTHORIZATION,
                HeaderValue::try_from(format!("Bearer {bearer}")).unwrap(),
            );
            h
        };
        let mine = key_of(&headers("kiln_a_secret")).unwrap().unwrap();
        let again = key_of(&headers("kiln_a_secret")).unwrap().unwrap();
        let theirs = key_of(&headers("kiln_b_secret")).unwrap().unwrap();
        let sealed = seal::seal(&mine.seal, b"scope", b"{\"key\":\"kiln_new\"}").unwrap();
        assert_eq!(
            seal::open(&again.seal, b"scope", &sealed).unwrap(),
            b"{\"key\":\"kiln_new\"}"
        );
        assert!(seal::open(&theirs.seal, b"scope", &sealed).is_err());
    }
}
