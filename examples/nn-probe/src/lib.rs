//! Measures `wasi:nn` from inside a guest, for the benchmarks: runs a model of its version on
//! an all-zero f32 input `iters` times and reports the mean wall time of one run as the guest
//! sees it (tensor in, compute, every output read back), to compare with the same run called
//! natively. `GET /?model=digits&input=input&dims=1,64&iters=200` ->
//! `{"runs": 200, "mean_us": 9.1}`.

use std::time::Instant;

use kiln_guest::nn::{Model, Tensor};
use kiln_guest::{Request, Response, StatusCode, json};

fn param<'a>(req: &'a Request, key: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn probe(req: Request) -> Response {
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
