//! Dynamic batching end to end, on both backends: computes from many isolated instances
//! merged into one backend run give each request the outputs it gets alone; a malformed
//! request in a burst fails alone, and so does the culprit of a failed merged run; a lone
//! request runs by itself; a huge input to a quick model never runs on the async workers.
//! (`"auto"`: batching_auto.rs, alone in its binary so nothing else runs while it times
//! models. Deadlines in the queue: the unit tests of `nn::batch`, with a backend that
//! sleeps on cue.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kiln_tests::{TestServer, Value, json, onnx, onnxruntime_library, root, usage_csv};

/// The backends to run each test on: tract always, ONNX Runtime where its library is.
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

/// Deploys `example` under `name` with one model `model` (bytes) on `backend`, batching as
/// `batch` says.
fn deploy(
    server: &TestServer,
    name: &str,
    example: &str,
    model: &[u8],
    backend: &str,
    batch: Value,
    extra: Value,
) -> Value {
    let component = server.put_blob(&std::fs::read(kiln_tests::example(example)).unwrap());
    let digest = server.put_blob(model);
    // No inference cache: every compute runs (the same image twice would be a cache hit).
    let mut manifest = json!({
        "component": component,
        "models": {"model": {"digest": digest, "backend": backend, "batch": batch}},
        "cache": {"inference": false},
    });
    if example == "digits" {
        manifest["models"] = json!({"digits": manifest["models"]["model"].clone()});
    }
    for (k, v) in extra.as_object().into_iter().flatten() {
        manifest[k] = v.clone();
    }
    let a = server.deploy_manifest(name, &manifest);
    assert_eq!(a.status, 201, "deploy {name}: {}", a.text());
    a.json()
}

fn batching_of(server: &TestServer, name: &str) -> Value {
    let v = server
        .get(&format!("/v1/functions/{name}/versions/1"))
        .json();
    v["models"][0]["batching"].clone()
}

/// Sends `bodies` from `clients` threads at once (each thread its share, in turn); returns
/// every answer's status, body and `server-timing`, in the order of `bodies`.
fn burst(
    server: &TestServer,
    path: &str,
    bodies: &[Value],
    clients: usize,
) -> Vec<(u16, Value, String)> {
    let mut out: Vec<Option<(u16, Value, String)>> = vec![None; bodies.len()];
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    let mut got = Vec::new();
                    for i in (c..bodies.len()).step_by(clients) {
                        let a = server.request(
                            "POST",
                            path,
                            &[("content-type", "application/json")],
                            bodies[i].to_string().as_bytes(),
                        );
                        let timing = a.header("server-timing").unwrap_or_default().to_string();
                        let body = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
                        got.push((i, (a.status, body, timing)));
                    }
                    got
                })
            })
            .collect();
        for h in handles {
            for (i, answer) in h.join().unwrap() {
                out[i] = Some(answer);
            }
        }
    });
    out.into_iter().map(Option::unwrap).collect()
}

