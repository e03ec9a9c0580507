//! `PUT`/`HEAD /v1/blobs/sha256:{hex}`: content-addressed uploads, streamed to disk while
//! hashing, never held whole in memory, refused with 413 as soon as they pass the limit.
//!
//! Blobs are stored once but held per tenant: a tenant holds a blob once it has uploaded
//! the bytes (verified against the digest, even when another tenant stored them first),
//! and sees and uses only the blobs it holds.

use std::sync::Arc;

use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;

use super::ApiError;
use crate::app::App;
use crate::auth::Caller;
use crate::common::Digest;
use crate::server::{Body, empty, json_response};
use crate::store::BlobError;

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse()
        .map_err(|e: crate::common::DigestError| ApiError::InvalidRequest(e.to_string()))
}

/// Whether `caller` holds blob `digest` (admins hold every blob).
async fn holds(app: &App, digest: &Digest, caller: &Caller) -> Result<bool, ApiError> {
    Ok(caller.is_admin()
        || app
            .meta
            .owns_blob(digest, caller.tenant().unwrap_or(""))
            .await?)
}

pub(super) async fn head(
    app: &Arc<App>,
    digest: &str,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let digest = parse_digest(digest)?;
    if !holds(app, &digest, caller).await? {
        return Err(ApiError::BlobNotFound(digest.to_string()));
    }
    let size = app
        .blobs
        .size(&digest)
        .await?
        .ok_or_else(|| ApiError::BlobNotFound(digest.to_string()))?;
    let mut resp = Response::new(empty());
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, size.into());
    Ok(resp)
}

pub(super) async fn put(
    app: &Arc<App>,
    digest: &str,
    req: Request<Body>,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let digest = match parse_digest(digest) {
        Ok(d) => d,
        Err(e) => {
            crate::server::drain(req.into_body()).await;
            return Err(e);
        }
    };
    let tenant = caller.tenant().unwrap_or_default().to_string();
    if holds(app, &digest, caller).await?
        && let Some(size) = app.blobs.size(&digest).await?
    {
        // Already held: the upload is not needed, but read it so the client, still
        // sending, gets this answer instead of a reset connection.
        crate::server::drain(req.into_body()).await;
        return Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"digest": digest, "size": size, "created": false}),
        ));
    }
    let (stored, size) = receive(
        app,
        req.into_body(),
        Some(digest),
        app.config.max_upload_bytes,
    )
    .await?;
    app.meta.add_blob_owner(&stored, &tenant).await?;
    let mut resp = json_response(
        StatusCode::CREATED,
        &serde_json::json!({"digest": stored, "size": size, "created": true}),
    );
    super::created_at(&mut resp, &format!("/v1/blobs/{stored}"));
    Ok(resp)
}

/// Streams a request body into the blob store; returns the digest and size. On failure the
/// rest of a modest body is drained so the client sees the answer.
pub(super) async fn receive(
    app: &Arc<App>,
    mut body: Body,
    expected: Option<Digest>,
    limit: u64,
) -> Result<(Digest, u64), ApiError> {
    let result = store(app, &mut body, expected, limit).await;
    if result.is_err() {
        crate::server::drain(body).await;
    }
    result
}

async fn store(
    app: &Arc<App>,
    body: &mut Body,
    expected: Option<Digest>,
    limit: u64,
) -> Result<(Digest, u64), ApiError> {
    if let Some(len) = http_body::Body::size_hint(&*body).exact()
        && len > limit
    {
        return Err(BlobError::TooLarge { limit }.into());
    }
    let mut writer = app
        .blobs
        .writer(expected, limit)
        .map_err(|e| ApiError::Internal(anyhow::Error::from(e).context("creating blob file")))?;
    let mut size = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| super::body_error(&e, "upload"))?;
        if let Some(data) = frame.data_ref() {
            size += data.len() as u64;
            writer.write_chunk(data)?;
        }
    }
    let digest = app.blobs.finish(writer).await?;
    Ok((digest, size))
}
