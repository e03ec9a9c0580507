//! Model monitoring end to end: the digits example deployed with `kiln deploy` carries its
//! committed reference (the training split); the held-out split is not drifted, the same
//! images inverted drift on the features they change and move the predicted classes, a
//! handful of requests is never called drift, and a reference that does not fit the model
//! fails the deploy with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_tests::{TestServer, Value, example, json, metric_sample, root};

fn heldout() -> Value {
    let text = std::fs::read_to_string(root().join("examples/digits/model/heldout.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn images() -> Vec<Vec<f64>> {
    heldout()["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect()
}

/// Classifies `rows` through `/fn/{target}/`, `chunk` images per request.
fn classify(server: &TestServer, target: &str, rows: &[Vec<f64>], chunk: usize) {
    for batch in rows.chunks(chunk) {
        let a = server.request(
            "POST",
            &format!("/fn/{target}/"),
            &[],
            json!({ "batch": batch }).to_string().as_bytes(),
        );
        assert_eq!(a.status, 200, "{}", a.text());
    }
}

fn drift(server: &TestServer, name: &str, version: u32) -> Value {
    let a = server.get(&format!(
        "/v1/functions/{name}/versions/{version}/drift?window=15m"
    ));
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()
}

fn features(report: &Value) -> Vec<Value> {
    report["models"][0]["inputs"][0]["features"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn held_out_traffic_is_quiet_and_inverted_images_drift_on_the_features_they_change() {
    let hook = kiln_tests::webhook::Webhook::start(0);
    let mut server = TestServer::start_with_config(&format!(
        "[alerts]\nwebhook = {:?}\nsecret = \"0123456789abcdef0123\"\n",
        hook.url
    ));
    example("digits");
    for _ in 0..2 {
        server.cli_ok(&["deploy", "examples/digits", "--name", "watched"]);
    }
    let info = server.get("/v1/functions/watched/versions/1").json();
    assert_eq!(
        info["models"][0]["monitor"]["sample_percent"], 100,
        "{info}"
    );

    // Nothing seen yet: nothing drifted.
    let empty = drift(&server, "watched", 1);
    assert_eq!(
        (empty["samples"].as_u64(), empty["drifted"].as_bool()),
        (Some(0), Some(false)),
        "{empty}"
    );

    // Version 1 gets the held-out split: the distribution it was trained on.
    let held_out = images();
    classify(&server, "watched@1", &held_out, 50);
    let quiet = drift(&server, "watched", 1);
    assert_eq!(quiet["samples"], held_out.len(), "{quiet}");
    assert_eq!(quiet["drifted"], false, "{quiet}");
    let model = &quiet["models"][0];
    assert_eq!(model["reference_rows"], 1347, "{model}");
    assert_eq!(features(&quiet).len(), 64);
    for f in features(&quiet) {
        assert_eq!(f["statistic"], "psi");
        assert!(
            f["score"].as_f64().unwrap() < 0.2,
            "held-out feature drifted: {f}"
        );
    }
    let predictions = &model["predictions"];
    assert_eq!(predictions["output"], "label", "{predictions}");
    assert_eq!(predictions["samples"], held_out.len());
    assert!(
        predictions["score"].as_f64().unwrap() < 0.1,
        "{predictions}"
    );

    // Version 2 gets the same images inverted (16 - pixel).
    let inverted: Vec<Vec<f64>> = held_out
        .iter()
        .map(|r| r.iter().map(|v| 16.0 - v).collect())
        .collect();
    // Twenty images are not enough to call anything drifted, however far off they are.
    classify(&server, "watched@2", &inverted[..20], 20);
    let few = drift(&server, "watched", 2);
    assert_eq!(few["samples"], 20);
    assert_eq!(few["drifted"], false, "{few}");
    assert!(
        few["models"][0]["max_score"].as_f64().unwrap() > 1.0,
        "{few}"
    );

    classify(&server, "watched@2", &inverted[20..], 50);
    let loud = drift(&server, "watched", 2);
    assert_eq!(loud["samples"], held_out.len(), "{loud}");
    assert_eq!(loud["drifted"], true, "{loud}");
    // The features inversion moves far (pixels mostly dark or mostly bright) drift; the
    // test computes which from the images themselves.
    let n = held_out.len() as f64;
    let found = features(&loud);
    let mut far = 0;
    for (i, f) in found.iter().enumerate() {
        let mean = held_out.iter().map(|r| r[i]).sum::<f64>() / n;
        if !(4.0..=12.0).contains(&mean) {
            far += 1;
            assert_eq!(
                f["drifted"], true,
                "pixel {i} (mean {mean:.1}) should drift: {f}"
            );
        }
    }
    assert!(far > 30, "most pixels are dark or bright: {far}");
    let moved = &loud["models"][0]["predictions"];
    assert_eq!(moved["drifted"], true, "{moved}");
    assert!(moved["score"].as_f64().unwrap() > 0.2, "{moved}");
    // Version 1's window is untouched by version 2's traffic.
    assert_eq!(drift(&server, "watched", 1)["drifted"], false);

    // The CLI shows the same report.
    let out = server.cli_ok(&["drift", "watched", "--window", "15m"]);
    assert!(
        out.contains("DRIFTED") && out.contains("version 2"),
        "{out}"
    );
    let json_out: Value =
        serde_json::from_str(&server.cli_ok(&["-o", "json", "drift", "watched", "--version", "1"]))
            .unwrap();
    assert_eq!(json_out["drifted"], false, "{json_out}");

    // The drift gauge follows (refreshed every 15 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let series = "kiln_model_drift_score{function=\"watched\",version=\"2\",model=\"digits\"}";
    loop {
        let text = server.get("/metrics").text();
        if text.contains(series) {
            assert!(metric_sample(&text, series) > 1.0, "{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no drift gauge: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    // The same refresh raises drift.detected for version 2 (and only for it).
    let alert = hook.wait_for("drift.detected", std::time::Duration::from_secs(30));
    assert_eq!(
        (
            alert["data"]["function"].as_str(),
            alert["data"]["version"].as_u64()
        ),
        (Some("watched"), Some(2)),
        "{alert}"
    );
    for (_, body) in hook.deliveries() {
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(v["data"]["version"] != 1, "version 1 did not drift: {v}");
    }

    // After a restart the monitor prepares again from the stored reference, in the
    // background, on the first compute.
    server.restart();
    classify(&server, "watched@2", &inverted[..1], 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = drift(&server, "watched", 2);
        if r["models"][0]["state"].is_null() {
            break;
        }
        assert_eq!(r["models"][0]["state"], "preparing", "{r}");
        assert!(std::time::Instant::now() < deadline, "never prepared: {r}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    classify(&server, "watched@2", &inverted[..150], 50);
    let again = drift(&server, "watched", 2);
    assert_eq!(
        (again["samples"].as_u64(), again["drifted"].as_bool()),
        (Some(150), Some(true)),
        "{again}"
    );
}

#[test]
fn a_reference_that_does_not_fit_the_model_fails_the_deploy_and_unmonitored_versions_say_so() {
    let server = TestServer::start();
    // Rows of 10 values for a model that takes 64.
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let mut header = "{'descr': '|u1', 'fortran_order': False, 'shape': (3, 10), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    npy.extend((header.len() as u16).to_le_bytes());
    npy.extend(header.as_bytes());
    npy.extend([1u8; 30]);
    let reference = server.put_blob(&npy);
    let model =
        server.put_blob(&std::fs::read(root().join("examples/digits/model/digits.onnx")).unwrap());
    let component = server.put_blob(&std::fs::read(example("digits")).unwrap());
    let manifest = |monitor: Value| {
        json!({
            "component": component,
            "models": {"digits": {"digest": model, "backend": "tract", "monitor": monitor}},
        })
    };
    let a = server.deploy_manifest("narrow", &manifest(json!({"reference": reference})));
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(
        a.text().contains("have 10 values; the model takes 64"),
        "{}",
        a.text()
    );
    let a = server.deploy_manifest(
        "narrow",
        &manifest(json!({"reference": reference, "sample_percent": 101})),
    );
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(a.text().contains("sample_percent"), "{}", a.text());
    let missing = format!("sha256:{}", "ab".repeat(32));
    let a = server.deploy_manifest("narrow", &manifest(json!({"reference": missing})));
    assert_eq!(a.status, 404, "{}", a.text());
    assert_eq!(
        server.get("/v1/functions/narrow").status,
        404,
        "nothing was deployed"
    );

    server.deploy_digits("plain", json!({}));
    let a = server.get("/v1/functions/plain/versions/1/drift");
    assert_eq!(a.status, 404, "{}", a.text());
    assert_eq!(a.error_code(), "monitor.not_configured");
    let a = server.get("/v1/functions/plain/versions/1/drift?window=1s");
    assert_eq!(a.status, 400, "{}", a.text());
}
