//! The sentence-embedding example (`examples/embed`: all-MiniLM-L6-v2, WordPiece in the
//! guest, the transformer through wasi:nn) against sentence-transformers' own vectors
//! (`testdata/reference.json`, made with PyTorch), on both backends, alone and batched:
//! what a request gets never depends on who it shared a run with.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use kiln_tests::{TestServer, Value, json, onnxruntime_library, root};

/// The exported model (`examples/embed/model/fetch.sh`), or `None` to skip.
fn model() -> Option<PathBuf> {
    let path = root().join("examples/embed/model/minilm.onnx");
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but examples/embed/model/minilm.onnx is missing: run examples/embed/model/fetch.sh"
    );
    kiln_tests::skip("embed", "examples/embed/model/minilm.onnx not fetched");
    None
}

fn reference() -> Vec<Value> {
    let text =
        std::fs::read_to_string(root().join("examples/embed/testdata/reference.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["sentences"].as_array().unwrap().clone()
}

fn backends() -> Vec<(&'static str, String)> {
    let mut out = vec![("tract", String::new())];
    if let Some(lib) = onnxruntime_library() {
        out.push((
            "onnxruntime",
            format!(
                "[nn]\nonnxruntime_library = {:?}\n",
                lib.display().to_string()
            ),
        ));
    }
    out
}

fn deploy(server: &TestServer, name: &str, model: &str, backend: &str, batch: Value) {
    let component = server.put_blob(&std::fs::read(kiln_tests::example("embed")).unwrap());
    let a = server.deploy_manifest(
        name,
        &json!({
            "component": component,
            "models": {"minilm": {"digest": model, "backend": backend, "batch": batch}},
            "cache": {"inference": false},
            "limits": {"timeout_ms": 60000},
        }),
    );
    assert_eq!(a.status, 201, "deploy {name}: {}", a.text());
}

fn post(server: &TestServer, path: &str, body: &Value) -> Value {
    let a = server.request(
        "POST",
        path,
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(a.status, 200, "{path}: {}", a.text());
    a.json()
}

/// Largest difference between two vectors.
fn diff(a: &Value, b: &Value) -> f64 {
    let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs())
        .fold(0.0, f64::max)
}

#[test]
fn embeddings_match_sentence_transformers_to_1e4_on_both_backends() {
    let Some(path) = model() else {
        return;
    };
    let reference = reference();
    for (backend, config) in backends() {
        let server = TestServer::start_with_config(&config);
        let digest = server.put_blob(&std::fs::read(&path).unwrap());
        deploy(&server, "embed", &digest, backend, json!("off"));
        for r in &reference {
            let got = post(&server, "/fn/embed/", &json!({"text": r["text"]}));
            let d = diff(&got["embedding"], &r["embedding"]);
            assert!(d < 1e-4, "{backend}: {:?} differs by {d}", r["text"]);
        }
        // All of them in one request: padded to the longest, masked, the same vectors.
        let texts: Vec<&Value> = reference.iter().map(|r| &r["text"]).collect();
        let got = post(&server, "/fn/embed/", &json!({"texts": texts}));
        for (e, r) in got["embeddings"].as_array().unwrap().iter().zip(&reference) {
            let d = diff(e, &r["embedding"]);
            assert!(
                d < 1e-4,
                "{backend}: {:?} in a batch differs by {d}",
                r["text"]
            );
        }
        // Plain text, a sentence a line.
        let a = server.request(
            "POST",
            "/fn/embed/",
            &[("content-type", "text/plain")],
            b"This is an example sentence\n\nEach sentence is converted\n",
        );
        assert_eq!(a.status, 200, "{}", a.text());
        let lines = a.json()["embeddings"].as_array().unwrap().clone();
        assert_eq!(lines.len(), 2);
        assert!(diff(&lines[1], &reference[1]["embedding"]) < 1e-4);
        // Similarity: the paraphrase first.
        let s = post(
            &server,
            "/fn/embed/similarity",
            &json!({"source": "A man is eating food.", "sentences": [
                "A monkey is playing drums.", "A man is eating a piece of bread.",
                "The girl is carrying a baby."]}),
        );
        let scores: Vec<f64> = s["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(
            scores[1] > 0.7 && scores[1] > scores[0] && scores[1] > scores[2],
            "{s}"
        );
        let bad = server.request(
            "POST",
            "/fn/embed/",
            &[("content-type", "application/json")],
            b"{}",
        );
        assert_eq!(bad.status, 400, "{}", bad.text());
    }
}

#[test]
fn batched_embeddings_equal_unbatched_ones_under_32_concurrent_clients() {
    let Some(path) = model() else {
        return;
    };
    let reference = reference();
    // Short sentences (they pad alike, so they can share runs), each sent many times.
    let texts: Vec<Value> = reference
        .iter()
        .filter(|r| r["ids"].as_array().unwrap().len() <= 16)
        .map(|r| r["text"].clone())
        .collect();
    let bodies: Vec<Value> = (0..96)
        .map(|i| json!({"text": texts[i % texts.len()]}))
        .collect();
    for (backend, config) in backends() {
        let server = TestServer::start_with_config(&config);
        let digest = server.put_blob(&std::fs::read(&path).unwrap());
        deploy(
            &server,
            "merged",
            &digest,
            backend,
            json!({"max_rows": 16, "max_wait_us": 20000}),
        );
        let answers: Vec<(Value, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..32)
                .map(|c| {
                    let (server, bodies) = (&server, &bodies);
                    s.spawn(move || {
                        (c..bodies.len())
                            .step_by(32)
                            .map(|i| {
                                let a = server.request(
                                    "POST",
                                    "/fn/merged/",
                                    &[("content-type", "application/json")],
                                    bodies[i].to_string().as_bytes(),
                                );
                                assert_eq!(a.status, 200, "{}", a.text());
                                let timing =
                                    a.header("server-timing").unwrap_or_default().to_string();
                                (i, a.json(), timing)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let mut all: Vec<_> = handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect();
            all.sort_by_key(|(i, _, _)| *i);
            all.into_iter().map(|(_, v, t)| (v, t)).collect()
        });
        let mut shared = 0;
        for (i, (got, timing)) in answers.iter().enumerate() {
            let text = &bodies[i]["text"];
            let r = reference.iter().find(|r| &r["text"] == text).unwrap();
            let d = diff(&got["embedding"], &r["embedding"]);
            assert!(d < 1e-4, "{backend} #{i}: {text} differs by {d} ({timing})");
            let rows: u32 = timing
                .split("batch=")
                .nth(1)
                .and_then(|t| t.trim_end_matches('"').split('"').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            shared += usize::from(rows > 1);
        }
        assert!(shared > 0, "{backend}: no request shared a run");
    }
}
