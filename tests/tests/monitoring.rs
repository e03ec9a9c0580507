//! Model monitoring end to end: the digits example deployed with `kiln deploy` carries its
//! committed reference (the training split); the held-out split is not drifted, the same
//! images inverted drift on the features they change and move the predicted classes, a
//! handful of requests is never called drift, and a reference that does not fit the model
//! fails the deploy with the reason. A window can be made the reference, and a cluster's
//! drift adds up every node's traffic.
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

    // After a restart the monitor prepares again from the stored reference (on the first
    // compute, or the first drift question), and what it saw before the restart still
    // counts: each process publishes its buckets, the last ones as it stops.
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
        (Some(held_out.len() as u64 + 150), Some(true)),
        "{again}"
    );
}

#[test]
fn a_window_made_the_reference_rebases_drift_on_every_restart() {
    let mut server = TestServer::start();
    example("digits");
    server.cli_ok(&["deploy", "examples/digits", "--name", "rebased"]);
    let reference = |body: &str| {
        server.request(
            "POST",
            "/v1/functions/rebased/versions/1/reference",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
    };

    // Too little traffic to make a reference of: refused, nothing changes.
    let inverted: Vec<Vec<f64>> = images()
        .iter()
        .map(|r| r.iter().map(|v| 16.0 - v).collect())
        .collect();
    classify(&server, "rebased", &inverted[..50], 50);
    let a = reference(r#"{"window": "15m"}"#);
    assert_eq!(a.status, 409, "{}", a.text());
    assert_eq!(a.error_code(), "monitor.not_enough_samples");
    assert!(a.text().contains("saw 50 rows"), "{}", a.text());
    for bad in [
        r#"{"window": "1s"}"#,
        r#"{}"#,
        r#"{"window": "1h", "x": 1}"#,
        "nope",
    ] {
        assert_eq!(reference(bad).status, 400, "{bad}");
    }

    // The shifted traffic drifts from the reference file...
    classify(&server, "rebased", &inverted[50..], 50);
    let before = drift(&server, "rebased", 1);
    assert_eq!(before["drifted"], true, "{before}");
    assert_eq!(before["models"][0]["reference"]["source"], "file");

    // ...until the last 15 minutes become the reference: the same window scores zero
    // against itself, features and classes alike.
    let a = reference(r#"{"window": "15m"}"#);
    assert_eq!(a.status, 200, "{}", a.text());
    let made = a.json();
    assert_eq!(made["models"][0]["rows"], inverted.len(), "{made}");
    assert_eq!(made["models"][0]["predictions"], inverted.len(), "{made}");
    let check = |server: &TestServer| {
        let after = drift(server, "rebased", 1);
        let model = &after["models"][0];
        assert_eq!(after["drifted"], false, "{after}");
        assert_eq!(model["reference"]["source"], "window", "{model}");
        assert_eq!(model["reference"]["window"], "15m", "{model}");
        assert_eq!(model["reference_rows"], inverted.len(), "{model}");
        assert_eq!(model["max_score"].as_f64(), Some(0.0), "{model}");
        assert_eq!(model["predictions"]["score"].as_f64(), Some(0.0), "{model}");
    };
    check(&server);
    // It is stored: a restarted server scores against it too (and, having kept its
    // buckets, over the same rows).
    server.restart();
    check(&server);
    // Now the traffic the model was trained on is what stands out.
    classify(&server, "rebased", &images(), 50);
    let back = drift(&server, "rebased", 1);
    assert_eq!(back["drifted"], true, "{back}");

    // The CLI sets it as well, and the audit log names who did.
    let out = server.cli_ok(&["drift", "rebased", "--set-reference", "15m"]);
    assert!(out.contains("reference: the last 15m"), "{out}");
    let audit = server.get("/v1/audit?action=version.reference.set").json();
    let set: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["status"] == 200)
        .collect();
    assert_eq!(set.len(), 2, "{audit}");
    assert!(
        set.iter()
            .all(|e| e["detail"] == "reference from the last 15m"),
        "{audit}"
    );
}

#[test]
fn a_model_shipped_without_a_reference_takes_its_bins_from_its_first_rows() {
    let server = TestServer::start();
    server.deploy_digits(
        "bare",
        json!({"models": {"digits": {
            "digest": server.put_blob(
                &std::fs::read(root().join("examples/digits/model/digits.onnx")).unwrap()
            ),
            "backend": "tract",
            "monitor": {},
        }}}),
    );
    let warming = drift(&server, "bare", 1);
    assert_eq!(warming["models"][0]["state"], "warming_up", "{warming}");
    assert_eq!(warming["models"][0]["rows"], 0, "{warming}");

    // The first 500 rows set the bins (in the background, within a publication).
    let held_out = images();
    let first: Vec<Vec<f64>> = held_out.iter().cycle().take(500).cloned().collect();
    classify(&server, "bare", &first, 50);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let quiet = loop {
        let r = drift(&server, "bare", 1);
        if r["models"][0]["state"].is_null() {
            break r;
        }
        assert_eq!(r["models"][0]["rows"], 500, "{r}");
        assert!(
            std::time::Instant::now() < deadline,
            "never set its bins: {r}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // Those rows are the reference, and they were counted too: nothing drifted.
    let model = &quiet["models"][0];
    assert_eq!(model["reference"]["source"], "first_rows", "{model}");
    assert_eq!(model["reference_rows"], 500, "{model}");
    assert_eq!(quiet["samples"], 500, "{quiet}");
    assert_eq!(quiet["drifted"], false, "{quiet}");

    // Inverted images stand out against them; made the reference, they no longer do.
    let inverted: Vec<Vec<f64>> = held_out
        .iter()
        .map(|r| r.iter().map(|v| 16.0 - v).collect())
        .collect();
    classify(&server, "bare", &inverted, 50);
    let loud = drift(&server, "bare", 1);
    assert_eq!(loud["drifted"], true, "{loud}");
    let a = server.request(
        "POST",
        "/v1/functions/bare/versions/1/reference",
        &[("content-type", "application/json")],
        br#"{"window": "15m"}"#,
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let rebased = drift(&server, "bare", 1);
    assert_eq!(rebased["models"][0]["reference"]["source"], "window");
    assert_eq!(
        rebased["models"][0]["max_score"].as_f64(),
        Some(0.0),
        "{rebased}"
    );

    // A second version of the model starts from the first one's bins instead of warming
    // up: its first rows are scored at once, on counts a rollout can compare.
    server.deploy_digits(
        "bare",
        json!({"models": {"digits": {
            "digest": server.put_blob(
                &std::fs::read(root().join("examples/digits/model/digits.onnx")).unwrap()
            ),
            "backend": "tract",
            "monitor": {},
        }}}),
    );
    classify(&server, "bare@2", &held_out[..100], 50);
    let second = drift(&server, "bare", 2);
    let model = &second["models"][0];
    assert_eq!(model["reference"]["source"], "first_rows", "{second}");
    assert_eq!(model["reference_rows"], 500, "{second}");
    assert_eq!(second["samples"], 100, "{second}");
}

#[test]
fn drift_adds_up_every_node_of_a_cluster() {
    let Some(cluster) = kiln_tests::cluster::Cluster::start("monitoring::cluster", 2, false) else {
        return;
    };
    let [a, b] = &cluster.nodes[..] else {
        unreachable!()
    };
    example("digits");
    a.cli_ok(&["deploy", "examples/digits", "--name", "shared"]);
    let inverted: Vec<Vec<f64>> = images()
        .iter()
        .map(|r| r.iter().map(|v| 16.0 - v).collect())
        .collect();
    // Sixty rows on each node: too few for either to call drift alone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while b.get("/v1/functions/shared").status != 200 {
        assert!(std::time::Instant::now() < deadline, "never reached node b");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A drift question prepares node b's monitor (node a's was prepared by the deploy);
    // otherwise b's first computes would pass while it prepares.
    assert_eq!(drift(b, "shared", 1)["samples"], 0);
    classify(a, "shared", &inverted[..60], 30);
    classify(b, "shared", &inverted[60..120], 30);
    // Each node publishes its buckets every 5 s; both then answer for all 120 rows.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for node in [a, b] {
        loop {
            let r = drift(node, "shared", 1);
            if r["samples"] == 120 {
                assert_eq!(r["drifted"], true, "{r}");
                assert_eq!(r["partial"], false, "{r}");
                break;
            }
            assert!(
                r["samples"].as_u64().unwrap() < 120 && std::time::Instant::now() < deadline,
                "{r}"
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
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
