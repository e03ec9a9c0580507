//! One definition of a request's outcome, seen the same way by the usage ledger and by
//! `/metrics`; an honest meter: guest time is never zero for a guest that ran and never
//! more than the request's wall time, a cold start says so, and a client that hangs up
//! after the response head is `cancelled`, not `ok`. Refused requests (401/404/429) make
//! no record.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use kiln_tests::{Record, TestServer, metric_sample, usage_csv};

const CONFIG: &str =
    "max_body_bytes = 67108864\n[metering]\nenabled = true\ncommit_interval_ms = 50\n";

/// The records of `function` once there are `n`.
fn records(server: &TestServer, function: &str, n: usize) -> Vec<Record> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = usage_csv(server, &format!("&function={function}"));
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{function}: {} of {n} records",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn guest_time_is_positive_and_within_wall_time_and_cold_starts_say_so() {
    let server = TestServer::start_with_config(CONFIG);
    let mut server = server;
    server.deploy_example("hello", "hello", "");
    server.deploy_example("hostile", "hostile", "timeout_ms=300");
    // Versions are loaded when first called after a start: the restart makes the next
    // call to hello cold.
    server.restart();
    let ids: Vec<String> = (0..3)
        .map(|_| {
            let a = server.get("/fn/hello/");
            assert_eq!(a.status, 200);
            a.header("x-kiln-request-id").unwrap().to_string()
        })
        .collect();
    // Warm: the spin below is then all guest time, no load inside its wall time.
    assert_eq!(server.get("/fn/hostile/counter").status, 200);
    assert_eq!(server.get("/fn/hostile/loop").status, 504);
    let hello = records(&server, "hello", 3);
    let hostile = records(&server, "hostile", 2);
    for r in hello.iter().chain(&hostile) {
        let (cpu, wall) = (r.num("cpu_us"), r.num("wall_us"));
        assert!(cpu > 0, "a guest that ran used no time: {r:?}");
        assert!(cpu <= wall, "guest time beyond wall time: {r:?}");
    }
    // The first request loaded the version: cold. The next ones found it loaded.
    let cold = |id: &str| {
        hello
            .iter()
            .find(|r| r.get("request_id") == id)
            .map(|r| r.get("cold").to_string())
            .unwrap()
    };
    assert_eq!(cold(&ids[0]), "true");
    assert_eq!(
        (cold(&ids[1]).as_str(), cold(&ids[2]).as_str()),
        ("false", "false")
    );
    // A loop that spins to its timeout is on a thread nearly all of it.
    let r = hostile
        .iter()
        .find(|r| r.get("outcome") == "timeout")
        .unwrap();
    assert!(r.num("cpu_us") * 2 >= r.num("wall_us"), "{r:?}");
}

#[test]
fn a_client_that_hangs_up_after_the_head_is_cancelled_in_the_ledger_and_the_metrics() {
    let server = TestServer::start_with_config(CONFIG);
    server.deploy_example("echo", "echo", "memory_mb=512");
    let addr = server.url.trim_start_matches("http://").to_string();
    let body = vec![b'e'; 32 << 20];

    // Send a large body to echo back, read only the head of the answer, and hang up.
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "POST /fn/echo/ HTTP/1.1\r\nhost: kiln\r\nauthorization: {}\r\ncontent-length: {}\r\n\r\n",
        kiln_tests::ADMIN_BEARER,
        body.len()
    )
    .unwrap();
    let mut writer = conn.try_clone().unwrap();
    let sent = body.clone();
    let sending = std::thread::spawn(move || writer.write_all(&sent));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(conn.read(&mut byte).unwrap(), 1, "closed before the head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    sending.join().unwrap().unwrap();
    conn.shutdown(std::net::Shutdown::Both).unwrap();
    drop(conn);

    // A HEAD (no body to send) and one that reads everything are complete: ok.
    let a = server.request("HEAD", "/fn/echo/", &[], b"");
    assert_eq!(a.status, 200);
    let a = server.request("POST", "/fn/echo/", &[], b"all of it");
    assert_eq!((a.status, a.text().as_str()), (200, "all of it"));

    let got = records(&server, "echo", 3);
    let hung_up = got
        .iter()
        .find(|r| r.num("bytes_in") == body.len() as u64)
        .unwrap();
    assert_eq!(hung_up.get("outcome"), "cancelled", "{hung_up:?}");
    assert_eq!(
        hung_up.num("status"),
        200,
        "the status its head was sent with"
    );
    assert!(hung_up.num("bytes_out") < body.len() as u64, "{hung_up:?}");
    let whole = got.iter().find(|r| r.num("bytes_in") == 9).unwrap();
    assert_eq!(whole.get("outcome"), "ok", "{whole:?}");
    let head = got.iter().find(|r| r.num("bytes_in") == 0).unwrap();
    assert_eq!(head.get("outcome"), "ok", "a HEAD is complete: {head:?}");

    // /metrics says the same, and times each answer under its status class.
    let text = server.get("/metrics").text();
    let sample = |outcome: &str| {
        metric_sample(
            &text,
            &format!(
                "kiln_faas_invocations_total{{function=\"echo\",version=\"1\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!((sample("cancelled"), sample("ok")), (1.0, 2.0), "{text}");
    assert_eq!(
        metric_sample(
            &text,
            "kiln_faas_invoke_duration_seconds_count{function=\"echo\",version=\"1\",status_class=\"2xx\"}"
        ),
        3.0,
        "{text}"
    );
}

#[test]
fn refused_requests_make_no_record_and_deleted_functions_leave_no_series() {
    let server = TestServer::start_with_config(CONFIG);
    server.deploy_example("hello", "hello", "rate=2/h");
    assert_eq!(server.get("/fn/hello/").status, 200);
    // Without a key, with a key that may not invoke it, to a version that does not
    // exist, over the function's rate: refused before any version runs.
    assert_eq!(server.call_as("", "GET", "/fn/hello/", b"").status, 401);
    let (other, _) = server.create_key("other", &["invoke:*"], None);
    assert_eq!(server.call_as(&other, "GET", "/fn/hello/", b"").status, 404);
    assert_eq!(server.get("/fn/hello@9/").status, 404);
    assert_eq!(server.get("/fn/hello/").status, 429);
    // A request that reaches a version does get its record, whatever the answer: here a
    // second deploy lifts the rate limit, and the answer is counted.
    server.deploy_example("hello", "hello", "");
    assert_eq!(server.get("/fn/hello/").status, 200);
    let got = records(&server, "hello", 2);
    std::thread::sleep(Duration::from_millis(300));
    let got_later = usage_csv(&server, "&function=hello");
    assert_eq!((got.len(), got_later.len()), (2, 2), "{got_later:?}");
    let text = server.get("/metrics").text();
    assert!(
        text.contains("kiln_auth_refusals_total{reason=\"rate_limited\"} 1"),
        "{text}"
    );

    // Deleted: its series go from /metrics.
    assert!(text.contains("function=\"hello\""), "{text}");
    assert_eq!(
        server
            .request("DELETE", "/v1/functions/hello", &[], b"")
            .status,
        200
    );
    let text = server.get("/metrics").text();
    assert!(!text.contains("function=\"hello\""), "{text}");
}
