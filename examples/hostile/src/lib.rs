//! A deliberately misbehaving function: each path breaks one rule, so the tests can show
//! that Kiln contains it while every other function keeps answering.
//!
//! | path | what it does | what Kiln answers |
//! |---|---|---|
//! | `/loop` | spins forever | 504 after `timeout_ms` |
//! | `/hog` | allocates until memory runs out | 500, memory capped at `memory_mb` |
//! | `/recurse` | recurses without end | 500 (stack overflow), no process abort |
//! | `/panic` | panics | 500 |
//! | `/counter` | increments a global | always `1`: a fresh instance per request |
//! | `/sandbox` | looks at env, files, outbound HTTP | nothing is granted |
//! | `/sleep?ms=N` | waits N ms (host clock), then answers | 200 |
//! | `/nn/load?name=M` | loads model `M` by name | `ok`, or the wasi-nn error (`NotFound`...) |
//! | `/nn/bytes?size=N` | passes N bytes of its own (garbage) model to `graph.load` | the wasi-nn error |
//! | `/nn/malformed?case=C` | runs model `digits` on a bad tensor (`shape`, `type`, `bytes`, `name`) | the wasi-nn error |
//! | `/handles` | makes resource handles and never drops them | 500 (the host's handle table is capped) |
//! | `/random?size=N` | asks the host for N random bytes at once | 500 beyond 1 MiB, never allocated |
//! | `/headers?count=N&size=S` | appends N header values of S bytes | `accepted K of N`: the host caps header bytes |
//! | `/forbidden` | sets hop-by-hop and `host` headers | each one refused |
//! | `/outbound?url=U` | calls `U` with `wasi:http` | the status, or the error (denied unless allowed) |
//! | `/request-headers` | lists the names of the headers it received | what the host passed on |
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_guest::__private::wasip2::http::types;
use kiln_guest::nn::{Model, Tensor};
use kiln_guest::{Request, StatusCode, text};

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn hostile(req: Request) -> kiln_guest::Response {
    match req.uri().path() {
        "/loop" => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "/hog" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "/recurse" => text(
            StatusCode::OK,
            format!("{}\n", recurse(std::hint::black_box(1))),
        ),
        "/panic" => panic!("the guest panicked on purpose"),
        "/counter" => {
            let n = COUNTER.fetch_add(1, Ordering::SeqCst) + 1;
            text(StatusCode::OK, format!("{n}\n"))
        }
        "/sandbox" => text(StatusCode::OK, sandbox()),
        "/sleep" => {
            let ms: u64 = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            text(StatusCode::OK, "slept\n")
        }
        "/nn/load" => nn_answer(Model::load(query(&req, "name")).map(|_| ())),
        "/nn/bytes" => {
            let size = query(&req, "size").parse().unwrap_or(64);
            nn_answer(Model::from_onnx(&vec![0u8; size]).map(|_| ()))
        }
        "/nn/malformed" => nn_answer(malformed(query(&req, "case"))),
        "/handles" => {
            let mut leaked = 0u64;
            loop {
                std::mem::forget(types::Fields::new());
                leaked += 1;
                if leaked == u64::MAX {
                    break text(StatusCode::OK, "the host never said no\n");
                }
            }
        }
        "/random" => {
            let size = query(&req, "size").parse().unwrap_or(1u64 << 30);
            let bytes = kiln_guest::__private::wasip2::random::random::get_random_bytes(size);
            text(StatusCode::OK, format!("got {} bytes\n", bytes.len()))
        }
        "/headers" => {
            let count: usize = query(&req, "count").parse().unwrap_or(100_000);
            let size: usize = query(&req, "size").parse().unwrap_or(16);
            let fields = types::Fields::new();
            let value = vec![b'a'; size];
            let mut accepted = 0;
            let mut first_error = None;
            for i in 0..count {
                match fields.append(&format!("x-bomb-{i}"), &value) {
                    Ok(()) => accepted += 1,
                    Err(e) => {
                        first_error.get_or_insert(format!("{e:?}"));
                    }
                }
            }
            text(
                StatusCode::OK,
                format!("accepted {accepted} of {count}; first error {first_error:?}\n"),
            )
        }
        "/forbidden" => {
            let fields = types::Fields::new();
            let answers: Vec<String> = ["connection", "transfer-encoding", "upgrade", "host"]
                .iter()
                .map(|name| format!("{name}={:?}", fields.append(name, b"x")))
                .collect();
            text(StatusCode::OK, answers.join(" ") + "\n")
        }
        "/outbound" => text(StatusCode::OK, outbound(query(&req, "url")) + "\n"),
        "/request-headers" => {
            let mut names: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
            names.sort_unstable();
            text(StatusCode::OK, names.join(",") + "\n")
        }
        _ => text(StatusCode::NOT_FOUND, "unknown path\n"),
    }
}

fn query<'a>(req: &'a Request, key: &str) -> &'a str {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or("")
}

fn nn_answer(r: Result<(), kiln_guest::nn::Error>) -> kiln_guest::Response {
    match r {
        Ok(()) => text(StatusCode::OK, "ok\n"),
        Err(e) => text(StatusCode::OK, format!("{e}\n")),
    }
}

/// Feeds the digits model (input `input`: f32 [N, 64]) a tensor that breaks one rule.
fn malformed(case: &str) -> Result<(), kiln_guest::nn::Error> {
    let model = Model::load("digits")?;
    let good = vec![0.0f32; 64];
    let input = match case {
        "shape" => ("input", Tensor::f32(&[1, 63], &good[..63])),
        "type" => ("input", Tensor::i64(&[1, 64], &[0i64; 64])),
        "bytes" => {
            let mut t = Tensor::f32(&[2, 64], &good);
            t.data.truncate(100);
            ("input", t)
        }
        "name" => ("pixels", Tensor::f32(&[1, 64], &good)),
        _ => ("input", Tensor::f32(&[1, 64], &good)),
    };
    model.run(&[input]).map(|_| ())
}

fn recurse(n: u64) -> u64 {
    if std::hint::black_box(n) == 0 {
        0
    } else {
        recurse(n.wrapping_add(1)).wrapping_add(n)
    }
}

fn sandbox() -> String {
    let env = std::env::vars().count();
    let fs = std::fs::read_dir("/").is_ok();
    let outbound = outbound("http://example.com/");
    format!("env={env} fs={fs} outbound={outbound}\n")
}

/// GETs `url` (`http://` or `https://`) through `wasi:http`; the status, or the error.
fn outbound(url: &str) -> String {
    use kiln_guest::__private::wasip2::http::outgoing_handler;
    let (scheme, rest) = match url.split_once("://") {
        Some(("https", rest)) => (types::Scheme::Https, rest),
        Some((_, rest)) => (types::Scheme::Http, rest),
        None => (types::Scheme::Http, url),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let req = types::OutgoingRequest::new(types::Fields::new());
    let _ = req.set_scheme(Some(&scheme));
    let _ = req.set_authority(Some(authority));
    let _ = req.set_path_with_query(Some(if path.is_empty() { "/" } else { path }));
    match outgoing_handler::handle(req, None) {
        Err(e) => format!("{e:?}"),
        Ok(fut) => {
            fut.subscribe().block();
            match fut.get() {
                Some(Ok(Err(e))) => format!("{e:?}"),
                Some(Ok(Ok(resp))) => format!("status {}", resp.status()),
                _ => "unknown".to_string(),
            }
        }
    }
}

kiln_guest::export!(hostile);
