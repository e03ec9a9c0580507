//! `/v1/functions...`: list, show, delete functions; list, show and create versions; clear
//! a function's caches.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Request, Response, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::idempotency::{self, Begun};
use super::page::Paging;
use super::{ApiError, AuditDetail, blobs};
use crate::app::{App, Deployed, Deployer};
use crate::auth::Caller;
use crate::auth::signing::{self, SignError};
use crate::cache::CacheSpec;
use crate::common::time::format_secs;
use crate::common::{Digest, LimitsSpec};
use crate::deploy::{FunctionEntry, RouteError, VersionEntry, validate_name};
use crate::nn::{BackendKind, Encoding, ModelRef, NnSpec, Target};
use crate::server::{Body, json_response};
use crate::store::VersionRecord;

/// Largest JSON manifest accepted, in bytes.
const MAX_MANIFEST_BYTES: usize = 1 << 20;
/// Most functions or versions one page of a list holds.
const MAX_PAGE: usize = 1000;

/// The JSON body of `POST /v1/functions/{name}/versions` that names stored blobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVersion {
    /// Digest of the component blob (`sha256:<hex>`), uploaded beforehand.
    pub component: Digest,
    /// Limits; unset ones take the server's defaults.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Models by the name guests load them with; their blobs are uploaded beforehand.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, ModelDecl>,
    /// `wasi:nn` options.
    #[serde(default)]
    pub nn: NnOptions,
    /// Response and inference caching.
    #[serde(default)]
    pub cache: CacheSpec,
    /// Whether anyone may call the function without a key; unset keeps what it was
    /// (private for a new function).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<bool>,
    /// Where guests may send HTTP requests: `[scheme://]host[:port]`, `*.` and `:*`
    /// wildcards; nothing when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_outbound_hosts: Vec<String>,
    /// When a signed manifest was signed (unix milliseconds): each signed deploy of a
    /// function must be newer than the last, so an old signed manifest cannot be replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_at: Option<i64>,
    /// Cases the version must pass before it takes traffic: `{"cases": digest,
    /// "min_accuracy", "max_p99_ms"}`, the cases blob uploaded beforehand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validate: Option<crate::monitor::validate::ValidateSpec>,
    /// Variables guests may read: `{"key": {"default": "x"}}` or `{"key": {"secret": true}}`;
    /// values are set with `POST /v1/functions/{name}/variables`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: crate::deploy::variables::Declared,
}

/// One model in a version manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDecl {
    pub digest: Digest,
    #[serde(default)]
    pub encoding: Encoding,
    #[serde(default)]
    pub target: Target,
    /// `tract` or `onnxruntime`; unset takes the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
    /// `"off"` (default), `"auto"`, or `{"max_rows", "max_wait_us"}`.
    #[serde(default, skip_serializing_if = "crate::nn::BatchSpec::is_off")]
    pub batch: crate::nn::BatchSpec,
    /// Drift monitoring: `{"reference": digest, "sample_percent", "max_features",
    /// "drift_threshold"}`; the reference blob is uploaded beforehand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<crate::monitor::MonitorSpec>,
}

/// The `[nn]` options of a version.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NnOptions {
    /// Lets guests pass models of up to this many MiB to `graph.load`; unset: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_load_max_mb: Option<u64>,
}

impl CreateVersion {
    /// The models and options as a version records them (sizes are filled in at deploy).
    pub fn nn_spec(&self) -> NnSpec {
        NnSpec {
            models: self
                .models
                .iter()
                .map(|(name, m)| ModelRef {
                    name: name.clone(),
                    digest: m.digest,
                    size: 0,
                    encoding: m.encoding,
                    target: m.target,
                    backend: m.backend,
                    batch: m.batch,
                    monitor: m.monitor.clone(),
                })
                .collect(),
            guest_load_max_bytes: self
                .nn
                .guest_load_max_mb
                .map(|mb| mb.saturating_mul(1 << 20)),
        }
    }
}

/// Where clients reach this server, for the URLs answers carry: `[server] public_url`, else
/// the request's authority (HTTP/2 `:authority`, or a valid `Host`) or the listen address,
/// with this server's scheme.
pub(super) fn base_url<B>(app: &App, req: &Request<B>) -> String {
    if let Some(url) = &app.config.server.public_url {
        return url.clone();
    }
    let scheme = if app.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| h.parse::<http::uri::Authority>().is_ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| app.config.listen.to_string());
    format!("{scheme}://{host}")
}

