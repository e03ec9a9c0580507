//! Echoes the request: the body back as the body, and the method, the path (with query)
//! and the `x-test` header as response headers; an `x-echo-prediction` header comes back
//! as the guest's `x-kiln-prediction` (what Kiln records as the request's prediction); an
//! `x-echo-log` header is printed to stdout, and to stderr prefixed with `stderr: ` (what
//! `kiln logs` shows). Its variables: an `x-echo-var: KEY` header comes back as `x-var`
//! (the value the guest read through `wasi:config`), `x-echo-env: NAME` as `x-env` (from
//! its environment), and `x-echo-env-names` as `x-env-names`, every name its environment
//! holds.
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
    let asked = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if let Some(value) = asked("x-echo-var").and_then(|k| kiln_guest::variable(&k)) {
        h.insert("x-var", value.parse().expect("a header value"));
    }
    if let Some(value) = asked("x-echo-env").and_then(|k| std::env::var(k).ok()) {
        h.insert("x-env", value.parse().expect("a header value"));
    }
    if asked("x-echo-env-names").is_some() {
        let names: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
        h.insert("x-env-names", names.join(",").parse().expect("a header value"));
    }
    resp
}

kiln_guest::export!(echo);
