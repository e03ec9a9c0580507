//! The digits classifier with a preprocessing bug: it inverts every image (16 - pixel)
//! before the model sees it. Same request and answer as `examples/digits` (POST
//! `{"pixels": [64 values]}`), so it deploys as a new version of that function; the tests
//! use it as the candidate whose model inputs drift from the stable version's, which a
//! rollout's drift gate must stop.

use kiln_guest::nn::{Model, Tensor};
use kiln_guest::{Request, Response, StatusCode, json};
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    pixels: Vec<f32>,
}

fn classify(req: Request) -> Response {
    let input: Input = match serde_json::from_slice(req.body()) {
        Ok(i) => i,
        Err(e) => {
            let body = serde_json::json!({"error": {"message": format!("invalid JSON: {e}")}});
            return json(StatusCode::BAD_REQUEST, body.to_string());
        }
    };
    let skewed: Vec<f32> = input.pixels.iter().map(|p| 16.0 - p).collect();
    let run = || {
        let model = Model::load("digits")?;
        let out = model.run(&[(
            "input",
            Tensor::f32(&[1, skewed.len() as u32], &skewed),
        )])?;
        out.get("label")?.i64s()
    };
    match run() {
        Ok(labels) => json(
            StatusCode::OK,
            serde_json::json!({"digit": labels[0]}).to_string(),
        ),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"error": {"message": e.to_string()}}).to_string(),
        ),
    }
}

kiln_guest::export!(classify);
