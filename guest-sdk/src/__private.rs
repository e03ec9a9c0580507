//! Glue between `wasi:http` resources and `http` types; used by [`export!`](crate::export).

pub use wasip2;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasip2::io::streams::StreamError;

use crate::{IntoResponse, Request, Response, StatusCode, text};

/// Reads the request, runs the handler, writes the response.
pub fn serve<R: IntoResponse>(
    request: IncomingRequest,
    out: ResponseOutparam,
    handler: fn(Request) -> R,
) {
    let response = match read_request(request) {
        Ok(req) => handler(req).into_response(),
        Err(resp) => resp,
    };
    write_response(out, response);
}

fn read_request(incoming: IncomingRequest) -> Result<Request, Response> {
    let method = match incoming.method() {
        Method::Get => http::Method::GET,
        Method::Head => http::Method::HEAD,
        Method::Post => http::Method::POST,
        Method::Put => http::Method::PUT,
        Method::Delete => http::Method::DELETE,
        Method::Connect => http::Method::CONNECT,
        Method::Options => http::Method::OPTIONS,
        Method::Trace => http::Method::TRACE,
        Method::Patch => http::Method::PATCH,
        Method::Other(m) => http::Method::from_bytes(m.as_bytes())
            .map_err(|_| text(StatusCode::BAD_REQUEST, "invalid method\n"))?,
    };
    let uri = incoming.path_with_query().unwrap_or_else(|| "/".into());
    let mut builder = http::Request::builder().method(method).uri(uri);
    for (name, value) in incoming.headers().entries() {
        builder = builder.header(name, value);
    }
    let body = read_body(&incoming)?;
    builder
        .body(body)
        .map_err(|e| text(StatusCode::BAD_REQUEST, format!("invalid request: {e}\n")))
}

fn read_body(incoming: &IncomingRequest) -> Result<Vec<u8>, Response> {
    let fail = |msg: String| text(StatusCode::BAD_REQUEST, msg);
    let body = incoming
        .consume()
        .map_err(|()| fail("request body already consumed\n".into()))?;
    let stream = body
        .stream()
        .map_err(|()| fail("request body stream unavailable\n".into()))?;
    let mut buf = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => buf.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                let status = match wasip2::http::types::http_error_code(&e) {
                    Some(ErrorCode::HttpRequestBodySize(_)) => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => StatusCode::BAD_REQUEST,
                };
                return Err(text(
                    status,
                    format!(
                        "reading the request body failed: {}\n",
                        e.to_debug_string().lines().next().unwrap_or_default()
                    ),
                ));
            }
        }
    }
    drop(stream);
    Ok(buf)
}

/// Most a `blocking-write-and-flush` call may carry (`wasi:io/streams`).
const WRITE_CHUNK: usize = 4096;

fn write_response(out: ResponseOutparam, response: Response) {
    let (parts, body) = response.into_parts();
    // One host call for all the headers; if the host refuses one (a hop-by-hop header),
    // they go one by one and the refused ones are dropped rather than failing the call.
    let entries: Vec<(String, Vec<u8>)> = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
        .collect();
    let headers = Fields::from_list(&entries).unwrap_or_else(|_| {
        let headers = Fields::new();
        for (name, value) in &entries {
            let _ = headers.append(name, value);
        }
        headers
    });
    let resp = OutgoingResponse::new(headers);
    let _ = resp.set_status_code(parts.status.as_u16());
    let Ok(outgoing) = resp.body() else {
        ResponseOutparam::set(
            out,
            Err(ErrorCode::InternalError(Some("no response body".into()))),
        );
        return;
    };
    ResponseOutparam::set(out, Ok(resp));
    // The body is whole already: each chunk goes in one call that also waits for room,
    // instead of asking for room, writing and flushing in turn.
    if let Ok(stream) = outgoing.write() {
        for chunk in body.chunks(WRITE_CHUNK) {
            if stream.blocking_write_and_flush(chunk).is_err() {
                break;
            }
        }
    }
    let _ = OutgoingBody::finish(outgoing, None);
}
