//! `kiln store copy`: a populated single node (SQLite files and a blob folder) moved into a
//! fresh PostgreSQL database and a real bucket (moto). A cluster node started on them
//! serves the same functions, policies, aliases and keys, and shows the same usage totals,
//! history and audit log; copying again changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use kiln_tests::s3::Moto;
use kiln_tests::{Launch, TestServer, json, kiln_bin, temp_dir};
use serde_json::Value;

fn copy(data_dir: &std::path::Path, db: &str, blobs: &str) -> String {
    let out = Command::new(kiln_bin())
        .args(["store", "copy", "--from", "sqlite", "--to", db])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--blobs-to", blobs])
        .env("AWS_ACCESS_KEY_ID", kiln_tests::s3::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", kiln_tests::s3::SECRET_KEY)
        .env_remove("KILN_DATA_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln store copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn put(s: &TestServer, path: &str, body: &Value) {
    let a = s.request(
        "PUT",
        path,
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(a.status, 200, "{path}: {}", a.text());
}

/// What a user sees of the installation: through the API of `s`.
fn view(s: &TestServer, key: &str) -> Value {
    let served = |path: &str, bearer: &str| {
        let a = s.request("GET", path, &[("authorization", bearer)], b"");
        (a.status, a.header("x-kiln-version").map(str::to_string))
    };
    let bearer = format!("Bearer {key}");
    json!({
        "functions": s.get("/v1/functions").json()["functions"]
            .as_array().unwrap().iter().map(|f| f["name"].clone()).collect::<Vec<_>>(),
        "versions": s.get("/v1/functions/hello/versions").json()["versions"]
            .as_array().unwrap().iter()
            .map(|v| json!([v["version"], v["digest"]])).collect::<Vec<_>>(),
        "default": served("/fn/hello/", kiln_tests::ADMIN_BEARER),
        "staging": served("/fn/hello:staging/", kiln_tests::ADMIN_BEARER),
        "with_key": served("/fn/hello/", &bearer),
        "keys": s.get("/v1/keys").json()["keys"].as_array().unwrap().len(),
        "history": s.get("/v1/functions/hello/history").json()["history"].clone(),
        "sticky": (0..16)
            .map(|u| {
                let user = format!("user-{u}");
                s.request("GET", "/fn/hello:split/", &[("x-user", user.as_str())], b"")
                    .header("x-kiln-version")
                    .map(str::to_string)
            })
            .collect::<Vec<_>>(),
    })
}

#[test]
fn a_single_node_moves_into_a_cluster_with_nothing_lost_and_a_second_copy_changes_nothing() {
    let Some(db) = kiln_tests::pg::shared_database("store_copy") else {
        return;
    };
    let Some(moto) = Moto::start("store_copy") else {
        return;
    };
    moto.create_bucket("kiln");
    let blobs = moto.blobs_url("kiln", "copied");

    // A single node, on the embedded default whatever the suite runs on.
    let mut single = TestServer::launch(
        temp_dir("single-node"),
        None,
        Launch {
            args: vec![
                "--database".into(),
                "sqlite".into(),
                "--blobs".into(),
                "folder".into(),
            ],
            ..Launch::default()
        },
    )
    .unwrap_or_else(|log| panic!("kiln serve exited before serving:\n{log}"));
    single.deploy_example("hello", "hello", "");
    single.deploy_example("hello", "hello", "timeout_ms=2000");
    put(
        &single,
        "/v1/functions/hello/traffic",
        &json!({"weights": {"1": 100}}),
    );
    put(
        &single,
        "/v1/functions/hello/aliases/staging",
        &json!({"weights": {"2": 100}}),
    );
    // Sticky callers split over both versions: they land where they did after the copy.
    put(
        &single,
        "/v1/functions/hello/aliases/split",
        &json!({"weights": {"1": 50, "2": 50}, "sticky": "header:x-user"}),
    );
    let (key, _) = single.create_key("default", &["invoke:*"], None);
    let before = view(&single, &key);
    assert_eq!(before["default"], json!([200, "1"]), "{before}");
    assert_eq!(before["staging"], json!([200, "2"]), "{before}");
    let audit_before = single.get("/v1/audit?limit=1000").json()["entries"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(single.terminate(), Some(0), "the single node stops cleanly");

    let first = copy(&single.data_dir, &db.url, &blobs);
    for table in [
        "functions:",
        "versions:",
        "aliases:",
        "api_keys:",
        "secrets:",
        "usage:",
        "blobs:",
    ] {
        let line = first
            .lines()
            .find(|l| l.starts_with(table))
            .unwrap_or_default();
        assert!(!line.starts_with(&format!("{table} 0 copied")), "{first}");
    }
    // Twice: nothing new, everything already there.
    let second = copy(&single.data_dir, &db.url, &blobs);
    assert!(
        second.lines().all(|l| l.contains(" 0 copied")),
        "a second copy changed something:\n{second}"
    );

    // A cluster node on the copy: the same installation.
    let node = TestServer::launch(
        temp_dir("copied-node"),
        None,
        Launch {
            args: vec!["--database".into(), db.url.clone(), "--blobs".into(), blobs],
            ..Launch::default()
        },
    )
    .unwrap_or_else(|log| panic!("kiln serve exited before serving:\n{log}"));
    // The 19 calls `view` made on the single node, flushed when it stopped.
    let usage = node.get("/v1/usage?function=hello").json()["totals"]["requests"].clone();
    assert_eq!(usage, 19, "usage totals differ");
    let after = view(&node, &key);
    assert_eq!(after, before, "the cluster differs from the single node");
    let audit_after = node.get("/v1/audit?limit=1000").json()["entries"]
        .as_array()
        .unwrap()
        .len();
    assert!(
        audit_after > audit_before,
        "the audit log was not copied: {audit_after} entries, {audit_before} before"
    );
    // New versions continue the numbering (and the ids) after the copied ones.
    let v3 = node.deploy_example("hello", "hello", "");
    assert_eq!(v3["version"], 3, "{v3}");
}
