//! Blobs and compiled artifacts in an S3-compatible bucket (a real `moto_server` on
//! loopback): a node whose data dir holds only the database serves from the bucket without
//! compiling, bytes that changed in the bucket are refused, a large blob streams through a
//! multipart upload, and a bucket outage leaves serving alone while uploads get 503 and
//! `/readyz` says why. Also `/readyz` and the node id on the default (folder) store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_tests::s3::Moto;
use kiln_tests::{Launch, TestServer, Value, digest, json, root, temp_dir};

const BUCKET: &str = "kiln";

fn node(data_dir: &Path, blobs: &str, config: Option<&str>) -> TestServer {
    let config = config.map(|toml| {
        let path = data_dir.join("kiln-config.toml");
        std::fs::write(&path, toml).unwrap();
        path
    });
    TestServer::launch(
        data_dir.to_path_buf(),
        config,
        Launch {
            args: vec!["--blobs".into(), blobs.into()],
            ..Launch::default()
        },
    )
    .unwrap_or_else(|log| panic!("kiln serve exited before serving:\n{log}"))
}

/// A second node of `a`'s cluster, on a new data dir holding only what a fresh node has:
/// the shared database (in the PostgreSQL run; else a copy of `a`'s SQLite files), no
/// blobs, no compiled artifacts.
fn second_node(a: &TestServer, blobs: &str) -> TestServer {
    let dir = databases_only(&a.data_dir);
    let mut args = vec!["--blobs".to_string(), blobs.to_string()];
    if let Some(db) = kiln_tests::pg::suite_database_url(&a.data_dir) {
        args.extend(["--database".to_string(), db]);
    }
    TestServer::launch(
        dir,
        None,
        Launch {
            args,
            ..Launch::default()
        },
    )
    .unwrap_or_else(|log| panic!("kiln serve exited before serving:\n{log}"))
}

/// A new data dir holding only `from`'s SQLite databases.
fn databases_only(from: &Path) -> std::path::PathBuf {
    let dir = temp_dir("node-b");
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".db") || name.contains(".db-") {
            std::fs::copy(entry.path(), dir.join(&name)).unwrap();
        }
    }
    dir
}