fn version_json(rec: &VersionRecord, base: &str) -> serde_json::Value {
    let mut json = serde_json::json!({
        "function": rec.function,
        "version": rec.version,
        "digest": rec.digest,
        "size": rec.size,
        "limits": rec.limits,
        "created_at": format_secs(rec.created_at),
        "url": format!("{base}/fn/{}@{}/", rec.function, rec.version),
    });
    if let Some(max) = rec.nn.guest_load_max_bytes {
        json["nn"] = serde_json::json!({"guest_load_max_bytes": max});
    }
    json["cache"] = serde_json::to_value(&rec.cache).unwrap_or_default();
    if let Some(signer) = &rec.signer {
        json["signer"] = signer.as_str().into();
    }
    if !rec.outbound.is_empty() {
        json["allowed_outbound_hosts"] = serde_json::json!(rec.outbound);
    }
    if let Some(v) = &rec.validation {
        json["validation"] = serde_json::to_value(v).unwrap_or_default();
    }
    if !rec.variables.is_empty() {
        json["variables"] = serde_json::to_value(&rec.variables).unwrap_or_default();
    }
    json
}

/// A version with the live state of its models (backend, device, loaded or not).
fn version_detail(app: &App, entry: &VersionEntry, base: &str) -> serde_json::Value {
    let mut json = version_json(&entry.record, base);
    json["models"] =
        serde_json::to_value(app.runtime.models().info(&entry.models)).unwrap_or_default();
    json
}

fn function_json(f: &FunctionEntry, base: &str) -> serde_json::Value {
    serde_json::json!({
        "name": f.name,
        "tenant": &*f.owner,
        "public": f.public,
        "created_at": format_secs(f.created_at),
        "latest_version": f.latest().map(|v| v.record.version),
        "versions": f.versions.len(),
        "url": format!("{base}/fn/{}/", f.name),
    })
}

fn function(app: &App, name: &str) -> Result<Arc<FunctionEntry>, ApiError> {
    app.registry
        .function(name)
        .ok_or_else(|| RouteError::NoFunction(name.to_string()).into())
}

/// `GET /v1/functions?limit&cursor`: the caller's tenant's functions (every one for an
/// admin), by name, a page at a time.
pub(super) fn list(
    app: &Arc<App>,
    caller: &Caller,
    req: &Request<Body>,
) -> Result<Response<Body>, ApiError> {
    let paging = Paging::parse("functions", MAX_PAGE, req.uri().query().unwrap_or(""))?;
    let base = base_url(app, req);
    let mine = app
        .registry
        .functions()
        .into_iter()
        .filter(|f| caller.is_admin() || caller.tenant() == Some(&*f.owner));
    let (page, next) = paging.of_sorted(mine, |f| f.name.clone())?;
    let page: Vec<_> = page.iter().map(|f| function_json(f, &base)).collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"functions": page, "next_cursor": next}),
    ))
}

pub(super) fn show<B>(
    app: &Arc<App>,
    name: &str,
    req: &Request<B>,
) -> Result<Response<Body>, ApiError> {
    let f = function(app, name)?;
    let base = base_url(app, req);
    let mut json = function_json(&f, &base);
    json["version_list"] = f
        .versions
        .values()
        .map(|v| version_json(&v.record, &base))
        .collect();
    Ok(json_response(StatusCode::OK, &json))
}

pub(super) async fn delete(
    app: &Arc<App>,
    name: &str,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    // Ownership was checked; checked again under the publishing lock.
    let owner = (!caller.is_admin()).then(|| caller.tenant().unwrap_or_default());
    if !app.delete_function(name, owner).await? {
        return Err(RouteError::NoFunction(name.to_string()).into());
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"deleted": name}),
    ))
}

/// `DELETE /v1/functions/{name}/cache`: drops the function's cached responses and
/// inference results (every version).
pub(super) fn clear_cache(app: &Arc<App>, name: &str) -> Result<Response<Body>, ApiError> {
    function(app, name)?;
    let (responses, inference) = app.clear_caches(name);
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"function": name, "removed": {"responses": responses, "inference": inference}}),
    ))
}

pub(super) fn versions(
    app: &Arc<App>,
    name: &str,
    req: &Request<Body>,
) -> Result<Response<Body>, ApiError> {
    let paging = Paging::parse("versions", MAX_PAGE, req.uri().query().unwrap_or(""))?;
    let f = function(app, name)?;
    let base = base_url(app, req);
    let (page, next) = paging.of_sorted(f.versions.values(), |v| v.record.version)?;
    let page: Vec<_> = page
        .iter()
        .map(|v| version_json(&v.record, &base))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"versions": page, "next_cursor": next}),
    ))
}

