//! The control plane: JSON over HTTP under `/v1`. The only module that turns requests into
//! calls on the stores, the runtime and the registry.
//!
//! | method | path | what |
//! |---|---|---|
//! | `PUT`, `HEAD` | `/v1/blobs/sha256:{hex}` | upload (digest verified) / check a blob |
//! | `GET` | `/v1/functions` | list functions |
//! | `GET`, `DELETE` | `/v1/functions/{name}` | show / delete a function |
//! | `GET` | `/v1/functions/{name}/versions` | list versions |
//! | `POST` | `/v1/functions/{name}/versions` | deploy: `application/wasm` body or JSON manifest |
//! | `GET` | `/v1/functions/{name}/versions/{v}` | show one version |
//! | `DELETE` | `/v1/functions/{name}/cache` | drop the function's cached responses and inference results |
//! | `GET` | `/v1/usage` | usage totals (grouped) or records as CSV |

mod blobs;
mod error;
pub mod functions;
pub mod usage;

use std::sync::Arc;

use http::{Method, Request, Response};
use hyper::body::Incoming;

pub use error::ApiError;
pub use functions::CreateVersion;

use crate::app::App;
use crate::server::Body;

/// Dispatches a `/v1/...` request.
pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').skip(2).collect();
    let method = req.method().clone();
    match (segments.as_slice(), &method) {
        (["blobs", digest], &Method::PUT) => blobs::put(app, digest, req).await,
        (["blobs", digest], &Method::HEAD) => blobs::head(app, digest),
        (["blobs", _], _) => Err(not_allowed(&method)),
        (["functions"], &Method::GET) => functions::list(app),
        (["functions"], _) => Err(not_allowed(&method)),
        (["functions", name], &Method::GET) => functions::show(app, name, &req),
        (["functions", name], &Method::DELETE) => functions::delete(app, name),
        (["functions", _], _) => Err(not_allowed(&method)),
        (["functions", name, "versions"], &Method::GET) => functions::versions(app, name),
        (["functions", name, "versions"], &Method::POST) => {
            let name = name.to_string();
            functions::create_version(app, &name, req).await
        }
        (["functions", _, "versions"], _) => Err(not_allowed(&method)),
        (["functions", name, "versions", v], &Method::GET) => functions::version(app, name, v),
        (["functions", _, "versions", _], _) => Err(not_allowed(&method)),
        (["functions", name, "cache"], &Method::DELETE) => functions::clear_cache(app, name),
        (["functions", _, "cache"], _) => Err(not_allowed(&method)),
        (["usage"], &Method::GET) => usage::get(app, req.uri().query().unwrap_or("")).await,
        (["usage"], _) => Err(not_allowed(&method)),
        _ => Err(ApiError::NoRoute(format!("{method} {path}"))),
    }
}

/// Decodes a query parameter value: `%XX` escapes and `+` (times carry `+01:00` offsets
/// and `:`; header lists carry `,`).
pub(crate) fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad %-escape in {s:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8"))
}

fn not_allowed(method: &Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}
