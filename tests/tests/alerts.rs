//! Alert events end to end: a webhook receiver in the test (plain HTTP over loopback)
//! answers 500 to the first delivery; the server retries, the same event arrives again
//! with the same delivery id, and its `x-kiln-signature` is the HMAC-SHA256 of the body
//! under the configured secret, computed here independently of the server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kiln_tests::webhook::Webhook;
use kiln_tests::{TestServer, Value, example, json, root};

const SECRET: &str = "a-test-secret-of-some-length";

/// HMAC-SHA256 (RFC 2104), written out here so the test does not trust the server's.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let inner: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x36)
        .chain(msg.iter().copied())
        .collect();
    let inner = Sha256::digest(inner);
    let outer: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x5c)
        .chain(inner.iter().copied())
        .collect();
    hex::encode(Sha256::digest(outer))
}

#[test]
fn a_refused_validation_raises_a_signed_event_retried_after_a_500() {
    let hook = Webhook::start(1);
    let server = TestServer::start_with_config(&format!(
        "[alerts]\nwebhook = {:?}\nsecret = {SECRET:?}\n",
        hook.url
    ));
    let heldout: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("examples/digits/model/heldout.json")).unwrap(),
    )
    .unwrap();
    let cases: String = (0..20)
        .map(|i| {
            format!(
                "{}\n",
                json!({"body": {"pixels": heldout["inputs"][i]}, "label": heldout["labels"][i]})
            )
        })
        .collect();
    let manifest = json!({
        "component": server.put_blob(&std::fs::read(example("digits")).unwrap()),
        "models": {"digits": {"digest": server.put_blob(&std::fs::read(root().join("examples/digits/model/always_zero.onnx")).unwrap()), "backend": "tract"}},
        "validate": {"cases": server.put_blob(cases.as_bytes()), "min_accuracy": 0.9},
    });
    let a = server.deploy_manifest("zeros", &manifest);
    assert_eq!(a.status, 400, "{}", a.text());

    let deadline = Instant::now() + Duration::from_secs(20);
    while hook.deliveries().len() < 2 {
        assert!(Instant::now() < deadline, "the event was not retried");
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = hook.deliveries();
    let (first, second) = (&got[0], &got[1]);
    assert_eq!(first.1, second.1, "the retry carries the same event");
    let event: Value = serde_json::from_slice(&second.1).unwrap();
    assert_eq!(event["type"], "validation.failed", "{event}");
    assert_eq!(event["data"]["function"], "zeros", "{event}");
    assert_eq!(event["data"]["cases"], 20, "{event}");
    let header = |h: &[(String, String)], k: &str| {
        h.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(header(&second.0, "x-kiln-event"), "validation.failed");
    assert_eq!(
        header(&second.0, "x-kiln-signature"),
        format!("sha256={}", hmac_sha256(SECRET.as_bytes(), &second.1))
    );
}
