//! Ground truth end to end: each digits request records the class its model predicted;
//! labels posted for 200 requests (NDJSON, by `x-kiln-request-id`) give the version the
//! accuracy the test computes itself; a duplicate counts once; another tenant's feedback
//! is unknown and counts nowhere; a guest's `x-kiln-prediction` wins, never reaches the
//! client, and values give the mean absolute and root mean squared error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_tests::{TestServer, Value, example, json, metric_sample, root};

fn heldout() -> Value {
    let text = std::fs::read_to_string(root().join("examples/digits/model/heldout.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Uploads a blob with `key`; returns its digest.
fn put_blob_as(server: &TestServer, key: &str, bytes: &[u8]) -> String {
    let digest = format!("sha256:{}", sha256_hex(bytes));
    let a = server.call_as(key, "PUT", &format!("/v1/blobs/{digest}"), bytes);
    assert!(a.status == 201 || a.status == 200, "{}", a.text());
    digest
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn labels_give_each_version_its_accuracy_once_per_request_and_only_for_its_tenant() {
    let server = TestServer::start();
    let (a_key, _) = server.create_key("tenant-a", &["deploy:*", "invoke:*"], None);
    let (b_key, _) = server.create_key("tenant-b", &["deploy:*", "invoke:*"], None);
    let model = put_blob_as(
        &server,
        &a_key,
        &std::fs::read(root().join("examples/digits/model/digits.onnx")).unwrap(),
    );
    let component = put_blob_as(&server, &a_key, &std::fs::read(example("digits")).unwrap());
    let manifest = json!({"component": component, "models": {"digits": {"digest": model}}});
    let a = server.request(
        "POST",
        "/v1/functions/graded/versions",
        &[
            ("authorization", &format!("Bearer {a_key}")),
            ("content-type", "application/json"),
        ],
        manifest.to_string().as_bytes(),
    );
    assert_eq!(a.status, 201, "{}", a.text());

    let data = heldout();
    let (inputs, labels) = (
        data["inputs"].as_array().unwrap(),
        data["labels"].as_array().unwrap(),
    );
    let mut ids = Vec::new();
    let mut right = 0;
    for (pixels, label) in inputs.iter().zip(labels).take(200) {
        let a = server.call_as(
            &a_key,
            "POST",
            "/fn/graded/",
            json!({ "pixels": pixels }).to_string().as_bytes(),
        );
        assert_eq!(a.status, 200, "{}", a.text());
        right += usize::from(a.json()["digit"] == *label);
        ids.push(a.header("x-kiln-request-id").unwrap().to_string());
    }
    let expected = right as f64 / 200.0;
    assert!(
        expected > 0.9 && expected < 1.0,
        "held-out accuracy {expected}"
    );

    // Tenant B's labels for A's requests (all wrong) are unknown to B, and count nowhere.
    let foreign: String = ids[..20]
        .iter()
        .map(|id| format!("{}\n", json!({"request_id": id, "label": 11})))
        .collect();
    let a = server.call_as(&b_key, "POST", "/v1/feedback", foreign.as_bytes());
    assert_eq!(a.status, 202, "{}", a.text());
    assert_eq!(
        a.json(),
        json!({"accepted": 0, "duplicates": 0, "unknown": 20})
    );

    // A's labels, as NDJSON.
    let ndjson: String = ids
        .iter()
        .zip(labels)
        .map(|(id, label)| format!("{}\n", json!({"request_id": id, "label": label})))
        .collect();
    let a = server.call_as(&a_key, "POST", "/v1/feedback", ndjson.as_bytes());
    assert_eq!(a.status, 202, "{}", a.text());
    assert_eq!(
        a.json(),
        json!({"accepted": 200, "duplicates": 0, "unknown": 0})
    );
    // The same request again, even with another label: counted once, the first stands.
    let again = json!({"request_id": ids[0], "label": 11}).to_string();
    let a = server.call_as(&a_key, "POST", "/v1/feedback", again.as_bytes());
    assert_eq!(
        a.json(),
        json!({"accepted": 0, "duplicates": 1, "unknown": 0})
    );
    let nobody = json!({"request_id": "no-such-request", "label": 1}).to_string();
    let a = server.call_as(&a_key, "POST", "/v1/feedback", nobody.as_bytes());
    assert_eq!(a.json()["unknown"], 1);
    for bad in [
        json!({"request_id": ids[1]}),
        json!({"request_id": ids[1], "label": 1, "value": 2.0}),
        json!({"request_id": ids[1], "label": 1, "extra": true}),
    ] {
        let a = server.call_as(&a_key, "POST", "/v1/feedback", bad.to_string().as_bytes());
        assert_eq!(a.status, 400, "{bad}: {}", a.text());
    }

    let a = server.call_as(
        &a_key,
        "GET",
        "/v1/functions/graded/versions/1/quality?window=1h",
        b"",
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let q = a.json();
    assert_eq!(
        (q["predictions"].as_u64(), q["labelled"].as_u64()),
        (Some(200), Some(200)),
        "{q}"
    );
    assert_eq!(q["correct"], right, "{q}");
    assert!(
        (q["accuracy"].as_f64().unwrap() - expected).abs() < 1e-12,
        "{q}"
    );
    assert!(q["mae"].is_null(), "{q}");
    // Another tenant cannot read it.
    let a = server.call_as(
        &b_key,
        "GET",
        "/v1/functions/graded/versions/1/quality",
        b"",
    );
    assert_eq!(a.status, 404, "{}", a.text());
    let out = server.cli_as(&a_key, &["quality", "graded"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("200 labelled"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The usage export carries each request's prediction.
    let csv = server.get("/v1/usage?format=csv&function=graded").text();
    assert!(
        csv.lines().next().unwrap().ends_with(",prediction"),
        "{csv}"
    );
    let first = csv.lines().find(|l| l.starts_with(&ids[0])).unwrap();
    assert!(
        first.ends_with(&format!(",{}", data["predicted"][0])),
        "{first}"
    );

    // The accuracy gauge (refreshed every minute, and once feedback is accepted) and the
    // feedback counter.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let series = "kiln_model_accuracy{function=\"graded\",version=\"1\"}";
    loop {
        let text = server.get("/metrics").text();
        if text.contains(series) {
            assert!(
                (metric_sample(&text, series) - expected).abs() < 1e-9,
                "{text}"
            );
            assert_eq!(
                metric_sample(&text, "kiln_feedback_total{outcome=\"accepted\"}"),
                200.0
            );
            assert_eq!(
                metric_sample(&text, "kiln_feedback_total{outcome=\"unknown\"}"),
                21.0
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no accuracy gauge");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

#[test]
fn a_guests_prediction_header_is_recorded_not_sent_and_values_give_errors() {
    let server = TestServer::start();
    server.deploy_wasm("echoes", &std::fs::read(example("echo")).unwrap(), "");
    let mut ids = Vec::new();
    for predicted in ["1.5", "2.0", "4.0"] {
        let a = server.request(
            "POST",
            "/fn/echoes/",
            &[("x-echo-prediction", predicted)],
            b"",
        );
        assert_eq!(a.status, 200, "{}", a.text());
        assert!(
            a.header("x-kiln-prediction").is_none(),
            "sent to the client"
        );
        ids.push(a.header("x-kiln-request-id").unwrap().to_string());
    }
    // Truths 1.0, 2.0, 2.0: errors 0.5, 0, 2.
    let body: String = ids
        .iter()
        .zip([1.0, 2.0, 2.0])
        .map(|(id, v)| format!("{}\n", json!({"request_id": id, "value": v})))
        .collect();
    let a = server.request("POST", "/v1/feedback", &[], body.as_bytes());
    assert_eq!(a.json()["accepted"], 3, "{}", a.text());
    let q = server.get("/v1/functions/echoes/versions/1/quality").json();
    assert_eq!(
        (
            q["predictions"].as_u64(),
            q["valued"].as_u64(),
            q["labelled"].as_u64()
        ),
        (Some(3), Some(3), Some(0)),
        "{q}"
    );
    assert!(
        (q["mae"].as_f64().unwrap() - 2.5 / 3.0).abs() < 1e-12,
        "{q}"
    );
    assert!(
        (q["rmse"].as_f64().unwrap() - (4.25f64 / 3.0).sqrt()).abs() < 1e-12,
        "{q}"
    );
    assert!(q["accuracy"].is_null(), "{q}");
}