pub(super) fn version(
    app: &Arc<App>,
    name: &str,
    v: &str,
    req: &Request<Body>,
) -> Result<Response<Body>, ApiError> {
    let n: u32 = v.parse().map_err(|_| {
        ApiError::InvalidRequest(format!("invalid version {v:?}: expected a number"))
    })?;
    let entry = app.registry.route(name, Some(n))?;
    let base = base_url(app, req);
    Ok(json_response(
        StatusCode::OK,
        &version_detail(app, &entry, &base),
    ))
}

/// How a create-version request carries its component.
enum Upload {
    /// A bare component in the body; limits, caching and visibility from the query string.
    Wasm(LimitsSpec, CacheSpec, Option<bool>),
    /// A JSON manifest naming blobs; `true`: a dry run (`?dry_run=true`).
    Manifest(bool),
}

/// The query string of a bare `application/wasm` upload: limits, caching parameters and
/// `public`. Public for the fuzz target of the upload path.
pub fn bare_upload_params(query: &str) -> Result<(LimitsSpec, CacheSpec, Option<bool>), String> {
    // Caching parameters and `public` first; the rest are limits (which reject unknown keys).
    let mut cache = CacheSpec::default();
    let mut public = None;
    let mut limits = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = super::percent_decode(v)?;
        if k == "public" {
            public = Some(
                v.parse::<bool>()
                    .map_err(|_| format!("public={v:?}: use true or false"))?,
            );
        } else if !cache.set_from_query(k, &v)? {
            limits.push(format!("{k}={v}"));
        }
    }
    let limits = LimitsSpec::from_query(&limits.join("&"))?;
    Ok((limits, cache.validate()?, public))
}

/// Checks what can be checked before reading the body.
fn precheck<B>(name: &str, req: &Request<B>) -> Result<Upload, ApiError> {
    validate_name(name).map_err(ApiError::InvalidRequest)?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let query = req.uri().query().unwrap_or("");
    match content_type.as_str() {
        "application/wasm" => {
            let (limits, cache, public) =
                bare_upload_params(query).map_err(ApiError::InvalidRequest)?;
            Ok(Upload::Wasm(limits, cache, public))
        }
        "application/json" => match query {
            "" | "dry_run=false" => Ok(Upload::Manifest(false)),
            "dry_run=true" => Ok(Upload::Manifest(true)),
            _ => Err(ApiError::InvalidRequest(
                "with a JSON manifest, the query string takes only dry_run=true; limits go in its \"limits\" object".into(),
            )),
        },
        other => Err(ApiError::UnsupportedMediaType(format!(
            "content-type {other:?} is not accepted: send application/wasm (a component) or application/json (a manifest naming blobs)"
        ))),
    }
}

