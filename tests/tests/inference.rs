//! Inference end to end: the digits classifier deployed with its ONNX model, served over
//! HTTP, checked against reference predictions computed by onnxruntime in Python, on both
//! backends; model isolation, malformed tensors, unknown names, GPU requests on a CPU host,
//! idle unload and reload, one shared graph under concurrency, and embedded models.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_tests::{TestServer, Value, example, json, onnxruntime_library, root, temp_dir};

fn model_bytes() -> Vec<u8> {
    std::fs::read(root().join("examples/digits/model/digits.onnx")).unwrap()
}

fn heldout() -> Value {
    let text = std::fs::read_to_string(root().join("examples/digits/model/heldout.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ort_config() -> Option<String> {
    onnxruntime_library().map(|lib| {
        format!(
            "[nn]\nonnxruntime_library = {:?}\n",
            lib.display().to_string()
        )
    })
}

/// Deploys `component` (an example) with the digits model under `name`.
fn deploy_digits(server: &TestServer, name: &str, example_name: &str, model: Value) -> Value {
    let wasm = std::fs::read(example(example_name)).unwrap();
    let component = server.put_blob(&wasm);
    let a = server.deploy_manifest(
        name,
        &json!({"component": component, "models": {"digits": model}}),
    );
    assert_eq!(a.status, 201, "deploy {name}: {}", a.text());
    a.json()
}

fn model_info(server: &TestServer, name: &str, version: u64) -> Value {
    let v = server
        .get(&format!("/v1/functions/{name}/versions/{version}"))
        .json();
    v["models"][0].clone()
}

/// Classifies the whole held-out set in one request and checks every prediction against
/// the reference; returns the accuracy against the true labels.
fn check_against_reference(server: &TestServer, name: &str) -> f64 {
    let reference = heldout();
    let inputs = reference["inputs"].as_array().unwrap();
    let a = server.request(
        "POST",
        &format!("/fn/{name}/"),
        &[("content-type", "application/json")],
        json!({"batch": inputs}).to_string().as_bytes(),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let got = a.json();
    let digits = got["digits"].as_array().unwrap();
    let probs = got["probabilities"].as_array().unwrap();
    assert_eq!(digits.len(), inputs.len());
    let mut correct = 0;
    for (i, d) in digits.iter().enumerate() {
        assert_eq!(d, &reference["predicted"][i], "{name}: prediction {i}");
        for (k, p) in probs[i].as_array().unwrap().iter().enumerate() {
            let want = reference["probabilities"][i][k].as_f64().unwrap();
            let p = p.as_f64().unwrap();
            assert!(
                (p - want).abs() < 1e-4,
                "{name}: sample {i} class {k}: {p} vs {want}"
            );
        }
        if d == &reference["labels"][i] {
            correct += 1;
        }
    }
    correct as f64 / digits.len() as f64
}

#[test]
fn digits_match_the_onnxruntime_reference_on_every_backend() {
    let ort = ort_config();
    let server = TestServer::start_with_config(ort.as_deref().unwrap_or(""));
    let model = server.put_blob(&model_bytes());

    let v = deploy_digits(
        &server,
        "digits-tract",
        "digits",
        json!({"digest": model, "backend": "tract"}),
    );
    let info = &v["models"][0];
    assert_eq!(info["name"], "digits");
    assert_eq!(info["digest"], model.as_str());
    assert_eq!(info["size"], model_bytes().len());
    assert_eq!(info["backend"], "tract");
    assert_eq!(info["device"], "cpu");
    assert_eq!(info["state"], "loaded", "loaded at deploy: {info}");
    assert_eq!(info["inputs"][0]["name"], "input");
    assert_eq!(info["inputs"][0]["dims"], json!([null, 64]));

    // One image: the documented request and answer.
    let first: Vec<Value> = heldout()["inputs"][0].as_array().unwrap().clone();
    let a = server.request(
        "POST",
        "/fn/digits-tract/",
        &[],
        json!({"pixels": first}).to_string().as_bytes(),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let one = a.json();
    assert_eq!(one["digit"], heldout()["predicted"][0]);
    assert_eq!(one["probabilities"].as_array().unwrap().len(), 10);
    let timing = a.header("server-timing").unwrap();
    assert!(
        timing.contains("inference;dur=") && timing.contains("desc=\"cpu\""),
        "{timing}"
    );

    let accuracy = check_against_reference(&server, "digits-tract");
    assert!(accuracy > 0.97, "held-out accuracy {accuracy}");

    if ort.is_some() {
        let v = deploy_digits(
            &server,
            "digits-ort",
            "digits",
            json!({"digest": model, "backend": "onnxruntime"}),
        );
        assert_eq!(v["models"][0]["backend"], "onnxruntime");
        assert_eq!(v["models"][0]["device"], "cpu");
        let accuracy_ort = check_against_reference(&server, "digits-ort");
        assert_eq!(accuracy, accuracy_ort);
    }
}

#[test]
fn kiln_deploy_uploads_models_and_the_default_backend_serves_them() {
    let server = TestServer::start();
    example("digits");
    let out = server.cli(&["deploy", "examples/digits"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = model_info(&server, "digits", 1);
    assert_eq!(
        info["backend"], "tract",
        "no ONNX Runtime configured: tract: {info}"
    );
    assert_eq!(info["state"], "loaded");
    let pixels = heldout()["inputs"][1].clone();
    let a = server.request(
        "POST",
        "/fn/digits/",
        &[],
        json!({"pixels": pixels}).to_string().as_bytes(),
    );
    assert_eq!(a.json()["digit"], heldout()["predicted"][1]);
    // The second deploy finds the model (and component) already on the server.
    let out = server.cli(&["deploy", "examples/digits"]);
    assert!(out.status.success());
    assert_eq!(
        model_info(&server, "digits", 2)["loads"],
        1,
        "same model bytes share one graph"
    );
}

#[test]
fn models_resolve_only_inside_their_own_version_and_bad_tensors_are_guest_errors() {
    let server = TestServer::start();
    let model = server.put_blob(&model_bytes());
    deploy_digits(&server, "digits", "digits", json!({"digest": model}));
    let hostile_wasm = std::fs::read(example("hostile")).unwrap();
    let a = server.deploy_wasm("nomodels", &hostile_wasm, "");
    assert_eq!(a.status, 201, "{}", a.text());
    deploy_digits(&server, "probe", "hostile", json!({"digest": model}));

    let body = |path: &str| {
        let a = server.get(path);
        assert_eq!(a.status, 200, "{path}: {}", a.text());
        a.text()
    };
    // Another function's model is invisible; an unknown name says what exists.
    let other = body("/fn/nomodels/nn/load?name=digits");
    assert!(other.starts_with("not-found:"), "{other}");
    assert_eq!(body("/fn/probe/nn/load?name=digits"), "ok\n");
    let unknown = body("/fn/probe/nn/load?name=nope");
    assert!(
        unknown.starts_with("not-found:") && unknown.contains("models: digits"),
        "{unknown}"
    );

    // Guest-supplied model bytes are refused unless the manifest enables them, and then
    // capped; within the cap they reach a backend, which says what is wrong with them.
    let bytes = body("/fn/probe/nn/bytes");
    assert!(
        bytes.starts_with("security:") && bytes.contains("guest_load_max_mb"),
        "{bytes}"
    );
    let a = server.deploy_manifest(
        "loader",
        &json!({"component": server.put_blob(&hostile_wasm), "nn": {"guest_load_max_mb": 1}}),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    assert_eq!(a.json()["nn"]["guest_load_max_bytes"], 1 << 20);
    let small = body("/fn/loader/nn/bytes?size=64");
    assert!(
        small.starts_with("invalid-encoding:") && small.contains("cannot load"),
        "{small}"
    );
    let big = body("/fn/loader/nn/bytes?size=2000000");
    assert!(
        big.starts_with("too-large:") && big.contains("allows 1048576"),
        "{big}"
    );

    // Malformed tensors are checked before the backend sees them.
    for (case, needle) in [
        ("shape", "dimension 1 must be 64"),
        ("type", "takes f32 elements, got i64"),
        ("bytes", "need 512 bytes, got 100"),
        ("name", "no input named \"pixels\""),
    ] {
        let got = body(&format!("/fn/probe/nn/malformed?case={case}"));
        assert!(
            got.starts_with("invalid-argument:") && got.contains(needle),
            "{case}: {got}"
        );
    }
    assert_eq!(body("/fn/probe/nn/malformed?case=ok"), "ok\n");

    // The classifier itself answers bad input with a 400, and keeps serving.
    let a = server.request("POST", "/fn/digits/", &[], br#"{"pixels":[1,2,3]}"#);
    assert_eq!(a.status, 400, "{}", a.text());
    let pixels = heldout()["inputs"][2].clone();
    let a = server.request(
        "POST",
        "/fn/digits/",
        &[],
        json!({"pixels": pixels}).to_string().as_bytes(),
    );
    assert_eq!(a.json()["digit"], heldout()["predicted"][2]);
}

#[test]
fn gpu_targets_on_a_cpu_host_fail_clearly_or_fall_back_with_auto() {
    let ort = ort_config();
    let server = TestServer::start_with_config(ort.as_deref().unwrap_or(""));
    let model = server.put_blob(&model_bytes());
    let wasm = std::fs::read(example("digits")).unwrap();
    let component = server.put_blob(&wasm);
    let mut backends = vec!["tract"];
    if ort.is_some() {
        backends.push("onnxruntime");
    }
    for backend in backends {
        let a = server.deploy_manifest(
            "gpu",
            &json!({"component": component, "models": {"digits": {"digest": model, "target": "gpu", "backend": backend}}}),
        );
        assert_eq!(a.status, 400, "{backend}: {}", a.text());
        assert_eq!(a.error_code(), "model.unsupported");
        let msg = a.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(
            msg.contains("\"digits\"") && msg.contains("asks for a GPU"),
            "{msg}"
        );

        let name = format!("auto-{backend}");
        let a = server.deploy_manifest(
            &name,
            &json!({"component": component, "models": {"digits": {"digest": model, "target": "auto", "backend": backend}}}),
        );
        assert_eq!(a.status, 201, "{backend}: {}", a.text());
        let info = &a.json()["models"][0];
        assert_eq!(info["target"], "auto");
        assert_eq!(info["device"], "cpu");
        assert!(
            info["note"]
                .as_str()
                .unwrap()
                .contains("running on the CPU"),
            "{info}"
        );
        let pixels = heldout()["inputs"][3].clone();
        let a = server.request(
            "POST",
            &format!("/fn/{name}/"),
            &[],
            json!({"pixels": pixels}).to_string().as_bytes(),
        );
        assert_eq!(a.json()["digit"], heldout()["predicted"][3]);
    }
    // Nothing of the refused deploys was recorded.
    assert_eq!(server.get("/fn/gpu/").status, 404);
}

#[test]
fn idle_models_unload_and_reload_on_demand() {
    let server = TestServer::start_with_config("[nn]\nmodel_idle_unload_ms = 300\n");
    let model = server.put_blob(&model_bytes());
    deploy_digits(&server, "digits", "digits", json!({"digest": model}));
    let pixels = json!({"pixels": heldout()["inputs"][4]}).to_string();
    let a = server.request("POST", "/fn/digits/", &[], pixels.as_bytes());
    assert_eq!(a.json()["digit"], heldout()["predicted"][4]);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = model_info(&server, "digits", 1);
        if info["state"] == "unloaded" {
            assert_eq!(info["loads"], 1);
            break;
        }
        assert!(Instant::now() < deadline, "model never unloaded: {info}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let a = server.request("POST", "/fn/digits/", &[], pixels.as_bytes());
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["digit"], heldout()["predicted"][4]);
    let info = model_info(&server, "digits", 1);
    assert_eq!(
        (info["state"].as_str(), info["loads"].as_u64()),
        (Some("loaded"), Some(2)),
        "{info}"
    );
}

#[test]
fn concurrent_requests_share_one_loaded_graph() {
    let server = TestServer::start();
    let model = server.put_blob(&model_bytes());
    deploy_digits(&server, "digits", "digits", json!({"digest": model}));
    let url = format!("{}/fn/digits/", server.url);
    let reference = heldout();
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let url = url.clone();
            let reference = reference.clone();
            std::thread::spawn(move || {
                let agent = kiln_tests::agent();
                for i in 0..8 {
                    let n = t * 8 + i;
                    let body = json!({"pixels": reference["inputs"][n]}).to_string();
                    let mut resp = agent
                        .post(&url)
                        .header("authorization", kiln_tests::ADMIN_BEARER)
                        .send(body.as_bytes())
                        .unwrap();
                    let got: Value =
                        serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
                    assert_eq!(got["digit"], reference["predicted"][n]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let info = model_info(&server, "digits", 1);
    assert_eq!(info["loads"], 1, "{info}");
    assert_eq!(info["runs"], 128, "{info}");
}

#[test]
fn a_component_with_embedded_models_is_the_whole_deployable() {
    let server = TestServer::start();
    // A function directory whose component is a copy of the digits build.
    let dir = temp_dir("embed");
    std::fs::copy(example("digits"), dir.join("digits.wasm")).unwrap();
    let model_path: PathBuf = root().join("examples/digits/model/digits.onnx");
    std::fs::write(
        dir.join("kiln.toml"),
        format!(
            "name = \"packed\"\ncomponent = \"digits.wasm\"\n[build]\ncommand = \"true\"\n[models.digits]\npath = {:?}\ntarget = \"cpu\"\n",
            model_path.display().to_string()
        ),
    )
    .unwrap();
    let out = server.cli(&["build", "--embed-models", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let packed = std::fs::read(dir.join("digits.wasm")).unwrap();
    assert!(
        packed.len()
            > std::fs::metadata(example("digits")).unwrap().len() as usize + model_bytes().len()
    );

    // A bare application/wasm upload needs nothing else.
    let a = server.deploy_wasm("packed", &packed, "");
    assert_eq!(a.status, 201, "{}", a.text());
    let info = &a.json()["models"][0];
    assert_eq!(info["name"], "digits");
    assert_eq!(info["digest"], kiln_tests::digest(&model_bytes()).as_str());
    assert_eq!(info["state"], "loaded");
    let pixels = json!({"pixels": heldout()["inputs"][5]}).to_string();
    let a = server.request("POST", "/fn/packed/", &[], pixels.as_bytes());
    assert_eq!(a.json()["digit"], heldout()["predicted"][5]);

    // Embedding again replaces rather than duplicates.
    let out = server.cli(&["build", "--embed-models", dir.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(
        std::fs::read(dir.join("digits.wasm")).unwrap().len(),
        packed.len()
    );

    // And it survives a restart (models reload from their blobs on first use).
    let mut server = server;
    server.restart();
    let info = model_info(&server, "packed", 1);
    assert_eq!(info["state"], "unloaded");
    let a = server.request("POST", "/fn/packed/", &[], pixels.as_bytes());
    assert_eq!(a.json()["digit"], heldout()["predicted"][5]);
}

/// The PP-OCRv4 recognizer (fetched by `examples/ocr/model/fetch.sh`), or `None` to skip.
fn ocr_model() -> Option<PathBuf> {
    let path = root().join("examples/ocr/model/rec.onnx");
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but examples/ocr/model/rec.onnx is missing: run examples/ocr/model/fetch.sh"
    );
    kiln_tests::skip("ocr", "examples/ocr/model/rec.onnx not fetched");
    None
}

#[test]
fn ocr_reads_text_lines_through_onnxruntime() {
    let (Some(_), Some(ort)) = (ocr_model(), ort_config()) else {
        return;
    };
    let server = TestServer::start_with_config(&ort);
    example("ocr");
    let out = server.cli(&["deploy", "examples/ocr"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = model_info(&server, "ocr", 1);
    assert_eq!(
        (info["backend"].as_str(), info["device"].as_str()),
        (Some("onnxruntime"), Some("cpu")),
        "{info}"
    );
    for (file, text) in [
        ("Hello_World_2026.png", "Hello, World 2026"),
        ("Kiln_serves_models.png", "Kiln serves models"),
    ] {
        let png = std::fs::read(root().join("examples/ocr/testdata").join(file)).unwrap();
        let a = server.request("POST", "/fn/ocr/", &[("content-type", "image/png")], &png);
        assert_eq!(a.status, 200, "{}", a.text());
        let got = a.json();
        assert_eq!(got["text"], text);
        assert!(got["confidence"].as_f64().unwrap() > 0.9, "{got}");
    }
    let a = server.request("POST", "/fn/ocr/", &[], b"not a png");
    assert_eq!(a.status, 400, "{}", a.text());

    // tract cannot analyse this model (its height is symbolic): the deploy says so.
    let model =
        server.put_blob(&std::fs::read(root().join("examples/ocr/model/rec.onnx")).unwrap());
    let component = server.put_blob(&std::fs::read(example("ocr")).unwrap());
    let a = server.deploy_manifest(
        "ocr-tract",
        &json!({"component": component, "models": {"rec": {"digest": model, "backend": "tract"}}}),
    );
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "model.invalid"),
        "{}",
        a.text()
    );
    assert!(
        a.text().contains("tract cannot load this ONNX model"),
        "{}",
        a.text()
    );
}

#[test]
fn a_long_native_inference_still_answers_at_the_functions_timeout() {
    let (Some(rec), Some(ort)) = (ocr_model(), ort_config()) else {
        return;
    };
    // One session: the follow-up request can only run if the cancelled run released it.
    let server = TestServer::start_with_config(&format!("{ort}onnxruntime_sessions = 1\n"));
    let model = server.put_blob(&std::fs::read(rec).unwrap());
    let component = server.put_blob(&std::fs::read(example("nn_probe")).unwrap());
    let a = server.deploy_manifest(
        "probe",
        &json!({"component": component, "limits": {"timeout_ms": 1000, "memory_mb": 256},
                "models": {"model": {"digest": model, "backend": "onnxruntime"}}}),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    // One run over a 48x16000 line takes seconds of native work, all inside one host call
    // where no wasm epoch can interrupt it.
    let started = Instant::now();
    let a = server.get("/fn/probe/?model=model&input=x&dims=1,3,48,16000&iters=1");
    let took = started.elapsed();
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (504, "function.timeout"),
        "{}",
        a.text()
    );
    assert!(
        took < Duration::from_millis(3500),
        "answered after {took:?}"
    );
    // The cancelled run gave its session back: the model keeps serving.
    let a = server.get("/fn/probe/?model=model&input=x&dims=1,3,48,320&iters=1");
    assert_eq!(a.status, 200, "{}", a.text());
}

#[test]
fn a_model_over_the_servers_model_memory_budget_is_refused_at_deploy() {
    let Some(rec) = ocr_model() else {
        return;
    };
    let server = TestServer::start_with_config("[nn]\nmodel_memory_mb = 1\n");
    let model = server.put_blob(&std::fs::read(rec).unwrap());
    let component = server.put_blob(&std::fs::read(example("ocr")).unwrap());
    let a = server.deploy_manifest(
        "ocr",
        &json!({"component": component, "models": {"rec": {"digest": model}}}),
    );
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "model.too_large"),
        "{}",
        a.text()
    );
    assert!(
        a.text().contains("model memory budget of 1048576 bytes"),
        "{}",
        a.text()
    );
    // The small digits model still fits.
    let digits = server.put_blob(&model_bytes());
    deploy_digits(&server, "digits", "digits", json!({"digest": digits}));
}
