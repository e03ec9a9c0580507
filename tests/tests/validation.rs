//! `[validate]` end to end: a digits version is deployed only after its cases (held-out
//! images with their labels, and a malformed request that must be refused) pass; a version
//! whose model answers 0 for everything is refused with every case's result, by the API
//! and by `kiln deploy` (a dry run included), and nothing of it is deployed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use kiln_tests::{TestServer, Value, example, json, root, temp_dir};

fn heldout() -> Value {
    let text = std::fs::read_to_string(root().join("examples/digits/model/heldout.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The first `n` held-out images with their true labels, then a malformed request that
/// must answer 400.
fn cases(n: usize) -> String {
    let data = heldout();
    let mut out = String::new();
    for (pixels, label) in data["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(data["labels"].as_array().unwrap())
        .take(n)
    {
        out.push_str(&json!({"body": {"pixels": pixels}, "label": label}).to_string());
        out.push('\n');
    }
    out.push_str(&json!({"body": "not json", "status": 400}).to_string());
    out.push('\n');
    out
}

/// A function directory: the digits component with `model`, validated by `cases`.
fn function_dir(model: &str, min_accuracy: f64) -> std::path::PathBuf {
    let dir = temp_dir("validate");
    std::fs::write(dir.join("cases.jsonl"), cases(100)).unwrap();
    let path = |p: &Path| p.display().to_string();
    std::fs::write(
        dir.join("kiln.toml"),
        format!(
            "name = \"checked\"\ncomponent = {:?}\n[models.digits]\npath = {:?}\nbackend = \"tract\"\n[validate]\ncases = \"cases.jsonl\"\nmin_accuracy = {min_accuracy}\nmax_p99_ms = 5000\n",
            path(&example("digits")),
            path(&root().join("examples/digits/model").join(model)),
        ),
    )
    .unwrap();
    dir
}

#[test]
fn a_version_is_published_only_after_its_cases_pass() {
    let server = TestServer::start();
    let data = heldout();
    let right = (0..100)
        .filter(|&i| data["predicted"][i] == data["labels"][i])
        .count();

    // The trained model passes (its held-out accuracy is above 0.9).
    let good = function_dir("digits.onnx", 0.9);
    let out = server.cli_ok(&["deploy", good.to_str().unwrap(), "--dry-run"]);
    assert!(out.contains("validation passed (101 cases"), "{out}");
    assert_eq!(
        server.get("/v1/functions/checked").status,
        404,
        "a dry run deploys nothing"
    );
    server.cli_ok(&["deploy", good.to_str().unwrap()]);
    let v = server.get("/v1/functions/checked/versions/1").json();
    let result = &v["validation"]["result"];
    assert_eq!(result["passed"], true, "{v}");
    assert_eq!(
        (result["cases"].as_u64(), result["labelled"].as_u64()),
        (Some(101), Some(100))
    );
    assert_eq!(result["correct"], right, "{result}");
    assert_eq!(result["wrong_status"], 0, "{result}");
    assert_eq!(v["validation"]["spec"]["min_accuracy"], 0.9);
    // Validation runs are not billed: after one real request, the ledger holds exactly one
    // request of the function (the 101 cases would be there too).
    let pixels = json!({"pixels": data["inputs"][0]}).to_string();
    assert_eq!(
        server
            .request("POST", "/fn/checked/", &[], pixels.as_bytes())
            .status,
        200
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let usage = server.get("/v1/usage?function=checked").json();
        let n = usage["totals"]["requests"].as_u64().unwrap_or(0);
        if n > 0 {
            assert_eq!(n, 1, "{usage}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{usage}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // A model that answers 0 for everything is refused, with every case's result.
    let bad = function_dir("always_zero.onnx", 0.9);
    let out = server.cli(&["deploy", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("failed validation") && err.contains("line 1:"),
        "{err}"
    );
    let out = server.cli(&["-o", "json", "deploy", bad.to_str().unwrap(), "--dry-run"]);
    assert!(!out.status.success());
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        answer["error"]["code"], "version.validation_failed",
        "{answer}"
    );

    // Through the API: 400 with every case.
    let model = server
        .put_blob(&std::fs::read(root().join("examples/digits/model/always_zero.onnx")).unwrap());
    let component = server.put_blob(&std::fs::read(example("digits")).unwrap());
    let cases = server.put_blob(cases(100).as_bytes());
    let manifest = |min_accuracy: f64| {
        json!({
            "component": component,
            "models": {"digits": {"digest": model, "backend": "tract"}},
            "validate": {"cases": cases, "min_accuracy": min_accuracy},
        })
    };
    let a = server.deploy_manifest("checked", &manifest(0.9));
    assert_eq!(a.status, 400, "{}", a.text());
    assert_eq!(a.error_code(), "version.validation_failed");
    let validation = &a.json()["error"]["validation"];
    assert_eq!(validation["passed"], false);
    assert_eq!(validation["results"].as_array().unwrap().len(), 101);
    let zeros = (0..100).filter(|&i| data["labels"][i] == 0).count();
    assert_eq!(validation["correct"], zeros, "{validation}");
    assert!(
        validation["results"][0]["prediction"] == "0",
        "{}",
        validation["results"][0]
    );
    let versions = server.get("/v1/functions/checked/versions").json();
    assert_eq!(
        versions["versions"].as_array().unwrap().len(),
        1,
        "{versions}"
    );

    // A cases file that is not one: the line is named.
    let broken = server.put_blob(b"{\"body\": 1}\n{\"bodyy\": 2}\n");
    let mut m = manifest(0.0);
    m["validate"]["cases"] = broken.into();
    let a = server.deploy_manifest("checked", &m);
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(a.text().contains("line 2"), "{}", a.text());
}
