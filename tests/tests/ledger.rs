//! What survives in the usage ledger: a graceful restart commits every pending record, a
//! `kill -9` under load loses at most the last commit interval (nothing in strict mode) and
//! never duplicates a record, and a request whose client gives up is still billed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_tests::{TestServer, usage, usage_csv};

/// Metering on, committed every 50 ms so the tests wait little.
const METERING: &str = "[metering]\nenabled = true\ncommit_interval_ms = 50\n";

#[test]
fn sigterm_commits_every_pending_record() {
    // Nothing would be committed on the timer during the test.
    let mut server =
        TestServer::start_with_config("[metering]\nenabled = true\ncommit_interval_ms = 5000\n");
    server.deploy_example("hello", "hello", "");
    let sent: BTreeSet<String> = (0..20)
        .map(|_| {
            let a = server.get("/fn/hello/");
            assert_eq!(a.status, 200);
            a.header("x-kiln-request-id").unwrap().to_string()
        })
        .collect();
    assert_eq!(sent.len(), 20, "request ids are unique");

    server.restart();
    let records = usage_csv(&server, "");
    assert_eq!(records.len(), 20);
    let recorded: BTreeSet<String> = records
        .iter()
        .map(|r| r.get("request_id").to_string())
        .collect();
    assert_eq!(recorded, sent);
    assert_eq!(usage(&server, "")["totals"]["requests"], 20);
}

/// Clients sending at once while the server is killed.
const CLIENTS: usize = 4;

/// What the clients saw of a server killed under load.
struct Crash {
    /// Request ids of the complete answers, with when each arrived.
    answered: Vec<(String, Instant)>,
    /// Requests the kill cut off (sent, never answered): at most one per client.
    cut_off: usize,
    killed_at: Instant,
}

/// One client: requests `url` until told to stop or cut off. Returns the request ids of its
/// complete answers with when each arrived, and whether its last request was cut off.
fn client(url: &str, stop: &AtomicBool) -> (Vec<(String, Instant)>, bool) {
    let agent = kiln_tests::agent();
    let mut answered = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut resp) = agent
            .get(url)
            .header("authorization", kiln_tests::ADMIN_BEARER)
            .call()
        else {
            return (answered, true);
        };
        let id = resp
            .headers()
            .get("x-kiln-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if resp.body_mut().read_to_string().is_err() {
            return (answered, true);
        }
        let id = id.expect("every answer has an x-kiln-request-id");
        answered.push((id, Instant::now()));
    }
    (answered, false)
}

/// Sends `GET /fn/hello/` from [`CLIENTS`] threads for `load`, kills the server with SIGKILL
/// while they are still sending, and starts it again on the same data dir.
fn hello_under_load_then_kill9(server: &mut TestServer, load: Duration) -> Crash {
    let url = format!("{}/fn/hello/", server.url);
    let stop = AtomicBool::new(false);
    let (url, stop_ref) = (url.as_str(), &stop);
    let (clients, killed_at) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(move |_| s.spawn(move || client(url, stop_ref)))
            .collect();
        std::thread::sleep(load);
        let killed_at = Instant::now();
        server.kill9();
        stop_ref.store(true, Ordering::Relaxed);
        let clients: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        (clients, killed_at)
    });
    server.restart_after_kill9();
    let mut crash = Crash {
        answered: Vec::new(),
        cut_off: 0,
        killed_at,
    };
    for (answered, cut_off) in clients {
        crash.answered.extend(answered);
        crash.cut_off += usize::from(cut_off);
    }
    assert!(
        crash.answered.len() >= 50,
        "only {} answers under load",
        crash.answered.len()
    );
    crash
}

