//! `GET /metrics`: Prometheus text with the FaaS-named metrics, counted from real requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_tests::{TestServer, json, metric_sample};

#[test]
fn metrics_count_invocations_by_outcome_cold_starts_inference_and_compiles() {
    let server = TestServer::start();
    server.deploy_example("hello", "hello", "");
    server.deploy_example("hostile", "hostile", "timeout_ms=200");
    server.deploy_digits("digits", json!({}));

    for _ in 0..3 {
        assert_eq!(server.get("/fn/hello/").status, 200);
    }
    assert_eq!(server.get("/fn/hostile/loop").status, 504);
    assert_eq!(server.get("/fn/hostile/panic").status, 500);
    let pixels = json!({"pixels": vec![0; 64]}).to_string();
    assert_eq!(
        server
            .request("POST", "/fn/digits/", &[], pixels.as_bytes())
            .status,
        200
    );
    assert_eq!(server.get("/fn/nothing/").status, 404);

    let a = server.get("/metrics");
    assert_eq!(a.status, 200);
    assert!(
        a.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = a.text();
    let inv = |f: &str, v: u32, o: &str| {
        metric_sample(
            &text,
            &format!(
                "kiln_faas_invocations_total{{function=\"{f}\",version=\"{v}\",outcome=\"{o}\"}}"
            ),
        )
    };
    assert_eq!(inv("hello", 1, "ok"), 3.0);
    assert_eq!(inv("hostile", 1, "timeout"), 1.0);
    assert_eq!(inv("hostile", 1, "trap"), 1.0);
    assert_eq!(inv("digits", 1, "ok"), 1.0);
    assert_eq!(
        metric_sample(
            &text,
            "kiln_faas_invoke_duration_seconds_count{function=\"hello\",version=\"1\",status_class=\"2xx\"}"
        ),
        3.0
    );
    // The trap and the timeout are timed as the 5xx they were answered with.
    assert_eq!(
        metric_sample(
            &text,
            "kiln_faas_invoke_duration_seconds_count{function=\"hostile\",version=\"1\",status_class=\"5xx\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_sample(
            &text,
            "kiln_nn_inference_duration_seconds_count{backend=\"tract\",device=\"cpu\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_sample(&text, "kiln_compile_duration_seconds_count"),
        3.0
    );
    assert_eq!(metric_sample(&text, "kiln_faas_active_instances"), 0.0);
    // No per-request or tenant labels, and nothing for unknown functions.
    assert!(
        !text.contains("request_id") && !text.contains("nothing"),
        "{text}"
    );

    // Deployed versions are warm; after a restart the first request is a cold start.
    let mut server = server;
    server.restart();
    assert_eq!(server.get("/fn/hello/").status, 200);
    let text = server.get("/metrics").text();
    assert_eq!(
        metric_sample(&text, "kiln_faas_coldstarts_total{function=\"hello\"}"),
        1.0
    );
}
