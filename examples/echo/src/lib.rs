//! Echoes the request: the body back as the body, and the method, the path (with query)
//! and the `x-test` header as response headers; an `x-echo-prediction` header comes back
//! as the guest's `x-kiln-prediction` (what Kiln records as the request's prediction); an
//! `x-echo-log` header is printed to stdout, and to stderr prefixed with `stderr: ` (what
//! `kiln logs` shows).
use kiln_guest::{Request, Response};

fn echo(req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if let Some(v) = parts.headers.get("x-echo-log") {
        let text = String::from_utf8_lossy(v.as_bytes());
        println!("{text}");
        eprintln!("stderr: {text}");
    }
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        "x-method",
        parts
            .method
            .as_str()
            .parse()
            .expect("method is a header value"),
    );
    h.insert(
        "x-path",
        parts
            .uri
            .to_string()
            .parse()
            .expect("uri is a header value"),
    );
    if let Some(v) = parts.headers.get("x-test") {
        h.insert("x-test", v.clone());
    }
    if let Some(v) = parts.headers.get("x-echo-prediction") {
        h.insert("x-kiln-prediction", v.clone());
    }
    resp
}

kiln_guest::export!(echo);
