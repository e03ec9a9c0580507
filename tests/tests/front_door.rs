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
    let server = TestServer::start_with_config(&format!(
        "header_timeout_ms = 60000\n[server]\nbody_buffer_mb = {budget_mb}\nmax_connections = 1100\nidle_timeout_ms = 60000\n"
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
