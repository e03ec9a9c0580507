//! [`ApiError`]: every error a client can get, each with a fixed status and a stable code,
//! turned into `{"error":{"code","message"}}` in one place. 4xx are not logged; 5xx are
//! logged once with their full cause chain.

use http::StatusCode;

use crate::app::DeployError;
use crate::auth::AuthError;
use crate::auth::signing::SignError;
use crate::deploy::{Rejected, RouteError};
use crate::runtime::{CompileError, InvokeError};
use crate::store::BlobError;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("blob {0} not found")]
    BlobNotFound(String),
    #[error("no API key {0:?}")]
    KeyNotFound(String),
    #[error("no such endpoint: {0}")]
    NoRoute(String),
    /// The method, and the methods the endpoint takes (`Allow`).
    #[error("method {0} is not allowed on this endpoint (it takes {1})")]
    MethodNotAllowed(String, &'static str),
    #[error("{0}")]
    InvalidRequest(String),
    /// `If-Match` named a revision the resource is no longer at (412).
    #[error("{0}")]
    PreconditionFailed(String),
    /// The request's body did not arrive in time (408).
    #[error("{0}")]
    RequestTimeout(String),
    /// The request conflicts with the state of what it names (a rollout in progress);
    /// the second field is the code.
    #[error("{0}")]
    Conflict(String, &'static str),
    /// A well-formed request that cannot be done as asked (an idempotency key used for
    /// another request); with its code.
    #[error("{0}")]
    Unprocessable(String, &'static str),
    /// A missing resource other than a function, version, blob or key; with its code.
    #[error("{0}")]
    NotFound(String, &'static str),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Compile(CompileError),
    /// A model of the version cannot be used; the code says whether it is the model or
    /// this server (no GPU, backend missing).
    #[error("{0}")]
    Model(String, &'static str),
    #[error(transparent)]
    Blob(BlobError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Sign(#[from] SignError),
    /// A signed bundle's stored blob no longer matches its digest.
    #[error("{0}")]
    Tampered(String),
    #[error(transparent)]
    Overloaded(#[from] Rejected),
    #[error(transparent)]
    Invoke(#[from] InvokeError),
    /// The version missed its `[validate]` cases (400 `version.validation_failed`, with
    /// every case's result).
    #[error("{}", validation_message(.0))]
    ValidationFailed(Box<crate::monitor::validate::ValidationResult>),
    /// The tenant billed has spent its hard monthly budget (429 `budget.exhausted`).
    #[error("{0}")]
    BudgetExhausted(String),
    /// A store this node needs (the database, the blob store) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// The server is at one of its own limits (buffered bytes, connections): try again.
    #[error("{0}")]
    Busy(String),
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
    /// A secret variable of the request's version does not open on this node (500).
    #[error(transparent)]
    Variable(#[from] crate::deploy::variables::Unreadable),
}

impl ApiError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            Route(_) | BlobNotFound(_) | KeyNotFound(_) | NoRoute(_) => StatusCode::NOT_FOUND,
            MethodNotAllowed(..) => StatusCode::METHOD_NOT_ALLOWED,
            InvalidRequest(_) => StatusCode::BAD_REQUEST,
            RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            Conflict(..) => StatusCode::CONFLICT,
            Unprocessable(..) => StatusCode::UNPROCESSABLE_ENTITY,
            NotFound(..) => StatusCode::NOT_FOUND,
            UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Compile(CompileError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Compile(CompileError::Internal(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            Compile(_) => StatusCode::BAD_REQUEST,
            Model(..) | ValidationFailed(_) => StatusCode::BAD_REQUEST,
            Blob(BlobError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Blob(BlobError::DigestMismatch { .. }) => StatusCode::BAD_REQUEST,
            Blob(BlobError::NotFound(_)) => StatusCode::NOT_FOUND,
            Blob(BlobError::Io(_) | BlobError::Corrupt { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
            Blob(BlobError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Auth(AuthError::Missing | AuthError::Invalid | AuthError::Revoked(_)) => {
                StatusCode::UNAUTHORIZED
            }
            Auth(AuthError::Forbidden(_)) => StatusCode::FORBIDDEN,
            Auth(AuthError::Hidden(_)) => StatusCode::NOT_FOUND,
            Auth(AuthError::RateLimited { .. }) | BudgetExhausted(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Sign(SignError::Unsigned(_) | SignError::Untrusted(..)) => StatusCode::FORBIDDEN,
            Sign(_) | Tampered(_) => StatusCode::BAD_REQUEST,
            Overloaded(_) | Unavailable(_) | Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Internal(e) if crate::store::unreachable(e) => StatusCode::SERVICE_UNAVAILABLE,
            Invoke(InvokeError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            Invoke(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Internal(_) | Variable(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            Route(RouteError::NoFunction(_)) => "function.not_found",
            Route(RouteError::NoVersion(..)) => "version.not_found",
            Route(RouteError::NoAlias(..)) => "alias.not_found",
            BlobNotFound(_) | Blob(BlobError::NotFound(_)) => "blob.not_found",
            KeyNotFound(_) => "key.not_found",
            NoRoute(_) => "route.not_found",
            MethodNotAllowed(..) => "method.not_allowed",
            InvalidRequest(_) => "request.invalid",
            RequestTimeout(_) => "request.timeout",
            PreconditionFailed(_) => "traffic.stale_revision",
            Conflict(_, code) | NotFound(_, code) | Unprocessable(_, code) => code,
            UnsupportedMediaType(_) => "request.unsupported_media_type",
            TooLarge(_) | Blob(BlobError::TooLarge { .. }) => "request.too_large",
            Compile(CompileError::TooLarge { .. }) => "component.too_large",
            Compile(CompileError::Precompiled) => "component.precompiled",
            Compile(CompileError::CoreModule) => "component.core_module",
            Compile(CompileError::Invalid(_)) => "component.invalid",
            Compile(CompileError::UnsatisfiedImport(_)) => "component.unsatisfied_import",
            Compile(CompileError::NotAProxy(_)) => "component.not_http_proxy",
            Compile(CompileError::Instantiate(_)) => "component.instantiate_failed",
            Compile(CompileError::Internal(_)) => "internal",
            Model(_, code) => code,
            ValidationFailed(_) => "version.validation_failed",
            BudgetExhausted(_) => "budget.exhausted",
            Blob(BlobError::DigestMismatch { .. }) => "blob.digest_mismatch",
            Blob(BlobError::Io(_)) => "internal",
            Blob(BlobError::Corrupt { .. }) => "blob.corrupt",
            Blob(BlobError::Unavailable(_)) => "store.unavailable",
            Auth(AuthError::Missing) => "auth.missing_key",
            Auth(AuthError::Invalid) => "auth.invalid_key",
            Auth(AuthError::Revoked(_)) => "auth.revoked_key",
            Auth(AuthError::Forbidden(_)) => "auth.forbidden",
            Auth(AuthError::Hidden(_)) => "function.not_found",
            Auth(AuthError::RateLimited { .. }) => "rate.limited",
            Sign(SignError::Unsigned(_)) => "bundle.unsigned",
            Sign(SignError::Untrusted(..)) => "bundle.untrusted_signer",
            Sign(SignError::BadSignature) => "bundle.bad_signature",
            Sign(SignError::Malformed(_)) => "bundle.malformed_signature",
            Sign(SignError::BareUpload) => "bundle.bare_upload",
            Sign(SignError::Replayed(_)) => "bundle.replayed",
            Tampered(_) => "bundle.digest_mismatch",
            Overloaded(_) => "function.overloaded",
            Unavailable(_) => "store.unavailable",
            Busy(_) => "server.busy",
            Internal(e) if crate::store::unreachable(e) => "store.unavailable",
            Invoke(InvokeError::Timeout(_)) => "function.timeout",
            Invoke(InvokeError::Trap(_)) => "function.trap",
            Invoke(InvokeError::NoResponse) => "function.no_response",
            Invoke(InvokeError::GuestError(_)) => "function.error",
            Invoke(InvokeError::Internal(_)) => "internal",
            Internal(_) => "internal",
            Variable(_) => "function.variable_unreadable",
        }
    }

    /// The JSON body `{"error":{"code","message"}}` (a failed validation adds
    /// `"validation"`: the verdict and every case).
    pub fn to_json(&self) -> serde_json::Value {
        let mut json =
            serde_json::json!({"error": {"code": self.code(), "message": format!("{self:#}")}});
        if let ApiError::ValidationFailed(v) = self {
            json["error"]["validation"] = serde_json::to_value(v).unwrap_or_default();
        }
        json
    }
}

fn validation_message(v: &crate::monitor::validate::ValidationResult) -> String {
    format!(
        "the version failed validation ({} of {} cases failed): {}",
        v.failed,
        v.cases,
        v.reasons.join("; ")
    )
}

impl From<crate::app::VariablesError> for ApiError {
    fn from(e: crate::app::VariablesError) -> Self {
        use crate::app::VariablesError;
        match e {
            VariablesError::NoFunction(n) => ApiError::Route(RouteError::NoFunction(n)),
            VariablesError::Invalid(_) => ApiError::InvalidRequest(e.to_string()),
            VariablesError::NoSecretsKey => {
                ApiError::Conflict(e.to_string(), "variables.no_secrets_key")
            }
            VariablesError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<crate::app::TrafficError> for ApiError {
    fn from(e: crate::app::TrafficError) -> Self {
        use crate::app::TrafficError;
        match e {
            TrafficError::NoFunction(n) => ApiError::Route(RouteError::NoFunction(n)),
            TrafficError::Invalid(_)
            | TrafficError::InvalidRollout(_)
            | TrafficError::NothingToRollBack(_) => ApiError::InvalidRequest(e.to_string()),
            TrafficError::RolloutActive(..) => ApiError::Conflict(e.to_string(), "rollout.active"),
            TrafficError::Moved(_) => ApiError::Conflict(e.to_string(), "rollout.changed"),
            TrafficError::Stale(_) => ApiError::PreconditionFailed(e.to_string()),
            TrafficError::RolloutState(..) => {
                ApiError::Conflict(e.to_string(), "rollout.not_active")
            }
            TrafficError::NoRollout(_) => ApiError::NotFound(e.to_string(), "rollout.not_found"),
            TrafficError::Route(r) => ApiError::Route(r),
            TrafficError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<BlobError> for ApiError {
    fn from(e: BlobError) -> Self {
        ApiError::Blob(e)
    }
}

impl From<CompileError> for ApiError {
    fn from(e: CompileError) -> Self {
        ApiError::Compile(e)
    }
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        match e {
            DeployError::Compile(c) => ApiError::Compile(c),
            DeployError::MissingBlob(d) => ApiError::BlobNotFound(format!(
                "{d} is not on this server; upload it first with PUT /v1/blobs/{d}"
            )),
            DeployError::Limits(l) => ApiError::InvalidRequest(l.to_string()),
            DeployError::NotOwner(n) => ApiError::Auth(AuthError::Forbidden(n.to_string())),
            DeployError::Tampered(_) => ApiError::Tampered(e.to_string()),
            DeployError::Replayed(r) => ApiError::Sign(SignError::Replayed(r.to_string())),
            DeployError::Model { ref error, .. } => {
                let code = match error.code {
                    crate::nn::ErrorCode::UnsupportedOperation => "model.unsupported",
                    crate::nn::ErrorCode::TooLarge => "model.too_large",
                    crate::nn::ErrorCode::RuntimeError => "model.load_failed",
                    _ => "model.invalid",
                };
                ApiError::Model(e.to_string(), code)
            }
            DeployError::Models(_) | DeployError::Embedded(_) => {
                ApiError::Model(e.to_string(), "model.invalid")
            }
            DeployError::Validation(_) => ApiError::InvalidRequest(e.to_string()),
            DeployError::ValidationFailed(v) => ApiError::ValidationFailed(v),
            DeployError::Blob(b) => ApiError::Blob(b),
            DeployError::Variables(v) => v.into(),
            DeployError::Internal(e) => ApiError::Internal(e),
        }
    }
}
