//! [`ApiError`]: every error a client can get, each with a fixed status and a stable code,
//! turned into `{"error":{"code","message"}}` in one place. 4xx are not logged; 5xx are
//! logged once with their full cause chain.

use http::StatusCode;

use crate::app::DeployError;
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
    #[error("no such endpoint: {0}")]
    NoRoute(String),
    #[error("method {0} is not allowed on this endpoint")]
    MethodNotAllowed(String),
    #[error("{0}")]
    InvalidRequest(String),
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
    Overloaded(#[from] Rejected),
    #[error(transparent)]
    Invoke(#[from] InvokeError),
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            Route(_) | BlobNotFound(_) | NoRoute(_) => StatusCode::NOT_FOUND,
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            InvalidRequest(_) => StatusCode::BAD_REQUEST,
            UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Compile(CompileError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Compile(CompileError::Internal(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            Compile(_) => StatusCode::BAD_REQUEST,
            Model(..) => StatusCode::BAD_REQUEST,
            Blob(BlobError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Blob(BlobError::DigestMismatch { .. }) => StatusCode::BAD_REQUEST,
            Blob(BlobError::NotFound(_)) => StatusCode::NOT_FOUND,
            Blob(BlobError::Io(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Invoke(InvokeError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            Invoke(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            Route(RouteError::NoFunction(_)) => "function.not_found",
            Route(RouteError::NoVersion(..)) => "version.not_found",
            BlobNotFound(_) | Blob(BlobError::NotFound(_)) => "blob.not_found",
            NoRoute(_) => "route.not_found",
            MethodNotAllowed(_) => "method.not_allowed",
            InvalidRequest(_) => "request.invalid",
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
            Blob(BlobError::DigestMismatch { .. }) => "blob.digest_mismatch",
            Blob(BlobError::Io(_)) => "internal",
            Overloaded(_) => "function.overloaded",
            Invoke(InvokeError::Timeout(_)) => "function.timeout",
            Invoke(InvokeError::Trap(_)) => "function.trap",
            Invoke(InvokeError::NoResponse) => "function.no_response",
            Invoke(InvokeError::GuestError(_)) => "function.error",
            Invoke(InvokeError::Internal(_)) => "internal",
            Internal(_) => "internal",
        }
    }

    /// The JSON body `{"error":{"code","message"}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code(), "message": format!("{self:#}")}})
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
            DeployError::Internal(e) => ApiError::Internal(e),
        }
    }
}
