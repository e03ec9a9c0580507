//! Shadow traffic over real HTTP: copies go to the shadow version after the primary has
//! answered; a slow or failing shadow changes nothing the client sees, and every
//! comparison (match or mismatch, latency difference) is recorded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kiln_tests::{TestServer, json};
use serde_json::Value;

fn set(server: &TestServer, body: &Value) -> kiln_tests::Answer {
    server.request(
        "PUT",
        "/v1/functions/svc/traffic",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// The shadow statistics of version `v`, once `compared + skipped` reaches `n` (or 30 s).
fn shadow_stats(server: &TestServer, v: u32, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = server
            .get(&format!("/v1/functions/svc/versions/{v}/stats"))
            .json();
        let seen =
            s["shadow"]["compared"].as_u64().unwrap() + s["shadow"]["skipped"].as_u64().unwrap();
        if seen >= n || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_slow_or_failing_shadow_leaves_the_primary_alone_and_the_mismatch_is_recorded() {
    let server = TestServer::start();
    server.deploy_example("svc", "hello", "max_concurrency=64&public=true");
    server.deploy_example("svc", "hostile", "max_concurrency=64&timeout_ms=10000");
    let a = set(
        &server,
        &json!({"weights": {"1": 100}, "shadow": {"version": 2, "percent": 100}}),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.json()["policy"]["shadow"],
        json!({"version": 2, "percent": 100})
    );

    // The shadow sleeps 1.5 s on /sleep; hello answers at once, and the client never waits.
    for _ in 0..6 {
        let started = Instant::now();
        let a = server.get("/fn/svc/sleep?ms=1500");
        let took = started.elapsed();
        assert_eq!((a.status, a.text().as_str()), (200, "hello\n"));
        assert_eq!(a.header("x-kiln-version"), Some("1"));
        assert!(
            took < Duration::from_millis(1000),
            "the primary waited for its shadow: {took:?}"
        );
    }
    let s = shadow_stats(&server, 2, 6);
    let shadow = &s["shadow"];
    assert_eq!(
        (
            shadow["compared"].clone(),
            shadow["mismatches"].clone(),
            shadow["errors"].clone()
        ),
        (json!(6), json!(6), json!(0)),
        "{s}"
    );
    assert!(
        shadow["latency_diff_ms"].as_f64().unwrap() > 1000.0,
        "the shadow's extra latency is recorded: {s}"
    );
    assert_eq!(
        s["requests"], 0,
        "copies stay out of the version's own stats: {s}"
    );

    // A shadow that fails (500) is a mismatch and an error; the primary still answers 200.
    for _ in 0..5 {
        let a = server.get("/fn/svc/panic");
        assert_eq!((a.status, a.text().as_str()), (200, "hello\n"));
    }
    let s = shadow_stats(&server, 2, 11);
    assert_eq!(
        (
            s["shadow"]["compared"].clone(),
            s["shadow"]["mismatches"].clone(),
            s["shadow"]["errors"].clone()
        ),
        (json!(11), json!(11), json!(5)),
        "{s}"
    );
    let primary = server.get("/v1/functions/svc/versions/1/stats").json();
    assert_eq!(
        (primary["requests"].clone(), primary["errors"].clone()),
        (json!(11), json!(0))
    );
    let metrics = server.get("/metrics").text();
    assert_eq!(
        kiln_tests::metric_sample(
            &metrics,
            "kiln_shadow_requests_total{function=\"svc\",version=\"2\",result=\"mismatch\"}"
        ),
        11.0
    );
    // Copies are billed like any request, under their own request id, to the owner: a
    // caller from another tenant pays for its own request only.
    let (key, _) = server.create_key("other", &["invoke:svc"], None);
    let answer = server.call_as(&key, "GET", "/fn/svc/", b"");
    assert_eq!(answer.status, 200, "{}", answer.text());
    let id = answer.header("x-kiln-request-id").unwrap().to_string();
    shadow_stats(&server, 2, 12);
    std::thread::sleep(Duration::from_millis(300));
    let records = kiln_tests::usage_csv(&server, "&function=svc");
    let record = |rid: &str| {
        records
            .iter()
            .find(|r| r.get("request_id") == rid)
            .unwrap_or_else(|| panic!("no usage record {rid}"))
    };
    assert_eq!(
        (record(&id).get("tenant"), record(&id).get("version")),
        ("other", "1")
    );
    let copy = record(&format!("{id}.shadow"));
    assert_eq!((copy.get("tenant"), copy.get("version")), ("default", "2"));
}

#[test]
fn identical_answers_match_bodies_are_copied_and_forced_requests_are_not_shadowed() {
    let server = TestServer::start();
    server.deploy_example("svc", "echo", "");
    server.deploy_example("svc", "echo", "");
    let stdout = server.cli_ok(&["traffic", "svc", "1=100", "--shadow", "2:100"]);
    assert_eq!(stdout.trim(), "svc (revision 1): 1=100 shadow 2:100");
    for i in 0..5 {
        let body = format!("payload {i}");
        let a = server.request("POST", "/fn/svc/x", &[], body.as_bytes());
        assert_eq!((a.status, a.text()), (200, body));
    }
    // Pinned to a version: nobody wants a copy of a request aimed at one version.
    for _ in 0..3 {
        assert_eq!(server.get("/fn/svc@1/").status, 200);
        assert_eq!(
            server
                .request("GET", "/fn/svc/", &[("x-kiln-version", "1")], b"")
                .status,
            200
        );
    }
    let s = shadow_stats(&server, 2, 5);
    std::thread::sleep(Duration::from_millis(500));
    let s2 = shadow_stats(&server, 2, 5);
    assert_eq!(s["shadow"]["compared"], 5, "{s}");
    assert_eq!(
        s2["shadow"]["compared"], 5,
        "forced requests were copied: {s2}"
    );
    assert_eq!(s["shadow"]["mismatches"], 0, "{s}");
    // A large upload goes to the primary alone; the copy is counted as skipped.
    let big = vec![b'x'; 2 << 20];
    let a = server.request("POST", "/fn/svc/x", &[], &big);
    assert_eq!((a.status, a.body.len()), (200, big.len()));
    let s = shadow_stats(&server, 2, 6);
    assert_eq!(
        (
            s["shadow"]["compared"].clone(),
            s["shadow"]["skipped"].clone()
        ),
        (json!(5), json!(1)),
        "{s}"
    );

    for (bad, why) in [
        (
            json!({"weights": {"1": 100}, "shadow": {"version": 9, "percent": 100}}),
            "version 9",
        ),
        (
            json!({"weights": {"1": 100}, "shadow": {"version": 2, "percent": 0}}),
            "percent",
        ),
        (
            json!({"weights": {"1": 100}, "shadow": {"version": 2}}),
            "percent",
        ),
    ] {
        let a = set(&server, &bad);
        assert_eq!(a.status, 400, "{bad}");
        assert!(a.text().contains(why), "{bad}: {}", a.text());
    }
}
