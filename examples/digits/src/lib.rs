//! Handwritten digit classifier: POST `{"pixels": [64 values, 0-16]}` (an 8x8 image, row by
//! row) and get `{"digit": 3, "probabilities": [...10 values]}`; or POST
//! `{"batch": [[64 values], ...]}` and get `{"digits": [...], "probabilities": [[...], ...]}`.
//! The model (`model/digits.onnx`) runs in the host through wasi:nn.

use kiln_guest::nn::{ErrorCode, Model, Tensor};
use kiln_guest::{Request, Response, StatusCode, json};
use serde::Deserialize;

const PIXELS: usize = 64;
const CLASSES: usize = 10;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    pixels: Option<Vec<f32>>,
    batch: Option<Vec<Vec<f32>>>,
}

fn error(status: StatusCode, message: &str) -> Response {
    json(
        status,
        serde_json::json!({"error": {"message": message}}).to_string(),
    )
}

fn classify(req: Request) -> Response {
    let input: Input = match serde_json::from_slice(req.body()) {
        Ok(i) => i,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
    };
    let (rows, single) = match (input.pixels, input.batch) {
        (Some(p), None) => (vec![p], true),
        (None, Some(b)) if !b.is_empty() => (b, false),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "send {\"pixels\": [64 numbers]} or {\"batch\": [[64 numbers], ...]}",
            );
        }
    };
    if let Some(bad) = rows.iter().position(|r| r.len() != PIXELS) {
        return error(
            StatusCode::BAD_REQUEST,
            &format!(
                "image {bad} has {} pixels; expected {PIXELS} (8x8)",
                rows[bad].len()
            ),
        );
    }
    let flat: Vec<f32> = rows.concat();
    let run = || {
        let model = Model::load("digits")?;
        let out = model.run(&[(
            "input",
            Tensor::f32(&[rows.len() as u32, PIXELS as u32], &flat),
        )])?;
        Ok::<_, kiln_guest::nn::Error>((
            out.get("label")?.i64s()?,
            out.get("probabilities")?.f32s()?,
        ))
    };
    let (labels, probs) = match run() {
        Ok(r) => r,
        Err(e) if e.code == ErrorCode::InvalidArgument => {
            return error(StatusCode::BAD_REQUEST, &e.to_string());
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let probs: Vec<&[f32]> = probs.chunks(CLASSES).collect();
    let body = if single {
        serde_json::json!({"digit": labels[0], "probabilities": probs[0]})
    } else {
        serde_json::json!({"digits": labels, "probabilities": probs})
    };
    json(StatusCode::OK, body.to_string())
}

kiln_guest::export!(classify);
