//! Write Kiln functions in a few lines.
//!
//! A function is a plain Rust function from a [`Request`] to anything that implements
//! [`IntoResponse`]; [`export!`] turns it into the `wasi:http/incoming-handler` export that
//! Kiln (and any other `wasi:http/proxy` host, such as `wasmtime serve`) calls.
//!
//! ```no_run
//! // The smallest Kiln function (examples/hello): answers `hello` to every request.
//! fn hello(_req: kiln_guest::Request) -> &'static str {
//!     "hello\n"
//! }
//! kiln_guest::export!(hello);
//! ```
//!
//! The crate reads nothing outside its own folder but `../wit/`, so `kiln new` can copy it
//! (with the WIT files) into a function's directory that builds anywhere.
//!
//! Build with `cargo build --release --target wasm32-wasip2` (or `kiln build`). The SDK
//! holds no state and adds no policy: limits, retries and caching live in the host.
//!
//! [`nn`] runs the models a function version was deployed with (`wasi:nn`): see
//! `examples/digits` for a classifier in a few dozen lines. [`variable`] reads the
//! function's settings and secrets (`kiln vars set`).

pub use http;

#[doc(hidden)]
pub mod __private;
mod config;
pub mod nn;

pub use config::{variable, variables};

/// An incoming request with its whole body.
pub type Request = http::Request<Vec<u8>>;
/// A complete response.
pub type Response = http::Response<Vec<u8>>;
/// Status codes, re-exported for handlers.
pub use http::StatusCode;

/// Anything a handler may return.
pub trait IntoResponse {
    /// Converts into a complete response.
    fn into_response(self) -> Response;
}

impl IntoResponse for Response {
    fn into_response(self) -> Response {
        self
    }
}

impl IntoResponse for Vec<u8> {
    fn into_response(self) -> Response {
        Response::new(self)
    }
}

impl IntoResponse for String {
    fn into_response(self) -> Response {
        text(StatusCode::OK, self)
    }
}

impl IntoResponse for &'static str {
    fn into_response(self) -> Response {
        text(StatusCode::OK, self.to_string())
    }
}

impl<T: IntoResponse> IntoResponse for (StatusCode, T) {
    fn into_response(self) -> Response {
        let mut r = self.1.into_response();
        *r.status_mut() = self.0;
        r
    }
}

/// `Err` becomes a 500 whose body is the error's message.
impl<T: IntoResponse, E: std::fmt::Display> IntoResponse for Result<T, E> {
    fn into_response(self) -> Response {
        match self {
            Ok(v) => v.into_response(),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    }
}

/// A `text/plain` response.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut r = Response::new(body.into().into_bytes());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// An `application/json` response; `body` is JSON text.
pub fn json(status: StatusCode, body: impl Into<String>) -> Response {
    let mut r = text(status, body);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Exports `handler` (a `fn(Request) -> impl IntoResponse`) as the component's HTTP handler.
///
/// ```ignore
/// fn hello(_req: kiln_guest::Request) -> &'static str { "hello\n" }
/// kiln_guest::export!(hello);
/// ```
#[macro_export]
macro_rules! export {
    ($handler:path) => {
        const _: () = {
            struct KilnHandler;
            impl $crate::__private::wasip2::exports::http::incoming_handler::Guest for KilnHandler {
                fn handle(
                    request: $crate::__private::wasip2::http::types::IncomingRequest,
                    response_out: $crate::__private::wasip2::http::types::ResponseOutparam,
                ) {
                    $crate::__private::serve(request, response_out, $handler)
                }
            }
            $crate::__private::wasip2::http::proxy::export!(KilnHandler);
        };
    };
}
