//! Measures `wasi:nn` from inside a guest, for the benchmarks: runs a model of its version on
//! an all-zero f32 input `iters` times and reports the mean wall time of one run as the guest
//! sees it (tensor in, compute, every output read back), to compare with the same run called
//! natively. `GET /?model=digits&input=input&dims=1,64&iters=200` ->
//! `{"runs": 200, "mean_us": 9.1}`.
//!
//! `POST /run` runs one compute described in JSON, for tests of any model:
//! `{"model": "m", "inputs": {"x": {"type": "f32", "dims": [2, 3], "values": [...]}}}` ->
//! `{"outputs": {"y": {"type": "f32", "dims": [...], "values": [...]}}}`, or a 400/500 with
//! the `wasi:nn` error code and message.

use std::time::Instant;

use kiln_guest::nn::{Model, Tensor};
use kiln_guest::{Request, Response, StatusCode, json};

fn param<'a>(req: &'a Request, key: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// `POST /run`: one compute from JSON.
fn run_json(req: &Request) -> Response {
    let fail = |status: StatusCode, code: &str, message: String| {
        let body = serde_json::json!({"error": {"code": code, "message": message}});
        json(status, body.to_string())
    };
    let spec: serde_json::Value = match serde_json::from_slice(req.body()) {
        Ok(v) => v,
        Err(e) => return fail(StatusCode::BAD_REQUEST, "json", e.to_string()),
    };
    let model = spec["model"].as_str().unwrap_or("model");
    let mut inputs = Vec::new();
    for (name, t) in spec["inputs"].as_object().into_iter().flatten() {
        let dims: Vec<u32> = t["dims"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_u64().map(|d| d as u32))
            .collect();
        let values = t["values"].as_array().cloned().unwrap_or_default();
        let tensor = match t["type"].as_str() {
            Some("i64") => Tensor::i64(
                &dims,
                &values.iter().filter_map(|v| v.as_i64()).collect::<Vec<_>>(),
            ),
            _ => Tensor::f32(
                &dims,
                &values
                    .iter()
                    .filter_map(|v| v.as_f64().map(|v| v as f32))
                    .collect::<Vec<_>>(),
            ),
        };
        inputs.push((name.as_str(), tensor));
    }
    let out = Model::load(model).and_then(|m| m.run(&inputs));
    match out {
        Ok(out) => {
            let mut outputs = serde_json::Map::new();
            for (name, t) in out.iter() {
                let (ty, values) = match (t.f32s(), t.i64s()) {
                    (Ok(v), _) => ("f32", serde_json::json!(v)),
                    (_, Ok(v)) => ("i64", serde_json::json!(v)),
                    _ => ("other", serde_json::json!([])),
                };
                outputs.insert(
                    name.to_string(),
                    serde_json::json!({"type": ty, "dims": t.dims, "values": values}),
                );
            }
            json(
                StatusCode::OK,
                serde_json::json!({ "outputs": outputs }).to_string(),
            )
        }
        Err(e) => {
            let status = match e.code {
                kiln_guest::nn::ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            // `runtime-error: ...`: the WIT name of the code comes first.
            let text = e.to_string();
            let code = text.split(':').next().unwrap_or_default().to_string();
            fail(status, &code, text)
        }
    }
}

fn probe(req: Request) -> Response {
    if req.uri().path() == "/run" {
        return run_json(&req);
    }
    let model = param(&req, "model").unwrap_or("model");
    let input = param(&req, "input").unwrap_or("input");
    let dims: Vec<u32> = param(&req, "dims")
        .unwrap_or("1")
        .split(',')
        .filter_map(|d| d.parse().ok())
        .collect();
    let iters: u32 = param(&req, "iters")
        .and_then(|n| n.parse().ok())
        .unwrap_or(100)
        .max(1);
    let values = vec![0f32; dims.iter().product::<u32>() as usize];
    let run = || -> Result<f64, kiln_guest::nn::Error> {
        let model = Model::load(model)?;
        let inputs = [(input, Tensor::f32(&dims, &values))];
        // One warm-up run, then the measured ones.
        model.run(&inputs)?;
        let started = Instant::now();
        let mut bytes = 0;
        for _ in 0..iters {
            let out = model.run(&inputs)?;
            bytes += out.iter().map(|(_, t)| t.data.len()).sum::<usize>();
        }
        std::hint::black_box(bytes);
        Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(iters))
    };
    match run() {
        Ok(mean) => json(
            StatusCode::OK,
            format!("{{\"runs\":{iters},\"mean_us\":{mean:.2}}}"),
        ),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{{\"error\":{:?}}}", e.to_string()),
        ),
    }
}

kiln_guest::export!(probe);