/// The hello ledger after the restart: no request twice, and nothing nobody sent (every
/// record is of an answered request or of one the kill cut off).
fn ledger_after(server: &TestServer, crash: &Crash) -> HashSet<String> {
    let mut ledger = HashSet::new();
    for r in usage_csv(server, "&function=hello") {
        assert!(
            ledger.insert(r.get("request_id").to_string()),
            "recorded twice: {r:?}"
        );
    }
    let answered: HashSet<&str> = crash.answered.iter().map(|(id, _)| id.as_str()).collect();
    let unanswered = ledger
        .iter()
        .filter(|id| !answered.contains(id.as_str()))
        .count();
    assert!(
        unanswered <= crash.cut_off,
        "{unanswered} records of requests never answered, but only {} were cut off",
        crash.cut_off
    );
    ledger
}

#[test]
fn kill9_under_load_loses_at_most_the_last_commit_interval_and_duplicates_nothing() {
    let mut server = TestServer::start_with_config(
        "[metering]\nenabled = true\ndurability = \"batched\"\ncommit_interval_ms = 50\n",
    );
    server.deploy_example("hello", "hello", "");
    let crash = hello_under_load_then_kill9(&mut server, Duration::from_millis(2500));
    let ledger = ledger_after(&server, &crash);
    let old: Vec<&str> = crash
        .answered
        .iter()
        .filter(|(_, at)| *at + Duration::from_secs(1) < crash.killed_at)
        .map(|(id, _)| id.as_str())
        .collect();
    assert!(!old.is_empty(), "no answer came over 1 s before the kill");
    let lost: Vec<&str> = old
        .iter()
        .copied()
        .filter(|id| !ledger.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} requests answered over 1 s before the kill are not in the ledger, e.g. {:?}",
        lost.len(),
        old.len(),
        &lost[..lost.len().min(5)]
    );
}

#[test]
fn kill9_in_strict_mode_loses_no_answered_request() {
    let mut server =
        TestServer::start_with_config("[metering]\nenabled = true\ndurability = \"strict\"\n");
    server.deploy_example("hello", "hello", "");
    // Strict: an answered request is already committed, no polling needed.
    let a = server.get("/fn/hello/");
    assert_eq!(a.status, 200);
    let first = (
        a.header("x-kiln-request-id").unwrap().to_string(),
        Instant::now(),
    );
    assert_eq!(usage(&server, "")["totals"]["requests"], 1);
    // A response without a body (HEAD) is only answered once its record is committed too.
    let head = server.request("HEAD", "/fn/hello/", &[], b"");
    assert_eq!(head.status, 200);
    assert_eq!(usage(&server, "")["totals"]["requests"], 2);
    let second = (
        head.header("x-kiln-request-id").unwrap().to_string(),
        Instant::now(),
    );

    let mut crash = hello_under_load_then_kill9(&mut server, Duration::from_millis(2000));
    crash.answered.push(first);
    crash.answered.push(second);
    let ledger = ledger_after(&server, &crash);
    let lost: Vec<&str> = crash
        .answered
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| !ledger.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} answered requests are not in the ledger, e.g. {:?}",
        lost.len(),
        crash.answered.len(),
        &lost[..lost.len().min(5)]
    );
}

#[test]
fn a_client_that_goes_away_is_still_billed_for_what_ran() {
    let server = TestServer::start_with_config(METERING);
    server.deploy_example("hostile", "hostile", "timeout_ms=5000");
    // The client gives up after 300 ms; the guest sleeps 1.5 s.
    let impatient: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_millis(300)))
        .build()
        .into();
    let gave_up = impatient
        .get(format!("{}/fn/hostile/sleep?ms=1500", server.url))
        .header("authorization", kiln_tests::ADMIN_BEARER)
        .call();
    assert!(
        gave_up.is_err(),
        "the request should have timed out at the client"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let records = usage_csv(&server, "&function=hostile");
        if !records.is_empty() || Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(records.len(), 1, "one record for the abandoned request");
    let r = &records[0];
    // `cancelled` when the server noticed the client leave while the guest ran; `ok` when
    // it only noticed on writing the answer. Either way the request is billed.
    assert!(["cancelled", "ok"].contains(&r.get("outcome")), "{r:?}");
    assert!(r.num("wall_us") >= 250_000, "{r:?}");
    assert!(r.num("memory_peak_bytes") > 0, "{r:?}");
    assert!(r.num("cost") > 0, "{r:?}");
}
