//! The front door under floods: HTTP/2 clients pushing many large bodies at a function with
//! a response cache, a thousand idle connections, connections past `max_connections`, and
//! connections that never send a request. The server's memory stays within its documented
//! bound (`[server] body_buffer_mb` plus a small per-connection allowance), refusals are
//! fast 503s, and the other functions keep answering throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln_tests::TestServer;

/// Kibibytes of a process's resident memory (`VmRSS`) or its peak (`VmHWM`).
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Lets this test process hold a few thousand sockets.
fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn addr(s: &TestServer) -> String {
    s.url.trim_start_matches("http://").to_string()
}

/// Sends `streams` POSTs with `mib` MiB bodies each on one HTTP/2 connection, all at
/// once; returns each one's status (0: the stream failed).
async fn h2_flood(addr: String, streams: usize, mib: usize) -> Vec<u16> {
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let chunk = Bytes::from(vec![b'k'; 1 << 20]);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let mut sender = sender.clone();
        let chunk = chunk.clone();
        let addr = addr.clone();
        tasks.spawn(async move {
            let frames = (0..mib).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone())));
            let body = StreamBody::new(futures::stream::iter(frames));
            let req = http::Request::post(format!("http://{addr}/fn/cached/"))
                .header("content-length", (mib << 20).to_string())
                .body(body)
                .unwrap();
            if sender.ready().await.is_err() {
                return 0;
            }
            match sender.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let _ = resp.into_body().collect().await;
                    status
                }
                Err(_) => 0,
            }
        });
    }
    tasks.join_all().await
}

#[test]
fn h2_floods_of_large_bodies_and_idle_connections_leave_memory_bounded() {
    raise_open_files();
    let budget_mb = 64;
    // One tenant floods here, and may use the whole budget (the part per tenant has a test
    // of its own).
    let server = TestServer::start_with_config(&format!(
        "header_timeout_ms = 60000\n[server]\nbody_buffer_mb = {budget_mb}\nbody_buffer_tenant_percent = 100\nmax_connections = 1100\nidle_timeout_ms = 60000\n"
    ));
    // Public: the flood needs no key, as on the internet.
    server.deploy_toml(
        "cached",
        "hello",
        "public = true\n[cache]\nresponses = { ttl = \"60s\" }\n",
    );
    server.deploy_example("other", "hello", "");
    assert_eq!(server.get("/fn/other/").status, 200);
    assert_eq!(server.get("/fn/cached/").status, 200);
    let pid = server.pid();
    let before = memory_kib(pid, "VmRSS:");

    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(addr(&server)).unwrap())
        .collect();
    let flood = {
        let addr = addr(&server);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let a = tokio::spawn(h2_flood(addr.clone(), 200, 16));
                let b = tokio::spawn(h2_flood(addr, 200, 16));
                let mut all = a.await.unwrap();
                all.extend(b.await.unwrap());
                all
            })
        })
    };
    // Other functions keep answering while the flood runs.
    let mut others = 0;
    while !flood.is_finished() {
        let a = server.get("/fn/other/");
        assert_eq!(a.status, 200, "{}", a.text());
        others += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let statuses = flood.join().unwrap();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    // 503 at the body budget; 408 for a stream admitted so late in its timeout that its
    // body could not arrive in the rest of it.
    let busy = statuses.iter().filter(|s| matches!(**s, 503 | 408)).count();
    assert!(ok > 0, "some streams were served: {statuses:?}");
    assert_eq!(
        ok + busy,
        statuses.len(),
        "every stream is answered 200, or 503 at the body budget (408 past its time): {statuses:?}"
    );
    let peak = memory_kib(pid, "VmHWM:");
    let after = memory_kib(pid, "VmRSS:");
    // The documented bound: the body budget, plus per-connection buffers (HTTP/2 windows
    // of 256 KiB, small HTTP/1 read buffers) and allocator slack.
    let bound_kib = before + (budget_mb + 128) * 1024;
    assert!(
        peak < bound_kib,
        "peak RSS {peak} KiB, before {before} KiB, bound {bound_kib} KiB ({ok} ok, {busy} busy, {others} other calls)"
    );
    assert!(others > 0);
    drop(idle);
    let metrics = server.get("/metrics").text();
    assert!(metrics.contains("kiln_connections_open"), "{metrics}");
    eprintln!(
        "flood: {ok} ok, {busy} busy; RSS before {before} KiB, peak {peak} KiB, after {after} KiB"
    );
}