fn pixels() -> Value {
    let text = std::fs::read_to_string(root().join("examples/digits/model/heldout.json")).unwrap();
    let heldout: Value = serde_json::from_str(&text).unwrap();
    json!({"pixels": heldout["inputs"][0], "expected": heldout["predicted"][0]})
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn node_with_only_the_database_serves_from_the_bucket_without_compiling() {
    let Some(moto) = Moto::start("shared_blobs::node_with_only_the_database") else {
        return;
    };
    moto.create_bucket(BUCKET);
    let url = moto.blobs_url(BUCKET, "cluster-a");
    let mut a = node(&temp_dir("node-a"), &url, None);
    let hello = a.deploy_example("hello", "hello", "");
    a.deploy_digits("digits", json!({}));
    let hex = hello["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");

    // Node A put the component and its compiled artifact in the bucket.
    let keys = moto.keys(BUCKET, "cluster-a/");
    assert!(
        keys.contains(&format!("cluster-a/blobs/sha256/{hex}")),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&format!("cluster-a/compiled/{hex}-")) && k.ends_with(".cwasm")),
        "{keys:?}"
    );
    assert_eq!(a.terminate(), Some(0));

    let b = second_node(&a, &url);
    let r = b.get("/fn/hello/");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "hello\n");
    let timing = r.header("server-timing").unwrap();
    assert!(
        timing.contains("cold;") && timing.contains("desc=\"fetch\""),
        "{timing}"
    );
    assert!(
        !b.log().contains("recompiling"),
        "node B compiled:\n{}",
        b.log()
    );
    // The model comes from the bucket too, verified, and predicts as on node A.
    let input = pixels();
    let r = b.request(
        "POST",
        "/fn/digits/",
        &[],
        json!({"pixels": input["pixels"]}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["digit"], input["expected"]);
    // B fetched what it ran: the compiled artifact (no component blob: it compiled
    // nothing) and the model.
    let model = digest(&std::fs::read(root().join("examples/digits/model/digits.onnx")).unwrap());
    let model_hex = model.trim_start_matches("sha256:");
    assert!(
        b.data_dir
            .join(format!("blobs/sha256/{model_hex}"))
            .is_file()
    );
    assert!(!b.data_dir.join(format!("blobs/sha256/{hex}")).exists());
    let compiled: Vec<_> = std::fs::read_dir(b.data_dir.join("compiled"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(compiled.iter().any(|n| n.starts_with(hex)), "{compiled:?}");

    let ready = b.get("/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["blobs"], "s3", "{}", ready.text());
    assert!(
        !ready.text().contains("127.0.0.1"),
        "no endpoint: {}",
        ready.text()
    );
}

#[test]
fn bytes_changed_in_the_bucket_are_refused_and_large_blobs_stream_in_parts() {
    let Some(moto) = Moto::start("shared_blobs::bytes_changed_in_the_bucket") else {
        return;
    };
    moto.create_bucket(BUCKET);
    let url = moto.blobs_url(BUCKET, "cluster-c");
    let mut a = node(&temp_dir("node-a"), &url, None);
    a.deploy_digits("digits", json!({}));
    let model = std::fs::read(root().join("examples/digits/model/digits.onnx")).unwrap();
    let model_key = format!(
        "cluster-c/blobs/sha256/{}",
        digest(&model).trim_start_matches("sha256:")
    );
    let stored = moto
        .get(BUCKET, &model_key)
        .expect("the model is in the bucket");
    assert!(stored == model, "the bucket holds other bytes");

    // 20 MiB: three parts of a multipart upload, stored whole and intact.
    let big: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let big_digest = a.put_blob(&big);
    let stored = moto
        .get(
            BUCKET,
            &format!(
                "cluster-c/blobs/sha256/{}",
                big_digest.trim_start_matches("sha256:")
            ),
        )
        .expect("the large blob is in the bucket");
    assert_eq!(digest(&stored), big_digest);
    assert_eq!(a.terminate(), Some(0));

    // Someone rewrites the model in the bucket: a node fetching it refuses the bytes.
    let mut tampered = model.clone();
    tampered[100] ^= 0xff;
    moto.put(BUCKET, &model_key, &tampered);
    let b = second_node(&a, &url);
    let r = b.request(
        "POST",
        "/fn/digits/",
        &[],
        json!({"pixels": pixels()["pixels"]}).to_string().as_bytes(),
    );
    assert_ne!(r.status, 200, "a corrupt model served: {}", r.text());
    assert!(b.log().contains("corrupt"), "{}", b.log());
    let local = b.data_dir.join(format!(
        "blobs/sha256/{}",
        digest(&model).trim_start_matches("sha256:")
    ));
    assert!(!local.exists(), "the corrupt bytes were kept");
}

#[test]
fn bucket_outage_keeps_serving_refuses_uploads_and_shows_in_readyz() {
    let Some(mut moto) = Moto::start("shared_blobs::bucket_outage") else {
        return;
    };
    moto.create_bucket(BUCKET);
    let url = moto.blobs_url(BUCKET, "cluster-d");
    // One loaded version: every switch between the two functions is a cold start.
    let server = node(
        &temp_dir("node"),
        &url,
        Some("[runtime]\nloaded_versions = 1\nkept_versions = 0\n"),
    );
    server.deploy_example("hello", "hello", "");
    server.deploy_example("echo", "echo", "");
    wait_for("readyz", || server.get("/readyz").status == 200);

    moto.stop();
    for _ in 0..5 {
        let r = server.get("/fn/hello/");
        assert_eq!(r.status, 200, "{}", r.text());
        let r = server.request("POST", "/fn/echo/", &[], b"still here");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, b"still here");
    }
    let upload = server.request("PUT", &format!("/v1/blobs/{}", digest(b"new")), &[], b"new");
    assert_eq!(upload.status, 503, "{}", upload.text());
    assert_eq!(upload.error_code(), "store.unavailable");
    wait_for("readyz to report the outage", || {
        let r = server.get("/readyz");
        r.status == 503 && r.error_code() == "store.unavailable" && r.text().contains("blob store")
    });
    assert_eq!(
        server.get("/healthz").status,
        200,
        "liveness is not readiness"
    );
    // Nothing half-stored answers "already there" once the bucket is back.
    assert_eq!(
        server
            .request("HEAD", &format!("/v1/blobs/{}", digest(b"new")), &[], b"")
            .status,
        503
    );

    moto.restart();
    moto.create_bucket(BUCKET);
    wait_for("readyz to recover", || server.get("/readyz").status == 200);
    let upload = server.request("PUT", &format!("/v1/blobs/{}", digest(b"new")), &[], b"new");
    assert_eq!(upload.status, 201, "{}", upload.text());
}

#[test]
fn readyz_names_the_node_whose_id_is_kept_in_the_data_dir() {
    let mut server = TestServer::start();
    let ready = server.get("/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());
    let id = ready.json()["node"].as_str().unwrap().to_string();
    assert!(!id.is_empty());
    let kept = std::fs::read_to_string(server.data_dir.join("node-id")).unwrap();
    assert_eq!(kept.trim(), id);
    server.restart();
    assert_eq!(server.get("/readyz").json()["node"], id.as_str());

    let named = TestServer::launch(
        temp_dir("named"),
        None,
        Launch {
            args: vec!["--node-id".into(), "edge-7".into()],
            ..Launch::default()
        },
    )
    .unwrap();
    assert_eq!(named.get("/readyz").json()["node"], "edge-7");
}
