//! Uploads: blobs, manifests, and every kind of bad component, refused with a clear reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_tests::{TestServer, example, json};

fn sha256(bytes: &[u8]) -> String {
    // The server reports the digest of what it stored; use it to compute the expected name.
    let server_side = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut child = server_side;
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "sha256:{}",
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
    )
}

#[test]
fn garbage_core_module_and_precompiled_uploads_are_refused() {
    let server = TestServer::start();
    let a = server.deploy_wasm("bad", b"this is not wasm at all", "");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "component.invalid"),
        "{}",
        a.text()
    );

    let core = wat::parse_str("(module (func (export \"f\")))").unwrap();
    let a = server.deploy_wasm("bad", &core, "");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "component.core_module")
    );
    assert!(a.text().contains("not a component"));

    // A truncated component: valid header, broken body; wasmtime's reason is passed on.
    let hello = std::fs::read(example("hello")).unwrap();
    let a = server.deploy_wasm("bad", &hello[..hello.len() / 2], "");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "component.invalid"),
        "{}",
        a.text()
    );

    // Precompiled native code is never accepted from a client.
    server.deploy_example("hello", "hello", "");
    let cwasm = std::fs::read_dir(server.data_dir.join("compiled"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    let a = server.deploy_wasm("bad", &std::fs::read(cwasm).unwrap(), "");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "component.precompiled")
    );
    assert_eq!(server.get("/fn/bad/").status, 404, "nothing was deployed");
    assert_eq!(server.get("/fn/hello/").status, 200);
}

#[test]
fn unsatisfiable_import_is_refused_naming_it() {
    let server = TestServer::start();
    let wasm = wat::parse_str(
        r#"(component (import "kiln:missing/thing@1.0.0" (instance (export "f" (func)))))"#,
    )
    .unwrap();
    let a = server.deploy_wasm("needy", &wasm, "");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "component.unsatisfied_import")
    );
    assert!(
        a.text().contains("kiln:missing/thing@1.0.0"),
        "{}",
        a.text()
    );

    let no_export = wat::parse_str("(component)").unwrap();
    let a = server.deploy_wasm("mute", &no_export, "");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "component.not_http_proxy"),
        "{}",
        a.text()
    );
}

#[test]
fn memory_minimum_over_the_cap_is_refused_at_deploy() {
    let server = TestServer::start();
    // A component whose core module needs 100 MiB (1600 pages) up front, deployed with 16 MiB.
    let wasm = wat::parse_str(
        r#"(component
            (core module $m (memory (export "mem") 1600))
            (core instance $i (instantiate $m))
        )"#,
    )
    .unwrap();
    let a = server.deploy_wasm("fat", &wasm, "memory_mb=16");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "component.instantiate_failed"),
        "{}",
        a.text()
    );
    assert!(a.text().contains("memory"), "{}", a.text());
    // The same component within its cap gets past instantiation (and is then refused only
    // for not being an HTTP handler).
    let a = server.deploy_wasm("fat", &wasm, "memory_mb=128");
    assert_eq!(a.error_code(), "component.not_http_proxy", "{}", a.text());
}

#[test]
fn blobs_are_verified_and_manifests_deploy_them() {
    let server = TestServer::start();
    let hello = std::fs::read(example("hello")).unwrap();
    let digest = sha256(&hello);
    assert_eq!(
        server
            .request("HEAD", &format!("/v1/blobs/{digest}"), &[], b"")
            .status,
        404
    );

    let wrong = sha256(b"something else");
    let a = server.request("PUT", &format!("/v1/blobs/{wrong}"), &[], &hello);
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "blob.digest_mismatch")
    );
    assert_eq!(
        server
            .request("HEAD", &format!("/v1/blobs/{wrong}"), &[], b"")
            .status,
        404
    );

    let a = server.request("PUT", &format!("/v1/blobs/{digest}"), &[], &hello);
    assert_eq!(a.status, 201, "{}", a.text());
    let head = server.request("HEAD", &format!("/v1/blobs/{digest}"), &[], b"");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(hello.len().to_string().as_str())
    );
    assert_eq!(
        server
            .request("PUT", &format!("/v1/blobs/{digest}"), &[], &hello)
            .status,
        200
    );

    let manifest = json!({"component": digest, "limits": {"timeout_ms": 1000}});
    let a = server.request(
        "POST",
        "/v1/functions/viablob/versions",
        &[("content-type", "application/json")],
        manifest.to_string().as_bytes(),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    assert_eq!(a.json()["digest"], digest.as_str());
    assert_eq!(a.json()["limits"]["timeout_ms"], 1000);
    assert_eq!(server.get("/fn/viablob/").text(), "hello\n");

    let post = |body: serde_json::Value| {
        server.request(
            "POST",
            "/v1/functions/viablob/versions",
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let missing = post(json!({"component": sha256(b"never uploaded")}));
    assert_eq!(
        (missing.status, missing.error_code().as_str()),
        (404, "blob.not_found")
    );
    let unknown = post(json!({"component": digest, "extra": 1}));
    assert_eq!(
        (unknown.status, unknown.error_code().as_str()),
        (400, "request.invalid")
    );
    assert!(unknown.text().contains("extra"));
    let zero = post(json!({"component": digest, "limits": {"memory_mb": 0}}));
    assert_eq!(
        (zero.status, zero.error_code().as_str()),
        (400, "request.invalid")
    );
    assert!(zero.text().contains("memory_mb"));
}

#[test]
fn bad_requests_to_the_deploy_endpoint_say_why() {
    let server = TestServer::start();
    let hello = std::fs::read(example("hello")).unwrap();
    let a = server.deploy_wasm("hello", &hello, "timeout=5");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "request.invalid")
    );
    assert!(a.text().contains("timeout"));
    let a = server.deploy_wasm("BadName", &hello, "");
    assert_eq!(a.status, 400);
    let a = server.request(
        "POST",
        "/v1/functions/hello/versions",
        &[("content-type", "text/plain")],
        &hello,
    );
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (415, "request.unsupported_media_type")
    );
}

#[test]
fn uploads_over_the_limit_answer_413() {
    let server = TestServer::start_with_config("max_upload_bytes = 4096\n");
    let big = vec![0u8; 10_000];
    let a = server.request("PUT", &format!("/v1/blobs/{}", sha256(&big)), &[], &big);
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (413, "request.too_large")
    );
    let a = server.deploy_wasm("big", &big, "");
    assert_eq!(a.status, 413);
    assert!(
        std::fs::read_dir(server.data_dir.join("blobs/sha256"))
            .unwrap()
            .next()
            .is_none()
    );
}