#[test]
fn connections_past_the_limit_get_a_fast_503_and_silent_ones_are_closed() {
    let server = TestServer::start_with_config(
        "header_timeout_ms = 600\n[server]\nmax_connections = 4\nidle_timeout_ms = 600\n",
    );
    server.deploy_example("hello", "hello", "");
    // The test client's pooled connection is closed as idle first.
    std::thread::sleep(Duration::from_millis(1500));
    // Four connections that say nothing hold every slot.
    let held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(addr(&server)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut extra = TcpStream::connect(addr(&server)).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = extra.write_all(b"GET /fn/hello/ HTTP/1.1\r\nhost: x\r\n\r\n");
    let mut answer = String::new();
    extra.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"server.busy\""), "{answer}");

    // A connection that sends nothing is closed once the header timeout passes (for
    // HTTP/2 prior knowledge as for HTTP/1: nothing told the server which yet).
    let started = Instant::now();
    for mut c in held {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).unwrap_or(usize::MAX);
        assert_eq!(n, 0, "a silent connection is closed, not left open");
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // Slots are free again.
    assert_eq!(server.get("/fn/hello/").status, 200);

    // An HTTP/2 connection that served a request and then idles is closed too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://{}/fn/hello/", addr(&server));
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(
            url.trim_start_matches("http://").split('/').next().unwrap(),
        )
        .await
        .unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let req = http::Request::get(&url)
            .header("authorization", kiln_tests::ADMIN_BEARER)
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        drop(resp);
        let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
        assert!(
            ended.is_ok(),
            "the idle HTTP/2 connection was closed by the server"
        );
    });
    let metrics = server.get("/metrics").text();
    assert!(
        kiln_tests::metric_sample(&metrics, "kiln_connections_refused_total") >= 1.0,
        "{metrics}"
    );
}