fn heldout_images() -> Vec<Value> {
    let text = std::fs::read_to_string(root().join("examples/digits/model/heldout.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["inputs"].as_array().unwrap().clone()
}

/// Usage records of `function`, once `n` of them are in.
fn records(server: &TestServer, function: &str, n: usize) -> Vec<kiln_tests::Record> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = usage_csv(server, &format!("&function={function}"));
        if got.len() >= n || Instant::now() > deadline {
            assert_eq!(got.len(), n, "usage records of {function}");
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn close(a: &Value, b: &Value) -> bool {
    let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| match (x.as_array(), y.as_array()) {
                (Some(_), Some(_)) => close(x, y),
                _ => (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-5,
            })
}

#[test]
fn batched_outputs_equal_unbatched_ones_row_for_row_under_32_concurrent_clients() {
    let model = std::fs::read(root().join("examples/digits/model/digits.onnx")).unwrap();
    let images = heldout_images();
    // Single images and requests carrying three rows of their own, mixed.
    let bodies: Vec<Value> = (0..192)
        .map(|i| match i % 4 {
            3 => json!({"batch": [images[i % 60], images[(i + 1) % 60], images[(i + 2) % 60]]}),
            _ => json!({"pixels": images[i % 60]}),
        })
        .collect();
    for (backend, config) in backends() {
        let server = TestServer::start_with_config(&config);
        deploy(
            &server,
            "alone",
            "digits",
            &model,
            backend,
            json!("off"),
            json!({}),
        );
        let spec = json!({"max_rows": 32, "max_wait_us": 20_000});
        deploy(
            &server,
            "merged",
            "digits",
            &model,
            backend,
            spec.clone(),
            json!({}),
        );
        let info = batching_of(&server, "merged");
        assert_eq!(info["mode"], "fixed", "{info}");
        assert_eq!(info["on"], true, "{info}");
        assert_eq!(info["max_rows"], 32, "{info}");

        let alone = burst(&server, "/fn/alone/", &bodies, 32);
        let merged = burst(&server, "/fn/merged/", &bodies, 32);
        for (i, ((s1, a, _), (s2, b, timing))) in alone.iter().zip(&merged).enumerate() {
            assert_eq!((*s1, *s2), (200, 200), "{backend} #{i}: {a} / {b}");
            let (da, db) = (&a["digit"], &b["digit"]);
            assert_eq!(da, db, "{backend} #{i}");
            assert_eq!(a["digits"], b["digits"], "{backend} #{i}");
            assert!(
                close(&a["probabilities"], &b["probabilities"]),
                "{backend} #{i}: {a} vs {b}"
            );
            assert!(
                timing.contains("desc=\"cpu batch="),
                "{backend} #{i}: {timing}"
            );
        }
        // Runs were shared: a record's batch_rows counts every row of its run.
        let merged_records = records(&server, "merged", bodies.len());
        let shared = merged_records
            .iter()
            .filter(|r| r.num("batch_rows") > 3)
            .count();
        assert!(shared > 0, "{backend}: no run merged two requests");
        for r in &merged_records {
            assert!(r.num("batch_rows") >= 1, "{backend}: {r:?}");
            assert!(
                r.num("inference_cpu_us") <= r.num("wall_us"),
                "{backend}: {r:?}"
            );
        }
        let unbatched = records_rows(&records(&server, "alone", bodies.len()));
        assert!(
            unbatched.iter().all(|&n| n == 1 || n == 3),
            "{backend}: {unbatched:?}"
        );
        let metrics = server.get("/metrics").text();
        let count = kiln_tests::metric_sample(
            &metrics,
            &format!("kiln_nn_batch_rows_count{{backend=\"{backend}\",device=\"cpu\"}}"),
        );
        let rows = kiln_tests::metric_sample(
            &metrics,
            &format!("kiln_nn_batch_rows_sum{{backend=\"{backend}\",device=\"cpu\"}}"),
        );
        assert!(
            count > 0.0 && rows / count > 1.0,
            "{backend}: {count} runs, {rows} rows"
        );
    }
}

fn records_rows(records: &[kiln_tests::Record]) -> Vec<u64> {
    records.iter().map(|r| r.num("batch_rows")).collect()
}

#[test]
fn a_lone_request_runs_by_itself_without_waiting() {
    let model = std::fs::read(root().join("examples/digits/model/digits.onnx")).unwrap();
    let image = heldout_images()[0].clone();
    let server = TestServer::start();
    // A long fill wait: were a lone request to wait for company, it would wait 2 s.
    let spec = json!({"max_rows": 32, "max_wait_us": 1_000_000});
    deploy(&server, "lone", "digits", &model, "tract", spec, json!({}));
    for _ in 0..5 {
        let a = server.request(
            "POST",
            "/fn/lone/",
            &[("content-type", "application/json")],
            json!({"pixels": image}).to_string().as_bytes(),
        );
        assert_eq!(a.status, 200, "{}", a.text());
        let timing = a.header("server-timing").unwrap_or_default();
        assert!(timing.contains("batch=1\""), "{timing}");
    }
    let lone = records(&server, "lone", 5);
    assert!(lone.iter().all(|r| r.num("batch_rows") == 1), "{lone:?}");
    let metrics = server.get("/metrics").text();
    let waited = kiln_tests::metric_sample(
        &metrics,
        "kiln_nn_batch_wait_seconds_sum{backend=\"tract\",device=\"cpu\"}",
    );
    assert!(
        waited < 0.001,
        "lone requests waited {waited} s in the queue"
    );
}

#[test]
fn a_bad_request_in_a_burst_and_the_culprit_of_a_failed_run_fail_alone() {
    for (backend, config) in backends() {
        let server = TestServer::start_with_config(&config);
        let spec = json!({"max_rows": 64, "max_wait_us": 20_000});
        deploy(
            &server,
            "gather",
            "nn_probe",
            &onnx::gather(),
            backend,
            spec,
            json!({}),
        );
        let body = |idx: i64, rows: u32| {
            json!({"model": "model", "inputs": {"idx": {
                "type": "i64", "dims": [rows, 1], "values": vec![idx; rows as usize]}}})
        };
        // Every eighth request names row 9 of a 4-row table (the run fails with it in);
        // every eighth from the fourth is malformed (rejected before it joins a batch).
        let bodies: Vec<Value> = (0..96)
            .map(|i| match i % 8 {
                0 => body(9, 1),
                4 => json!({"model": "model", "inputs": {"idx": {
                    "type": "i64", "dims": [2, 2], "values": [0, 1, 2, 3]}}}),
                _ => body((i % 4) as i64, 1 + (i % 3) as u32),
            })
            .collect();
        let answers = burst(&server, "/fn/gather/run", &bodies, 32);
        for (i, (status, body, _)) in answers.iter().enumerate() {
            match i % 8 {
                0 => {
                    assert_eq!(*status, 500, "{backend} #{i}: {body}");
                    assert_eq!(
                        body["error"]["code"], "runtime-error",
                        "{backend} #{i}: {body}"
                    );
                }
                4 => {
                    assert_eq!(*status, 400, "{backend} #{i}: {body}");
                    assert!(
                        body["error"]["message"]
                            .as_str()
                            .unwrap()
                            .contains("dimension 1 must be 1"),
                        "{backend} #{i}: {body}"
                    );
                }
                _ => {
                    assert_eq!(*status, 200, "{backend} #{i}: {body}");
                    let idx = (i % 4) as f64;
                    let rows = 1 + (i % 3);
                    let y = &body["outputs"]["y"];
                    assert_eq!(y["dims"], json!([rows, 1, 2]), "{backend} #{i}: {body}");
                    let values: Vec<f64> = y["values"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap())
                        .collect();
                    let want: Vec<f64> = (0..rows).flat_map(|_| [idx, idx + 0.5]).collect();
                    assert_eq!(values, want, "{backend} #{i}: its own rows, in its order");
                }
            }
        }
        // The server is fine: a plain request still runs.
        let (status, _, _) = burst(&server, "/fn/gather/run", &[body(1, 2)], 1).remove(0);
        assert_eq!(status, 200);
    }
}

#[test]
fn a_huge_input_to_a_quick_model_runs_off_the_async_workers() {
    // One async worker: a run on it would hold the whole server, and the request's own
    // timeout could not fire until the run ended.
    let launch = kiln_tests::Launch {
        env: vec![("TOKIO_WORKER_THREADS".into(), "1".into())],
        ..kiln_tests::Launch::default()
    };
    let server = TestServer::launch(kiln_tests::temp_dir("data"), None, launch).expect("serves");
    deploy(
        &server,
        "quick",
        "nn_probe",
        &onnx::two_layer(64, 4096),
        "tract",
        json!("off"),
        json!({"limits": {"timeout_ms": 400, "memory_mb": 256}}),
    );
    // Quick on one row (tens of microseconds): learnt from a few runs.
    let a = server.get("/fn/quick/?model=model&input=x&dims=1,64&iters=20");
    assert_eq!(a.status, 200, "{}", a.text());
    // Fifty thousand rows take seconds. Priced per row, the run goes to the blocking pool:
    // the request answers at its timeout, and the server stays responsive meanwhile.
    let started = Instant::now();
    let a = server.get("/fn/quick/?model=model&input=x&dims=50000,64&iters=1");
    let took = started.elapsed();
    assert_eq!(a.status, 504, "{}", a.text());
    assert_eq!(a.error_code(), "function.timeout");
    assert!(
        took < Duration::from_millis(1500),
        "answered after {took:?}: the run held the async worker past the 400 ms timeout"
    );
    let a = server.get("/fn/quick/?model=model&input=x&dims=1,64&iters=1");
    assert_eq!(a.status, 200, "{}", a.text());
}