/// `POST /v1/functions/{name}/versions`: deploys a version; with trusted publisher keys
/// configured for the caller's tenant, only a signed manifest.
pub(super) async fn create_version(
    app: &Arc<App>,
    name: &str,
    req: Request<Body>,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let base = base_url(app, &req);
    let tenant = caller.tenant().unwrap_or_default().to_string();
    // The owner's publishers decide (an admin deploying onto a tenant's function too).
    let owner = app
        .registry
        .function(name)
        .map_or_else(|| tenant.clone(), |f| f.owner.to_string());
    let trust = app.config.auth.trust(&owner);
    let checked = idempotency::key_of(req.headers()).and_then(|k| Ok((precheck(name, &req)?, k)));
    let checked = match checked {
        Ok((Upload::Wasm(..), _)) if req.headers().contains_key(signing::SIGNATURE_HEADER) => {
            Err(SignError::BareUpload.into())
        }
        Ok((Upload::Wasm(..), _)) if trust.required() => {
            Err(SignError::Unsigned(owner.clone()).into())
        }
        other => other,
    };
    let (upload, idempotency_key) = match checked {
        Ok(u) => u,
        Err(e) => {
            // Read (and drop) the rest of a modest body so the client, still sending, sees
            // the answer rather than a reset connection.
            crate::server::drain(req.into_body()).await;
            return Err(e);
        }
    };
    let query = req.uri().query().unwrap_or("").to_string();
    let mut signer = None;
    let mut signed_at = None;
    let mut outbound = Vec::new();
    // What the request asked for, for the idempotency key's fingerprint.
    let request: Vec<Vec<u8>>;
    let mut validate = None;
    let mut variables = BTreeMap::new();
    let mut dry_run = false;
    let (component, limits, nn, cache, public) = match upload {
        Upload::Wasm(spec, cache, public) => {
            let limit = app
                .config
                .max_upload_bytes
                .min(app.config.runtime.max_component_bytes);
            let (digest, _) = blobs::receive(app, req.into_body(), None, limit).await?;
            app.meta.add_blob_owner(&digest, &tenant).await?;
            request = vec![
                b"wasm".to_vec(),
                idempotency::canonical_query(&query),
                digest.to_string().into_bytes(),
            ];
            (digest, spec, NnSpec::default(), cache, public)
        }
        Upload::Manifest(dry) => {
            dry_run = dry;
            let (parts, body) = req.into_parts();
            let body = super::read_small_body(body, MAX_MANIFEST_BYTES, "manifest").await?;
            let signature = |h: &str| {
                parts
                    .headers
                    .get(h)
                    .map_or(vec![], |v| v.as_bytes().to_vec())
            };
            request = vec![
                b"manifest".to_vec(),
                idempotency::canonical_query(&query),
                idempotency::canonical_json(&body),
                signature(signing::SIGNER_HEADER),
                signature(signing::SIGNATURE_HEADER),
            ];
            // The signature covers the bytes as sent; check it before reading them.
            signer = signing::verify(&parts.headers, name, &body)?;
            trust.check(signer.as_ref())?;
            let manifest: CreateVersion = serde_json::from_slice(&body)
                .map_err(|e| ApiError::InvalidRequest(format!("invalid version manifest: {e}")))?;
            let nn = manifest.nn_spec();
            if signer.is_some() {
                signed_at = Some(manifest.signed_at.ok_or(SignError::Malformed(
                    "a signed manifest needs \"signed_at\" (unix milliseconds), as kiln deploy --sign writes".into(),
                ))?);
            }
            crate::runtime::parse_patterns(&manifest.allowed_outbound_hosts)
                .map_err(ApiError::InvalidRequest)?;
            outbound = manifest.allowed_outbound_hosts;
            validate = manifest.validate;
            crate::deploy::variables::validate_declared(&manifest.variables)
                .map_err(ApiError::InvalidRequest)?;
            variables = manifest.variables;
            (
                manifest.component,
                manifest.limits,
                nn,
                manifest.cache,
                manifest.public,
            )
        }
    };
    let cache = cache.validate().map_err(ApiError::InvalidRequest)?;
    let limits = limits.resolve(&app.config.runtime.default_limits);
    let by = Deployer {
        tenant,
        admin: caller.is_admin(),
        public,
        signer: signer.map(|s| s.to_string()),
        signed_at,
        outbound,
        validate,
        dry_run,
        variables,
        key_id: caller.key_id().map(str::to_string),
    };
    // Claimed once the request is known to be well-formed, just before anything is made.
    let request: Vec<&[u8]> = request.iter().map(Vec::as_slice).collect();
    let claimed = match idempotency::begin(
        app,
        caller,
        "version.create",
        name,
        idempotency_key,
        &request,
    )
    .await?
    {
        Begun::Replay(resp) => return Ok(resp),
        Begun::Run(c) => c,
    };
    let made = async {
        match app.deploy(name, component, limits, nn, cache, &by).await? {
            Deployed::Version(rec) => answer_created(app, name, &rec, &base),
            Deployed::DryRun(validation) => {
                let mut resp = json_response(
                    StatusCode::OK,
                    &serde_json::json!({
                        "function": name,
                        "dry_run": true,
                        "validation": validation,
                    }),
                );
                resp.extensions_mut().insert(AuditDetail {
                    detail: "dry run: nothing deployed".into(),
                    subject: None,
                });
                Ok(resp)
            }
        }
    };
    let result = made.await;
    idempotency::settle(app, claimed, result).await
}

/// The 201 of a deployed version: its details, `Location`, and what the audit log keeps.
fn answer_created(
    app: &App,
    name: &str,
    rec: &VersionRecord,
    base: &str,
) -> Result<Response<Body>, ApiError> {
    let base = base.to_string();
    let entry = app.registry.route(name, Some(rec.version))?;
    let mut json = version_detail(app, &entry, &base);
    json["url"] = format!("{base}/fn/{}/", rec.function).into();
    let mut resp = json_response(StatusCode::CREATED, &json);
    super::created_at(
        &mut resp,
        &format!("/v1/functions/{}/versions/{}", rec.function, rec.version),
    );
    let signed = match &rec.signer {
        Some(s) => format!(", signed by {s}"),
        None => String::new(),
    };
    resp.extensions_mut().insert(AuditDetail {
        detail: format!("version {} ({}){signed}", rec.version, rec.digest),
        subject: None,
    });
    Ok(resp)
}
