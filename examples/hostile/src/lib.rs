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
use std::sync::atomic::{AtomicU64, Ordering};

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
    use kiln_guest::__private::wasip2::http::{outgoing_handler, types};
    let env = std::env::vars().count();
    let fs = std::fs::read_dir("/").is_ok();
    let req = types::OutgoingRequest::new(types::Fields::new());
    let _ = req.set_scheme(Some(&types::Scheme::Http));
    let _ = req.set_authority(Some("example.com"));
    let _ = req.set_path_with_query(Some("/"));
    let outbound = match outgoing_handler::handle(req, None) {
        Err(e) => format!("{e:?}"),
        Ok(fut) => {
            fut.subscribe().block();
            match fut.get() {
                Some(Ok(Err(e))) => format!("{e:?}"),
                Some(Ok(Ok(_))) => "connected".to_string(),
                _ => "unknown".to_string(),
            }
        }
    };
    format!("env={env} fs={fs} outbound={outbound}\n")
}

kiln_guest::export!(hostile);
