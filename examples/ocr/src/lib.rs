//! Reads the text in an image of one line of text: POST a PNG, get
//! `{"text": "Hello, World 2026", "confidence": 0.98}`.
//!
//! The image is scaled to the recognizer's 48-pixel height (bilinear), normalized to [-1, 1]
//! in BGR order as PaddleOCR trained it, and run through PP-OCRv4's recognition model in the
//! host (wasi:nn); the per-column character probabilities are decoded greedily (CTC: collapse
//! repeats, drop blanks).

use kiln_guest::nn::{ErrorCode, Model, Tensor};
use kiln_guest::{Request, Response, StatusCode, json};

/// The recognizer's characters (index 0 is the CTC blank, the last is a space).
const KEYS: &str = include_str!("../model/keys.txt");
const HEIGHT: usize = 48;
/// Widest input after scaling, in pixels (longer lines are squeezed to fit).
const MAX_WIDTH: usize = 1600;
/// Largest image accepted, in pixels.
const MAX_PIXELS: usize = 16 << 20;

fn error(status: StatusCode, message: &str) -> Response {
    json(
        status,
        serde_json::json!({"error": {"message": message}}).to_string(),
    )
}

/// Decodes a PNG into 8-bit RGB.
fn decode(bytes: &[u8]) -> Result<(usize, usize, Vec<u8>), String> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| format!("not a PNG: {e}"))?;
    let (w, h) = (reader.info().width as usize, reader.info().height as usize);
    if w == 0 || h == 0 || w.saturating_mul(h) > MAX_PIXELS {
        return Err(format!("image is {w}x{h}; at most {MAX_PIXELS} pixels"));
    }
    let mut buf = vec![0; reader.output_buffer_size().ok_or("image too large")?];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("bad PNG data: {e}"))?;
    let data = &buf[..frame.buffer_size()];
    let rgb = match frame.color_type {
        png::ColorType::Rgb => data.to_vec(),
        png::ColorType::Rgba => data
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        png::ColorType::Grayscale => data.iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => data
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        png::ColorType::Indexed => return Err("indexed PNG was not expanded".into()),
    };
    Ok((w, h, rgb))
}

/// Bilinear resize to `HEIGHT` rows, then NCHW in BGR order, scaled to [-1, 1].
fn preprocess(w: usize, h: usize, rgb: &[u8]) -> (usize, Vec<f32>) {
    let out_w = ((HEIGHT * w).div_ceil(h)).clamp(1, MAX_WIDTH);
    let mut chw = vec![0f32; 3 * HEIGHT * out_w];
    let sx = w as f32 / out_w as f32;
    let sy = h as f32 / HEIGHT as f32;
    for y in 0..HEIGHT {
        let fy = ((y as f32 + 0.5) * sy - 0.5).max(0.0);
        let y0 = (fy as usize).min(h - 1);
        let y1 = (y0 + 1).min(h - 1);
        let dy = fy - y0 as f32;
        for x in 0..out_w {
            let fx = ((x as f32 + 0.5) * sx - 0.5).max(0.0);
            let x0 = (fx as usize).min(w - 1);
            let x1 = (x0 + 1).min(w - 1);
            let dx = fx - x0 as f32;
            for c in 0..3 {
                let px = |xx: usize, yy: usize| f32::from(rgb[(yy * w + xx) * 3 + c]);
                let top = px(x0, y0) * (1.0 - dx) + px(x1, y0) * dx;
                let bottom = px(x0, y1) * (1.0 - dx) + px(x1, y1) * dx;
                let v = top * (1.0 - dy) + bottom * dy;
                // BGR: channel 2 - c.
                chw[(2 - c) * HEIGHT * out_w + y * out_w + x] = (v / 255.0 - 0.5) / 0.5;
            }
        }
    }
    (out_w, chw)
}

/// Greedy CTC decoding of `[steps, classes]` probabilities.
fn decode_ctc(probs: &[f32], classes: usize) -> (String, f32) {
    let keys: Vec<&str> = KEYS.split('\n').collect();
    let mut text = String::new();
    let mut confidence = Vec::new();
    let mut previous = 0;
    for step in probs.chunks_exact(classes) {
        let (best, p) =
            step.iter().enumerate().fold(
                (0, f32::MIN),
                |acc, (i, &p)| if p > acc.1 { (i, p) } else { acc },
            );
        if best != 0 && best != previous {
            text.push_str(keys.get(best - 1).copied().unwrap_or(" "));
            confidence.push(p);
        }
        previous = best;
    }
    let mean = if confidence.is_empty() {
        0.0
    } else {
        confidence.iter().sum::<f32>() / confidence.len() as f32
    };
    (text.trim().to_string(), mean)
}

fn read_text(req: Request) -> Response {
    let (w, h, rgb) = match decode(req.body()) {
        Ok(img) => img,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let (out_w, chw) = preprocess(w, h, &rgb);
    let run = || {
        let model = Model::load("rec")?;
        let out = model.run(&[("x", Tensor::f32(&[1, 3, HEIGHT as u32, out_w as u32], &chw))])?;
        let probs =
            out.iter()
                .next()
                .map(|(_, t)| t.clone())
                .ok_or_else(|| kiln_guest::nn::Error {
                    code: ErrorCode::RuntimeError,
                    message: "the model returned no output".into(),
                })?;
        let classes = *probs.dims.last().unwrap_or(&1) as usize;
        Ok::<_, kiln_guest::nn::Error>((probs.f32s()?, classes))
    };
    match run() {
        Ok((probs, classes)) => {
            let (text, confidence) = decode_ctc(&probs, classes.max(1));
            json(
                StatusCode::OK,
                serde_json::json!({"text": text, "confidence": confidence}).to_string(),
            )
        }
        Err(e) if e.code == ErrorCode::InvalidArgument => {
            error(StatusCode::BAD_REQUEST, &e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

kiln_guest::export!(read_text);
