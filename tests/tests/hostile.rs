//! Hostile guests and hostile clients, beyond the basics of isolation.rs: each gets a clear
//! answer, nothing on the host grows without bound, and every other function keeps
//! answering throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use kiln_tests::TestServer;

fn server() -> TestServer {
    let server = TestServer::start_with_config("header_timeout_ms = 1000\n");
    server.deploy_example("hostile", "hostile", "timeout_ms=5000");
    server.deploy_example("hello", "hello", "");
    server
}

fn still_serving(server: &TestServer) {
    let a = server.get("/fn/hello/");
    assert_eq!((a.status, a.text().as_str()), (200, "hello\n"));
}

#[test]
fn guests_that_abuse_host_calls_are_contained() {
    let server = server();
    // Resource handles made and never dropped: the handle table is capped, the guest traps.
    let a = server.get("/fn/hostile/handles");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (500, "function.trap"),
        "{}",
        a.text()
    );
    still_serving(&server);
    // A random-bytes bomb: refused before the host allocates it.
    let a = server.get("/fn/hostile/random?size=1073741824");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (500, "function.trap"),
        "{}",
        a.text()
    );
    let a = server.get("/fn/hostile/random?size=1024");
    assert_eq!(a.text(), "got 1024 bytes\n");
    // Header bombs (many small values, or one huge value): the host caps the bytes of a
    // header set and stops the guest that passes the cap; a modest set is fine.
    for query in ["count=100000&size=16", "count=1&size=10000000"] {
        let a = server.get(&format!("/fn/hostile/headers?{query}"));
        assert_eq!(
            (a.status, a.error_code().as_str()),
            (500, "function.trap"),
            "{query}: {}",
            a.text()
        );
        assert!(a.text().contains("fields exceeds limit"), "{}", a.text());
    }
    let a = server.get("/fn/hostile/headers?count=10&size=16");
    assert!(a.text().starts_with("accepted 10 of 10"), "{}", a.text());
    // Hop-by-hop and host headers are refused by name.
    let a = server.get("/fn/hostile/forbidden");
    for name in ["connection", "transfer-encoding", "upgrade", "host"] {
        assert!(
            a.text()
                .contains(&format!("{name}=Err(HeaderError::Forbidden)")),
            "{}",
            a.text()
        );
    }
    still_serving(&server);
}

/// Sends raw bytes on a new connection; returns what the server sent back until it closed
/// (or 5 s passed).
fn raw(server: &TestServer, bytes: &[u8]) -> String {
    let addr = server.url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn hostile_clients_get_an_answer_and_nothing_else() {
    let server = server();
    // Garbage bytes: 400, connection closed.
    let answer = raw(&server, b"\x16\x03\x01\x02\x00garbage\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    // Too many headers, or one huge header: 431 before any function runs.
    let mut many = String::from("GET /fn/hello/ HTTP/1.1\r\nhost: x\r\n");
    for i in 0..500 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = raw(&server, many.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    let huge = format!(
        "GET /fn/hello/ HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let answer = raw(&server, huge.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    still_serving(&server);
}

#[test]
fn slowloris_clients_are_cut_off_by_the_header_timeout() {
    let server = server();
    let addr = server.url.trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /fn/hello/ HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let started = Instant::now();
    // One header line every 200 ms, never finishing: the server must hang up.
    let cut_off = loop {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(b"x-slow: 1\r\n").is_err() {
            break true;
        }
        // The server may answer 408 before closing.
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => break true,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break true,
        }
        if started.elapsed() > Duration::from_secs(15) {
            break false;
        }
        // Meanwhile everyone else is served.
        still_serving(&server);
    };
    assert!(
        cut_off,
        "a client trickling headers for 15 s was never cut off"
    );
    still_serving(&server);
}

#[test]
fn hostile_components_are_refused_at_deploy() {
    let server = server();
    // A start function that grows its table without end.
    let grow = wat::parse_str(
        r#"(component
            (core module $m
                (table $t 1 funcref)
                (func $grow (loop (drop (table.grow $t (ref.null func) (i32.const 1000))) (br 0)))
                (start $grow))
            (core instance $i (instantiate $m)))"#,
    )
    .unwrap();
    let a = server.deploy_wasm("tables", &grow, "");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "component.instantiate_failed"),
        "{}",
        a.text()
    );
    assert!(a.text().contains("table"), "{}", a.text());
    // A start function that never returns: bounded by the version's timeout.
    let spin = wat::parse_str(
        r#"(component
            (core module $m (func $spin (loop (br 0))) (start $spin))
            (core instance $i (instantiate $m)))"#,
    )
    .unwrap();
    let a = server.deploy_wasm("spin", &spin, "timeout_ms=500");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "component.instantiate_failed"),
        "{}",
        a.text()
    );
    still_serving(&server);
    // Pathological compile input: more locals than any function may have is refused by
    // validation, before Cranelift runs...
    let a = server.deploy_wasm("locals", &component_with_function(1_000_000, &[0x0b]), "");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "component.invalid"),
        "{}",
        a.text()
    );
    assert!(a.text().contains("locals"), "{}", a.text());
    // ...and 50,000 nested blocks compile (or are refused) while the server keeps serving;
    // it then fails for what it is: not an HTTP handler.
    let depth = 50_000;
    let mut body = [0x02, 0x40].repeat(depth); // block (empty type)
    body.extend(std::iter::repeat_n(0x0b, depth + 1)); // end of each, then of the function
    let a = server.deploy_wasm("deep", &component_with_function(0, &body), "");
    assert_eq!(a.status, 400, "{}", a.text());
    still_serving(&server);
}

