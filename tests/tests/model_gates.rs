//! Rollout gates on what models do: a candidate whose model answers 0 for everything is
//! rolled back by the accuracy gate once both versions have enough labelled requests
//! (feedback posted while the rollout runs), and a candidate that rewrites its inputs (it
//! inverts every image) is rolled back by the drift gate, label-free; both with the numbers
//! in the rollout's last check.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kiln_tests::webhook::Webhook;
use kiln_tests::{TestServer, Value, example, json, root};

fn heldout() -> Value {
    let text = std::fs::read_to_string(root().join("examples/digits/model/heldout.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn model(server: &TestServer, file: &str) -> String {
    server.put_blob(&std::fs::read(root().join("examples/digits/model").join(file)).unwrap())
}

/// Deploys `component` (an example) with `model` under `classify`, monitored against the
/// digits reference; returns the version.
fn deploy(server: &TestServer, component: &str, model: &str, reference: &str) -> u64 {
    let component = server.put_blob(&std::fs::read(example(component)).unwrap());
    let a = server.deploy_manifest(
        "classify",
        &json!({
            "component": component,
            "models": {"digits": {"digest": model, "backend": "tract",
                                  "monitor": {"reference": reference}}},
        }),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    a.json()["version"].as_u64().unwrap()
}

fn start(server: &TestServer, gates: Value) {
    let a = server.request(
        "PUT",
        "/v1/functions/classify/traffic",
        &[("content-type", "application/json")],
        json!({"weights": {"1": 100}}).to_string().as_bytes(),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    // Latency is not what these tests judge: on a loaded machine a 3-second step's p99 can
    // differ threefold between two copies of one version (seen in CI).
    let mut body = json!({"to": 2, "steps": [50, 100], "interval": "3s", "min_requests": 10,
                          "max_p99_ratio": 100.0});
    for (k, v) in gates.as_object().unwrap() {
        body[k] = v.clone();
    }
    let a = server.request(
        "POST",
        "/v1/functions/classify/rollout",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(a.status, 201, "{}", a.text());
}

/// Sends held-out images through the main route until the rollout ends (posting their
/// labels as feedback every 20 requests when `label`); returns the ended rollout.
fn drive(server: &TestServer, label: bool) -> Value {
    let data = heldout();
    let (inputs, labels) = (
        data["inputs"].as_array().unwrap(),
        data["labels"].as_array().unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pending = String::new();
    for i in 0.. {
        let at = i % inputs.len();
        let a = server.request(
            "POST",
            "/fn/classify/",
            &[],
            json!({"pixels": inputs[at]}).to_string().as_bytes(),
        );
        assert_eq!(a.status, 200, "{}", a.text());
        if label {
            let id = a.header("x-kiln-request-id").unwrap();
            pending.push_str(&format!(
                "{}\n",
                json!({"request_id": id, "label": labels[at]})
            ));
            if i % 20 == 19 {
                let f = server.request("POST", "/v1/feedback", &[], pending.as_bytes());
                assert_eq!(f.status, 202, "{}", f.text());
                pending.clear();
            }
        }
        if i % 10 == 0 {
            let r = server.get("/v1/functions/classify/rollout").json();
            if r["state"] != "running" {
                return r;
            }
        }
        assert!(Instant::now() < deadline, "the rollout never ended");
    }
    unreachable!()
}

#[test]
fn a_less_accurate_candidate_is_rolled_back_by_the_accuracy_gate() {
    let hook = Webhook::start(0);
    let server = TestServer::start_with_config(&format!(
        "[alerts]\nwebhook = {:?}\nsecret = \"0123456789abcdef0123\"\n",
        hook.url
    ));
    let reference = server
        .put_blob(&std::fs::read(root().join("examples/digits/model/reference.npy")).unwrap());
    let (good, zero) = (
        model(&server, "digits.onnx"),
        model(&server, "always_zero.onnx"),
    );
    deploy(&server, "digits", &good, &reference);
    deploy(&server, "digits", &zero, &reference);
    start(&server, json!({"min_labels": 30, "max_accuracy_drop": 0.1}));
    let r = drive(&server, true);
    assert_eq!(r["state"], "rolled_back", "{r}");
    let outcome = r["outcome"].as_str().unwrap();
    assert!(outcome.contains("accuracy"), "{outcome}");
    let m = &r["last_check"]["models"];
    let (c, s) = (
        m["candidate_accuracy"].as_f64().unwrap(),
        m["stable_accuracy"].as_f64().unwrap(),
    );
    assert!(c < 0.3 && s > 0.9, "{m}");
    assert!(m["candidate_labelled"].as_u64().unwrap() >= 30, "{m}");
    // Everything is back on the stable version.
    let w = server.get("/v1/functions/classify/traffic").json()["policy"]["weights"].clone();
    assert_eq!(w, json!({"1": 100, "2": 0}), "{w}");
    // Alerts: the accuracy drop and the rollback, with the numbers.
    let dropped = hook.wait_for("accuracy.dropped", Duration::from_secs(10));
    assert_eq!(dropped["data"]["candidate"], 2, "{dropped}");
    let rolled = hook.wait_for("rollout.rolled_back", Duration::from_secs(10));
    assert!(
        rolled["data"]["check"]["models"]["candidate_accuracy"]
            .as_f64()
            .unwrap()
            < 0.3,
        "{rolled}"
    );
}

#[test]
fn a_candidate_that_rewrites_its_inputs_is_rolled_back_by_the_drift_gate() {
    let server = TestServer::start();
    let reference = server
        .put_blob(&std::fs::read(root().join("examples/digits/model/reference.npy")).unwrap());
    let good = model(&server, "digits.onnx");
    deploy(&server, "digits", &good, &reference);
    deploy(&server, "digits_skewed", &good, &reference);
    start(&server, json!({"max_drift": 0.5}));
    let r = drive(&server, false);
    assert_eq!(r["state"], "rolled_back", "{r}");
    let outcome = r["outcome"].as_str().unwrap();
    assert!(outcome.contains("drifted from stable v1"), "{outcome}");
    let m = &r["last_check"]["models"];
    assert!(m["drift"].as_f64().unwrap() > 0.5, "{m}");
    assert!(
        m["drift_on"].as_str().unwrap().starts_with("digits "),
        "{m}"
    );
}

#[test]
fn a_faithful_candidate_passes_the_model_gates() {
    let server = TestServer::start();
    let reference = server
        .put_blob(&std::fs::read(root().join("examples/digits/model/reference.npy")).unwrap());
    let good = model(&server, "digits.onnx");
    deploy(&server, "digits", &good, &reference);
    deploy(&server, "digits", &good, &reference);
    start(
        &server,
        json!({"max_drift": 0.5, "min_labels": 30, "max_accuracy_drop": 0.1}),
    );
    let r = drive(&server, true);
    assert_eq!(r["state"], "completed", "{r}");
    // Both gates judged the step, and found nothing.
    let m = &r["last_check"]["models"];
    assert!(m["drift"].as_f64().unwrap() < 0.5, "{m}");
    let (c, s) = (
        m["candidate_accuracy"].as_f64().unwrap(),
        m["stable_accuracy"].as_f64().unwrap(),
    );
    assert!((c - s).abs() < 0.1 && c > 0.9, "{m}");
}