#[test]
fn a_cache_hit_without_a_body_needs_no_slot_and_a_slow_response_is_not_idle() {
    let server = TestServer::start_with_config(
        "max_body_bytes = 67108864\nheader_timeout_ms = 1000\ndrain_timeout_ms = 300\n[runtime]\nqueue_depth = 0\n[server]\nidle_timeout_ms = 1000\n",
    );
    server.deploy_toml(
        "c",
        "hello",
        "[limits]\nmax_concurrency = 1\n[cache]\nresponses = { ttl = \"60s\" }\n",
    );
    let first = server.get("/fn/c/");
    assert_eq!(
        (first.status, first.header("x-kiln-cache")),
        (200, Some("miss"))
    );
    // An upload that trickles holds the only slot while its body is read...
    let mut slow = TcpStream::connect(addr(&server)).unwrap();
    write!(
        slow,
        "POST /fn/c/ HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ncontent-length: 100\r\n\r\n0123456789",
        kiln_tests::ADMIN_BEARER
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // ...and with no queue a request needing a slot is refused, but a hit needs none.
    let busy = server.request("POST", "/fn/c/", &[], b"other body");
    assert_eq!(
        (busy.status, busy.error_code().as_str()),
        (503, "function.overloaded"),
        "{}",
        busy.text()
    );
    let hit = server.get("/fn/c/");
    assert_eq!(
        (hit.status, hit.header("x-kiln-cache")),
        (200, Some("hit")),
        "{}",
        hit.text()
    );
    drop(slow);

    // A response still being sent is not idle: a 32 MiB echo read slowly arrives whole,
    // long after the idle and drain timeouts (1 s, 300 ms).
    server.deploy_toml("echo", "echo", "[limits]\nmemory_mb = 512\n");
    let mut conn = TcpStream::connect(addr(&server)).unwrap();
    let size = 32usize << 20;
    let mut writer = conn.try_clone().unwrap();
    let head = format!(
        "POST /fn/echo/ HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n",
        kiln_tests::ADMIN_BEARER
    );
    let sender = std::thread::spawn(move || {
        writer.write_all(head.as_bytes()).unwrap();
        let chunk = vec![b'e'; 1 << 20];
        for _ in 0..32 {
            if writer.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    let mut answer = Vec::new();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.read_to_end(&mut answer).unwrap();
    sender.join().unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let body = &answer[split..];
    // Chunked or not, every byte sent came back.
    let echoed = body.iter().filter(|b| **b == b'e').count();
    assert_eq!(echoed, size, "{head}");
}

/// Sends `head` (a request head announcing a body), then the body `chunk` bytes at a time
/// every `every`, `total` bytes in all or until the server answers; returns the status and
/// the body of its answer.
fn trickle(addr: &str, head: &str, total: usize, chunk: usize, every: Duration) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut sent = 0;
        while sent < total {
            let n = chunk.min(total - sent);
            if writer.write_all(&vec![b'k'; n]).is_err() {
                return;
            }
            sent += n;
            std::thread::sleep(every);
        }
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let (status, body) = read_answer(&mut stream);
    drop(stream);
    let _ = sender.join();
    (status, body)
}

/// Reads one HTTP/1.1 answer, its body sized by `content-length` or chunked.
fn read_answer(stream: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    let mut body = Vec::new();
    if chunked {
        let mut reader = std::io::BufReader::new(stream);
        loop {
            let mut size = String::new();
            if std::io::BufRead::read_line(&mut reader, &mut size).unwrap_or(0) == 0 {
                break;
            }
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0u8; n + 2];
            if n == 0 || reader.read_exact(&mut chunk).is_err() {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(len, 0);
        let _ = stream.read_exact(&mut body);
    }
    (status, String::from_utf8_lossy(&body).to_string())
}

#[test]
fn a_trickled_body_is_cut_off_at_the_floor_and_a_steady_one_is_not() {
    let server = TestServer::start_with_config(
        "[server]\nmin_body_bytes_per_s = 1000\nmin_body_rate_grace_ms = 1000\n",
    );
    server.deploy_example("echo", "echo", "");
    server.deploy_example("cached", "echo", "cache_ttl=60s");
    let addr = addr(&server);
    let auth = format!("authorization: Bearer {}", kiln_tests::ADMIN_KEY);
    let blob = vec![b'k'; 8000];
    let digest = kiln_tests::digest(&blob);
    let head = |path: &str| {
        format!("POST {path} HTTP/1.1\r\nhost: kiln\r\n{auth}\r\ncontent-length: 8000\r\n\r\n")
    };
    let put = format!(
        "PUT /v1/blobs/{digest} HTTP/1.1\r\nhost: kiln\r\n{auth}\r\ncontent-length: 8000\r\n\r\n"
    );
    // 20 bytes every 100 ms is 200 bytes/s: cut off once the wait outgrows the grace
    // and what arrived (a second or two in), on every path a body takes.
    for (what, head) in [
        ("a blob upload", put.clone()),
        ("a body streamed into a guest", head("/fn/echo/")),
        (
            "a body read whole for the response cache",
            head("/fn/cached/"),
        ),
    ] {
        let started = Instant::now();
        let (status, body) = trickle(&addr, &head, 8000, 20, Duration::from_millis(100));
        assert_eq!(status, 408, "{what}: {body}");
        assert!(body.contains("request.timeout"), "{what}: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: cut off at the floor, not at a timeout"
        );
    }
    // 400 bytes every 100 ms is four times the floor, and takes two seconds: well past
    // the grace, so the floor is in force for the second half, yet served.
    let (status, body) = trickle(&addr, &put, 8000, 400, Duration::from_millis(100));
    assert_eq!(status, 201, "{body}");
    let (status, body) = trickle(
        &addr,
        &head("/fn/echo/"),
        8000,
        400,
        Duration::from_millis(100),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.len(), 8000, "the echo came back whole");
}

#[test]
fn one_tenants_flood_of_buffered_bodies_leaves_the_rest_of_the_budget_to_others() {
    // 2 MiB of request bodies held at once, 1 MiB of it at most for one tenant (and no
    // floor under upload speed: the held uploads stall on purpose).
    let server = TestServer::start_with_config(
        "max_body_bytes = 1048576\n[server]\nbody_buffer_mb = 2\nbody_buffer_tenant_percent = 50\nmin_body_bytes_per_s = 0\n",
    );
    let (a, _) = server.create_key("team-a", &["deploy:a-*", "invoke:a-*"], None);
    let (b, _) = server.create_key("team-b", &["deploy:b-*", "invoke:b-*"], None);
    assert_eq!(
        server
            .deploy_as(&a, "a-cached", "echo", "cache_ttl=60s")
            .status,
        201
    );
    assert_eq!(
        server
            .deploy_as(&b, "b-cached", "echo", "cache_ttl=60s")
            .status,
        201
    );
    let addr = addr(&server);
    // Team A's uploads each send 400 KiB of the 512 KiB they announce, then wait.
    let head = |key: &str, f: &str, len: usize| {
        format!(
            "POST /fn/{f}/ HTTP/1.1\r\nhost: kiln\r\nauthorization: Bearer {key}\r\ncontent-length: {len}\r\n\r\n"
        )
    };
    let mut sent = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(head(&a, "a-cached", 512 << 10).as_bytes())
            .unwrap();
        let _ = s.write_all(&vec![b'a'; 400 << 10]);
        sent.push(s);
    }
    // Whatever is refused is answered at once; a second is ample on a busy machine.
    std::thread::sleep(Duration::from_secs(1));
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for mut s in sent {
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut probe = [0u8; 1];
        match s.peek(&mut probe) {
            // It answered: refused at the tenant's part.
            Ok(n) if n > 0 => {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                refused.push(read_answer(&mut s));
            }
            _ => held.push(s),
        }
    }
    assert_eq!(held.len(), 2, "two uploads fit team A's 1 MiB: {refused:?}");
    for (status, body) in &refused {
        assert_eq!(*status, 503, "{body}");
        assert!(
            body.contains("server.busy") && body.contains("team-a"),
            "{body}"
        );
    }
    // Team B's request still finds room: the rest of the budget is not team A's.
    let (status, body) = trickle(
        &addr,
        &head(&b, "b-cached", 400 << 10),
        400 << 10,
        400 << 10,
        Duration::ZERO,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.len(), 400 << 10);
    drop(held);
}
