//! Sentence embeddings with all-MiniLM-L6-v2: the WordPiece tokenizer runs here in the guest,
//! the transformer in the host through wasi:nn, and vectors come back L2-normalised, as
//! sentence-transformers gives them.
//!
//! - `POST /` (or `/embed`) with `{"text": "..."}` → `{"embedding": [384 numbers]}`; with
//!   `{"texts": [...]}`, or a plain-text body of one sentence per line, →
//!   `{"embeddings": [[...], ...]}`.
//! - `POST /similarity` with `{"source": "...", "sentences": [...]}` → `{"scores": [...]}`,
//!   the cosine similarity of each sentence to the source.
//!
//! A request's sentences run as one batch, padded to the next of a few fixed lengths (8, 16,
//! ... 256 tokens): requests whose sentences pad alike can then share a run with other
//! requests (`batch = "auto"` in kiln.toml). Padding is masked, so it changes nothing.

mod tokenizer;

use kiln_guest::nn::{ErrorCode, Model, Tensor};
use kiln_guest::{Request, Response, StatusCode, json};
use serde::Deserialize;

/// Tokens a sentence may have, `[CLS]` and `[SEP]` included (the model's training length).
const MAX_TOKENS: usize = 256;
/// Lengths sentences are padded to.
const BUCKETS: [usize; 6] = [8, 16, 32, 64, 128, 256];
/// Most sentences one request may send.
const MAX_SENTENCES: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Texts {
    text: Option<String>,
    texts: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Similarity {
    source: String,
    sentences: Vec<String>,
}

fn error(status: StatusCode, message: &str) -> Response {
    json(
        status,
        serde_json::json!({"error": {"message": message}}).to_string(),
    )
}

/// The normalised embedding of each sentence, in one run.
fn embed(sentences: &[String]) -> Result<Vec<Vec<f32>>, Response> {
    if sentences.is_empty() || sentences.len() > MAX_SENTENCES {
        return Err(error(
            StatusCode::BAD_REQUEST,
            &format!("send 1 to {MAX_SENTENCES} sentences"),
        ));
    }
    let encoded: Vec<Vec<u32>> = sentences
        .iter()
        .map(|s| tokenizer::encode(s, MAX_TOKENS))
        .collect();
    let longest = encoded.iter().map(Vec::len).max().unwrap_or(2);
    let len = BUCKETS.into_iter().find(|b| *b >= longest).unwrap_or(MAX_TOKENS);
    let pad = tokenizer::specials().pad;
    let rows = encoded.len();
    let mut ids = Vec::with_capacity(rows * len);
    let mut mask = Vec::with_capacity(rows * len);
    for e in &encoded {
        ids.extend(e.iter().map(|&i| i64::from(i)));
        ids.extend(std::iter::repeat_n(i64::from(pad), len - e.len()));
        mask.extend(std::iter::repeat_n(1i64, e.len()));
        mask.extend(std::iter::repeat_n(0i64, len - e.len()));
    }
    let dims = [rows as u32, len as u32];
    let run = || {
        let model = Model::load("minilm")?;
        let out = model.run(&[
            ("input_ids", Tensor::i64(&dims, &ids)),
            ("attention_mask", Tensor::i64(&dims, &mask)),
        ])?;
        out.get("embedding")?.f32s()
    };
    let flat = run().map_err(|e| {
        let status = match e.code {
            ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, &e.to_string())
    })?;
    let width = flat.len() / rows.max(1);
    Ok(flat
        .chunks(width.max(1))
        .map(|v| {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter().map(|x| x / norm).collect()
        })
        .collect())
}

fn handle(req: Request) -> Response {
    if req.method() != kiln_guest::http::Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST {\"text\"}, {\"texts\"} or lines of text to /, or {\"source\", \"sentences\"} to /similarity",
        );
    }
    match req.uri().path() {
        "/similarity" => {
            let s: Similarity = match serde_json::from_slice(req.body()) {
                Ok(s) => s,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
            };
            let mut all = vec![s.source];
            all.extend(s.sentences);
            match embed(&all) {
                Ok(v) => {
                    let scores: Vec<f32> = v[1..]
                        .iter()
                        .map(|e| e.iter().zip(&v[0]).map(|(a, b)| a * b).sum())
                        .collect();
                    json(StatusCode::OK, serde_json::json!({"scores": scores}).to_string())
                }
                Err(resp) => resp,
            }
        }
        "/" | "/embed" => {
            let is_json = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            let (texts, single) = if is_json {
                match serde_json::from_slice::<Texts>(req.body()) {
                    Ok(Texts {
                        text: Some(t),
                        texts: None,
                    }) => (vec![t], true),
                    Ok(Texts {
                        text: None,
                        texts: Some(ts),
                    }) => (ts, false),
                    Ok(_) => {
                        return error(StatusCode::BAD_REQUEST, "send {\"text\"} or {\"texts\"}");
                    }
                    Err(e) => {
                        return error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}"));
                    }
                }
            } else {
                let Ok(text) = std::str::from_utf8(req.body()) else {
                    return error(StatusCode::BAD_REQUEST, "the body is not UTF-8 text");
                };
                let lines: Vec<String> = text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_string)
                    .collect();
                (lines, false)
            };
            match embed(&texts) {
                Ok(v) if single => json(
                    StatusCode::OK,
                    serde_json::json!({"embedding": v[0]}).to_string(),
                ),
                Ok(v) => json(
                    StatusCode::OK,
                    serde_json::json!({"embeddings": v}).to_string(),
                ),
                Err(resp) => resp,
            }
        }
        other => error(StatusCode::NOT_FOUND, &format!("no route {other}")),
    }
}

kiln_guest::export!(handle);
