//! Outbound HTTP from guests over real HTTP: the allowlist, the host-side timeout, and
//! the refusal of the server's own network unless the operator allows it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_tests::{TestServer, example};
use serde_json::json;

/// A local upstream on a free port: answers every request with `pong`, or (`silent`)
/// accepts connections and never answers. Returns its port.
fn upstream(silent: bool) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            if silent {
                held.push(conn);
                continue;
            }
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\npong",
                );
            });
        }
    });
    port
}

#[test]
fn outbound_http_is_denied_unless_allowed_and_bounded_in_time() {
    let (up, silent) = (upstream(false), upstream(true));
    // A port nobody may call: it must never see a connection.
    let never = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    never.set_nonblocking(true).unwrap();
    let never_port = never.local_addr().unwrap().port();

    // Upstreams on loopback: the operator opts in to private addresses.
    let server = TestServer::start_with_config(
        "[runtime]\noutbound_timeout_ms = 700\nallow_private_outbound = true\n",
    );
    server.deploy_toml(
        "caller",
        "hostile",
        &format!(
            "allowed_outbound_hosts = [\"http://127.0.0.1:{up}\", \"http://localhost:*\"]\n[limits]\ntimeout_ms = 5000\n"
        ),
    );
    let v = server.get("/v1/functions/caller/versions/1").json();
    assert_eq!(
        v["allowed_outbound_hosts"],
        json!([format!("http://127.0.0.1:{up}"), "http://localhost:*"])
    );

    let call_out = |url: String| server.get(&format!("/fn/caller/outbound?url={url}")).text();
    assert_eq!(
        call_out(format!("http://127.0.0.1:{up}/ping")),
        "status 200\n"
    );
    assert_eq!(
        call_out(format!("http://localhost:{up}/ping")),
        "status 200\n",
        "a port wildcard"
    );
    // Denied before any connection, naming the address.
    let denied = call_out(format!("http://127.0.0.1:{never_port}/"));
    assert!(
        denied.contains(&format!(
            "outbound HTTP to http://127.0.0.1:{never_port} is not allowed"
        )),
        "{denied}"
    );
    let https = call_out(format!("https://127.0.0.1:{up}/"));
    assert!(https.contains("not allowed"), "another scheme: {https}");
    assert!(
        matches!(never.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a denied call connected"
    );

    // An allowed upstream that never answers: cut off by the host-side timeout, so the
    // guest sees the error and answers (past the request's own 5 s it would be a 504).
    let deploy = server.deploy_manifest(
        "slow-caller",
        &json!({"component": server.put_blob(&std::fs::read(example("hostile")).unwrap()),
                "allowed_outbound_hosts": [format!("http://127.0.0.1:{silent}")],
                "limits": {"timeout_ms": 5000}}),
    );
    assert_eq!(deploy.status, 201, "{}", deploy.text());
    let a = server.get(&format!(
        "/fn/slow-caller/outbound?url=http://127.0.0.1:{silent}/"
    ));
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(a.text().contains("Timeout"), "{}", a.text());

    // Bad entries are refused at deploy, naming them.
    let bad = server.deploy_manifest(
        "bad-caller",
        &json!({"component": server.put_blob(&std::fs::read(example("hostile")).unwrap()),
                "allowed_outbound_hosts": ["ftp://files.example.com"]}),
    );
    assert_eq!(
        (bad.status, bad.error_code().as_str()),
        (400, "request.invalid")
    );
    assert!(
        bad.text().contains("ftp://files.example.com"),
        "{}",
        bad.text()
    );

    // Without the operator's opt-in, a manifest cannot open the server's own network:
    // loopback, by address or by a name resolving to it, is refused before connecting.
    let locked = TestServer::start();
    let a = locked.deploy_manifest(
        "caller",
        &json!({"component": locked.put_blob(&std::fs::read(example("hostile")).unwrap()),
                "allowed_outbound_hosts": [format!("http://127.0.0.1:{never_port}"), "http://localhost:*"]}),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    for url in [
        format!("http://127.0.0.1:{never_port}/"),
        format!("http://localhost:{never_port}/"),
    ] {
        let why = locked.get(&format!("/fn/caller/outbound?url={url}")).text();
        assert!(why.contains("non-public address"), "{url}: {why}");
    }
    assert!(
        matches!(never.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a refused call connected"
    );
}

/// An upstream answering 503 until `healthy` is set, then 200. Returns its port.
fn switchable(healthy: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let healthy = healthy.clone();
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let status = match healthy.load(std::sync::atomic::Ordering::SeqCst) {
                    true => "200 OK",
                    false => "503 Service Unavailable",
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                );
            });
        }
    });
    port
}

#[test]
fn a_failing_upstream_opens_the_functions_breaker_which_fails_fast_then_recovers() {
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let up = switchable(healthy.clone());
    let server = TestServer::start_with_config(
        "[runtime]\nallow_private_outbound = true\nbreaker_failures = 3\nbreaker_cooldown_ms = 400\n",
    );
    let manifest = |name: &str| {
        server.deploy_manifest(
            name,
            &json!({"component": server.put_blob(&std::fs::read(example("hostile")).unwrap()),
                    "allowed_outbound_hosts": [format!("http://127.0.0.1:{up}")]}),
        )
    };
    assert_eq!(manifest("caller").status, 201);
    assert_eq!(manifest("neighbour").status, 201);
    let call = |f: &str| {
        server
            .get(&format!("/fn/{f}/outbound?url=http://127.0.0.1:{up}/"))
            .text()
    };
    let destination = format!("http://127.0.0.1:{up}");
    let series = |metric: &str, f: &str| {
        let text = server.get("/metrics").text();
        kiln_tests::metric_sample(
            &text,
            &format!("{metric}{{function=\"{f}\",destination=\"{destination}\"}}"),
        )
    };
    // Three 503s in a row reach the upstream; then the breaker is open and calls fail at
    // once in the guest, with an error that names it.
    for _ in 0..3 {
        assert_eq!(call("caller"), "status 503\n");
    }
    let fast = call("caller");
    assert!(
        fast.contains("circuit breaker open") && fast.contains(&destination),
        "{fast}"
    );
    assert_eq!(series("kiln_outbound_breaker_state", "caller"), 1.0);
    assert_eq!(series("kiln_outbound_breaker_opened_total", "caller"), 1.0);
    // Another function's calls to the same host are its own business.
    assert_eq!(call("neighbour"), "status 503\n");

    // The upstream recovers; after the cool-down one trial call goes through and closes it.
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(call("caller"), "status 200\n");
    assert_eq!(call("caller"), "status 200\n");
    assert_eq!(series("kiln_outbound_breaker_state", "caller"), 0.0);

    // Deleted, the function's breaker series go with it.
    assert_eq!(
        server
            .request("DELETE", "/v1/functions/caller", &[], b"")
            .status,
        200
    );
    assert!(
        !server
            .get("/metrics")
            .text()
            .contains("function=\"caller\""),
        "series of a deleted function remain"
    );
}
