//! Hostile guests and limits: each misbehaviour gets a clear answer while every other
//! function keeps answering.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kiln_tests::TestServer;

fn server_with_hostile(query: &str) -> TestServer {
    let server = TestServer::start();
    server.deploy_example("hostile", "hostile", query);
    server.deploy_example("hello", "hello", "max_concurrency=500");
    server
}

#[test]
fn infinite_loop_answers_504_within_timeout_while_others_answer() {
    let server = server_with_hostile("timeout_ms=500");
    let started = Instant::now();
    let looping = kiln_tests::spawn_get(format!("{}/fn/hostile/loop", server.url));
    // While the loop spins, another function answers at once.
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..20 {
        assert_eq!(server.get("/fn/hello/").status, 200);
    }
    let (status, body) = looping.join().unwrap();
    let elapsed = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("function.timeout"), "{body}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert_eq!(server.get("/fn/hello/").status, 200);
}

#[test]
fn memory_hog_recursion_and_panic_answer_500() {
    let server = server_with_hostile("memory_mb=32");
    for path in [
        "/fn/hostile/hog",
        "/fn/hostile/recurse",
        "/fn/hostile/panic",
    ] {
        let a = server.get(path);
        assert_eq!(a.status, 500, "{path}: {}", a.text());
        assert_eq!(a.error_code(), "function.trap", "{path}");
        assert_eq!(server.get("/fn/hello/").status, 200, "after {path}");
    }
    let hog = server.get("/fn/hostile/hog").json();
    let msg = hog["error"]["message"].as_str().unwrap();
    assert!(msg.contains("memory"), "{msg}");
    let rec = server.get("/fn/hostile/recurse").json();
    assert!(
        rec["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stack overflow")
    );
}

#[test]
fn guest_globals_never_leak_across_requests() {
    let server = server_with_hostile("");
    for _ in 0..10 {
        let a = server.get("/fn/hostile/counter");
        assert_eq!((a.status, a.text().as_str()), (200, "1\n"));
    }
}

#[test]
fn sandbox_grants_no_env_no_files_no_outbound_http() {
    let server = server_with_hostile("");
    let a = server.get("/fn/hostile/sandbox");
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.text(),
        "env=0 fs=false outbound=ErrorCode::InternalError(Some(\"outbound HTTP to http://example.com:80 is not allowed (allowed_outbound_hosts: none)\"))\n"
    );
}

#[test]
fn five_hundred_concurrent_requests_are_all_answered() {
    let server = server_with_hostile("");
    let url = server.url.clone();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(500));
    let threads: Vec<_> = (0..500)
        .map(|_| {
            let url = url.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let agent = kiln_tests::agent();
                barrier.wait();
                let mut r = agent
                    .get(format!("{url}/fn/hello/"))
                    .header("authorization", kiln_tests::ADMIN_BEARER)
                    .call()
                    .unwrap();
                (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), (200, "hello\n".to_string()));
    }
}

#[test]
fn busy_function_with_full_queue_answers_503_with_retry_after() {
    let server = TestServer::start_with_config("[runtime]\nqueue_depth = 0\n");
    server.deploy_example("one", "hostile", "max_concurrency=1");
    server.deploy_example("hello", "hello", "");
    let busy = kiln_tests::spawn_get(format!("{}/fn/one/sleep?ms=1500", server.url));
    std::thread::sleep(Duration::from_millis(400));
    let a = server.get("/fn/one/counter");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (503, "function.overloaded")
    );
    assert_eq!(a.header("retry-after"), Some("1"));
    assert_eq!(server.get("/fn/hello/").status, 200);
    assert_eq!(busy.join().unwrap().0, 200);
    assert_eq!(server.get("/fn/one/counter").status, 200);
}

#[test]
fn request_body_over_limit_answers_413() {
    let server = TestServer::start_with_config("max_body_bytes = 1024\n");
    server.deploy_example("echo", "echo", "");
    let ok = server.request("POST", "/fn/echo/", &[], &[b'a'; 1024]);
    assert_eq!((ok.status, ok.body.len()), (200, 1024));
    let big = server.request("POST", "/fn/echo/", &[], &[b'a'; 4096]);
    assert_eq!(
        (big.status, big.error_code().as_str()),
        (413, "request.too_large")
    );
    // Without a content-length (chunked), the limit trips while streaming.
    let chunked = server.request(
        "POST",
        "/fn/echo/",
        &[("transfer-encoding", "chunked")],
        &[b'a'; 4096],
    );
    assert_eq!(chunked.status, 413, "{}", chunked.text());
    assert_eq!(
        server.request("POST", "/fn/echo/", &[], b"still fine").body,
        b"still fine"
    );
}