/// A component holding one core module with one function of type `() -> ()` that declares
/// `locals` i64 locals and has the instructions `code` (ending with `end`). Written byte by
/// byte: no text parser would accept (or survive) these shapes.
fn component_with_function(locals: u32, code: &[u8]) -> Vec<u8> {
    fn leb(mut v: usize, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
    }
    let mut body = Vec::new();
    if locals == 0 {
        leb(0, &mut body);
    } else {
        leb(1, &mut body); // one group of locals
        leb(locals as usize, &mut body);
        body.push(0x7e); // i64
    }
    body.extend_from_slice(code);
    let mut section = Vec::new();
    leb(1, &mut section); // one function body
    leb(body.len(), &mut section);
    section.extend(&body);
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    module.extend([0x01, 0x04, 0x01, 0x60, 0x00, 0x00]); // type section: () -> ()
    module.extend([0x03, 0x02, 0x01, 0x00]); // function section: one function of type 0
    module.push(0x0a); // code section
    leb(section.len(), &mut module);
    module.extend(&section);
    let mut component = b"\0asm\x0d\0\x01\0".to_vec();
    component.push(0x01); // core module section
    leb(module.len(), &mut component);
    component.extend(&module);
    component
}

#[test]
fn a_version_that_keeps_timing_out_sheds_load_instead_of_queueing() {
    let server = TestServer::start();
    server.deploy_example("slow", "hostile", "timeout_ms=300&max_concurrency=1");
    for _ in 0..3 {
        let a = server.get("/fn/slow/loop");
        assert_eq!(
            (a.status, a.error_code().as_str()),
            (504, "function.timeout")
        );
    }
    // Its one slot busy with another request that will time out, a newcomer is refused at
    // once (it would only have waited for a slot to time out in), saying why.
    let busy = kiln_tests::spawn_get(format!("{}/fn/slow/loop", server.url));
    std::thread::sleep(std::time::Duration::from_millis(100));
    let shed = server.get("/fn/slow/sandbox");
    assert_eq!(
        (shed.status, shed.error_code().as_str()),
        (503, "function.overloaded"),
        "{}",
        shed.text()
    );
    assert!(shed.text().contains("timed out"), "{}", shed.text());
    assert!(shed.header("retry-after").is_some());
    assert_eq!(busy.join().unwrap().0, 504);
    // A request that finds the slot free runs, and its success ends the shedding: the next
    // newcomer waits its turn behind a busy slot again.
    assert_eq!(server.get("/fn/slow/sandbox").status, 200);
    let busy = kiln_tests::spawn_get(format!("{}/fn/slow/sleep?ms=150", server.url));
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        server.get("/fn/slow/sandbox").status,
        200,
        "queued, then served"
    );
    assert_eq!(busy.join().unwrap().0, 200);
}

#[test]
fn guests_in_endless_loops_never_keep_other_functions_waiting() {
    let server = TestServer::start();
    // More looping guests than the server has worker threads (one per core), all running
    // at once (none queued behind the function's concurrency)...
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    server.deploy_example(
        "spinner",
        "hostile",
        &format!("timeout_ms=4000&max_concurrency={}", cores * 2),
    );
    server.deploy_example("hello", "hello", "");
    let loops: Vec<_> = (0..cores * 2)
        .map(|_| kiln_tests::spawn_get(format!("{}/fn/spinner/loop", server.url)))
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // ...and another function still answers while every one of them is running.
    for _ in 0..5 {
        assert_eq!(server.get("/fn/hello/").status, 200);
    }
    assert!(
        loops.iter().all(|l| !l.is_finished()),
        "the loops ended before hello was served: they held the workers"
    );
    for l in loops {
        assert_eq!(l.join().unwrap().0, 504);
    }
}
