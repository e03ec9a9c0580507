//! `batch = "auto"`: each model is timed at a few batch sizes when it loads, and batching
//! turns on only where it pays: on for a model whose cost is mostly fixed per run, off for
//! one whose rows dominate, with the fitted numbers and the reason in the version info.
//! Alone in its test binary: the timings must not share the machine with other tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kiln_tests::{TestServer, Value, json, onnx, onnxruntime_library};

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

fn deploy(server: &TestServer, name: &str, model: &[u8], backend: &str) {
    let component = server.put_blob(&std::fs::read(kiln_tests::example("nn_probe")).unwrap());
    let digest = server.put_blob(model);
    let a = server.deploy_manifest(
        name,
        &json!({"component": component,
                "models": {"model": {"digest": digest, "backend": backend, "batch": "auto"}}}),
    );
    assert_eq!(a.status, 201, "deploy {name}: {}", a.text());
}

fn batching_of(server: &TestServer, name: &str) -> Value {
    let v = server
        .get(&format!("/v1/functions/{name}/versions/1"))
        .json();
    v["models"][0]["batching"].clone()
}

#[test]
fn auto_batches_a_model_with_a_large_fixed_cost_and_not_one_whose_rows_dominate() {
    for (backend, config) in backends() {
        let server = TestServer::start_with_config(&config);
        deploy(&server, "fixed", &onnx::matmul(1024, 2048), backend);
        deploy(&server, "rows", &onnx::per_row(262_144), backend);
        let decided = |name: &str| {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let info = batching_of(&server, name);
                let reason = info["reason"].as_str().unwrap_or_default().to_string();
                if !reason.contains("calibrat") || Instant::now() > deadline {
                    return info;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        let fixed = decided("fixed");
        assert_eq!(fixed["mode"], "auto", "{backend}: {fixed}");
        assert_eq!(fixed["on"], true, "{backend}: {fixed}");
        assert!(
            fixed["max_rows"].as_u64().unwrap() >= 2,
            "{backend}: {fixed}"
        );
        let rows = decided("rows");
        // The fitted fixed share of a one-row run: far larger for the model whose cost is
        // fixed per run than for the one whose rows dominate. Compared between the two
        // rather than to a bound: under load (the CI's PostgreSQL pass once) the matmul's
        // fixed part alone can fit below its per-row part.
        let share = |fit: &Value| {
            let (f, r) = (
                fit["fixed_us"].as_f64().unwrap(),
                fit["per_row_us"].as_f64().unwrap(),
            );
            f / (f + r).max(f64::MIN_POSITIVE)
        };
        assert!(
            share(&fixed) > share(&rows) + 0.2,
            "{backend}: {fixed} vs {rows}"
        );
        assert_eq!(rows["on"], false, "{backend}: {rows}");
        assert!(
            rows["reason"]
                .as_str()
                .unwrap()
                .starts_with("no gain: per-row cost dominates"),
            "{backend}: {rows}"
        );
        assert!(
            rows["per_row_us"].as_f64().unwrap() > 0.0,
            "{backend}: {rows}"
        );
        // A model with a free width waits for a real input before it is timed: zeros of a
        // guessed width (16) would make this one look batch-friendly, since at that width
        // its fixed cost dominates; at the width requests send, its rows dominate.
        deploy(&server, "wide", &onnx::per_row_any_width(), backend);
        std::thread::sleep(Duration::from_millis(300));
        let waiting = batching_of(&server, "wide");
        assert_eq!(
            waiting["reason"], "not calibrated yet (on the first compute)",
            "{backend}: {waiting}"
        );
        let r = server.get("/fn/wide/?model=model&input=x&dims=1,262144&iters=1");
        assert_eq!(r.status, 200, "{backend}: {}", r.text());
        let wide = decided("wide");
        assert_eq!(wide["on"], false, "{backend}: {wide}");
        assert!(
            wide["reason"]
                .as_str()
                .unwrap()
                .starts_with("no gain: per-row cost dominates"),
            "{backend}: {wide}"
        );
        // Explicit limits on a model that cannot batch are refused at deploy.
        let fixed_batch = onnx::model(
            &[onnx::Value {
                name: "x",
                elem: onnx::Elem::F32,
                dims: vec![onnx::Dim::Fixed(1), onnx::Dim::Fixed(4)],
            }],
            &[],
            &[onnx::Node {
                op: "Exp",
                inputs: vec!["x"],
                outputs: vec!["y"],
            }],
            &[onnx::Value {
                name: "y",
                elem: onnx::Elem::F32,
                dims: vec![onnx::Dim::Fixed(1), onnx::Dim::Fixed(4)],
            }],
        );
        let component = server.put_blob(&std::fs::read(kiln_tests::example("nn_probe")).unwrap());
        let digest = server.put_blob(&fixed_batch);
        let a = server.deploy_manifest(
            "nobatch",
            &json!({"component": component, "models": {"model": {
                "digest": digest, "backend": backend, "batch": {"max_rows": 8}}}}),
        );
        assert_eq!(a.status, 400, "{backend}: {}", a.text());
        assert!(
            a.text().contains("no free leading (batch) dimension"),
            "{backend}: {}",
            a.text()
        );
    }
}
