//! Per-request metering end to end: every answered `/fn/` request is exactly one usage record,
//! priced by the published formula; `GET /v1/usage` (JSON, CSV, groups, windows) and
//! `kiln usage` add up; a graceful restart keeps every record, and a `kill -9` under load loses
//! at most the last commit interval (nothing in strict mode) and never duplicates one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_tests::{TestServer, Value, example, json, root};

/// The CSV columns, in order.
const COLUMNS: [&str; 19] = [
    "request_id",
    "tenant",
    "function",
    "version",
    "start",
    "start_ms",
    "wall_us",
    "cpu_us",
    "memory_peak_bytes",
    "mem_mib_ms",
    "inference_cpu_us",
    "inference_gpu_us",
    "bytes_in",
    "bytes_out",
    "cold",
    "cache",
    "outcome",
    "status",
    "cost",
];

// Prices (micro-USD) large enough that every term of a record's cost can be non-zero.
const PER_REQUEST: u64 = 2000;
const PER_GB_SECOND: u64 = 1_000_000;
const PER_CPU_MS: u64 = 100;
const PER_INFERENCE_MS_CPU: u64 = 5000;
const PER_INFERENCE_MS_GPU: u64 = 50_000;
const CACHE_HIT_DISCOUNT_PERCENT: u64 = 80;

/// Metering on, committed every 50 ms so the tests wait little.
const METERING: &str = "[metering]\nenabled = true\ncommit_interval_ms = 50\n";

fn pricing() -> String {
    format!(
        "[pricing]\ncurrency = \"USD\"\nper_request = {PER_REQUEST}\nper_gb_second = {PER_GB_SECOND}\n\
         per_cpu_ms = {PER_CPU_MS}\nper_inference_ms_cpu = {PER_INFERENCE_MS_CPU}\n\
         per_inference_ms_gpu = {PER_INFERENCE_MS_GPU}\n\
         cache_hit_discount_percent = {CACHE_HIT_DISCOUNT_PERCENT}\n"
    )
}

/// One usage record (a CSV line) by column.
#[derive(Debug)]
struct Record(BTreeMap<String, String>);

impl Record {
    fn get(&self, column: &str) -> &str {
        self.0
            .get(column)
            .unwrap_or_else(|| panic!("no column {column}"))
    }

    fn num(&self, column: &str) -> u64 {
        self.get(column)
            .parse()
            .unwrap_or_else(|_| panic!("{column} is not a whole number: {self:?}"))
    }
}

/// Parses the usage CSV, asserting its header.
fn parse_csv(text: &str) -> Vec<Record> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    assert_eq!(header, COLUMNS, "CSV header of:\n{text}");
    lines
        .filter(|l| !l.is_empty())
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            assert_eq!(cells.len(), COLUMNS.len(), "{line}");
            Record(
                COLUMNS
                    .iter()
                    .zip(cells)
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        })
        .collect()
}

/// `GET /v1/usage?{query}` as JSON.
fn usage(server: &TestServer, query: &str) -> Value {
    let a = server.get(&format!("/v1/usage?{query}"));
    assert_eq!(a.status, 200, "{query}: {}", a.text());
    a.json()
}

/// `GET /v1/usage?format=csv{query}` as records.
fn usage_csv(server: &TestServer, query: &str) -> Vec<Record> {
    let a = server.get(&format!("/v1/usage?format=csv{query}"));
    assert_eq!(a.status, 200, "{query}: {}", a.text());
    let content_type = a.header("content-type").unwrap_or_default();
    assert!(content_type.starts_with("text/csv"), "{content_type}");
    parse_csv(&a.text())
}

/// Polls the usage totals until they count `n` requests (records are committed off the
/// response path), then checks that no more arrive; returns the JSON.
fn wait_for_requests(server: &TestServer, query: &str, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let u = usage(server, query);
        if u["totals"]["requests"].as_u64().unwrap_or(0) >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage never counted {n} requests: {u}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let u = usage(server, query);
    assert_eq!(u["totals"]["requests"], n, "{u}");
    u
}

/// A record's cost recomputed from its columns with the published formula.
fn priced(r: &Record) -> u64 {
    let request = match (r.get("outcome"), r.get("cache")) {
        ("rejected", _) => 0,
        (_, "hit") => PER_REQUEST * (100 - CACHE_HIT_DISCOUNT_PERCENT) / 100,
        _ => PER_REQUEST,
    };
    request
        + PER_GB_SECOND * r.num("mem_mib_ms") / 1_024_000
        + PER_CPU_MS * r.num("cpu_us") / 1000
        + PER_INFERENCE_MS_CPU * r.num("inference_cpu_us") / 1000
        + PER_INFERENCE_MS_GPU * r.num("inference_gpu_us") / 1000
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Unix milliseconds as RFC 3339 in UTC with a fraction (`2026-11-27T10:00:00.123Z`).
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let rem = secs % 86_400;
    // Days to a civil date (Howard Hinnant's `civil_from_days`).
    let z = secs / 86_400 + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn deploy_digits(server: &TestServer) {
    let model =
        server.put_blob(&std::fs::read(root().join("examples/digits/model/digits.onnx")).unwrap());
    let component = server.put_blob(&std::fs::read(example("digits")).unwrap());
    let a = server.deploy_manifest(
        "digits",
        &json!({"component": component, "models": {"digits": {"digest": model, "backend": "tract"}}}),
    );
    assert_eq!(a.status, 201, "{}", a.text());
}

/// A request sent, and what its record must say.
#[derive(Debug)]
struct Sent {
    id: String,
    function: &'static str,
    outcome: &'static str,
    status: u16,
    cache: &'static str,
}

fn want(function: &'static str, outcome: &'static str, status: u16, cache: &'static str) -> Sent {
    Sent {
        id: String::new(),
        function,
        outcome,
        status,
        cache,
    }
}

#[test]
fn every_answered_request_is_one_priced_record_and_every_view_adds_up() {
    let server = TestServer::start_with_config(&format!("{METERING}{}", pricing()));
    let t0_ms = unix_ms();
    server.deploy_example("hello", "hello", "");
    server.deploy_example("echo", "echo", "cache_ttl=60s");
    server.deploy_example("hostile", "hostile", "timeout_ms=200");
    deploy_digits(&server);
    // An unknown function is nobody's usage.
    assert_eq!(server.get("/fn/nothing/").status, 404);

    let mut sent: Vec<Sent> = Vec::new();
    let mut send = |method: &str, path: &str, body: &[u8], expected: Sent| {
        let a = server.request(method, path, &[], body);
        assert_eq!(a.status, expected.status, "{path}: {}", a.text());
        if expected.cache != "off" {
            assert_eq!(a.header("x-kiln-cache"), Some(expected.cache), "{path}");
        }
        let id = a
            .header("x-kiln-request-id")
            .unwrap_or_else(|| panic!("{path}: no x-kiln-request-id"))
            .to_string();
        sent.push(Sent { id, ..expected });
    };
    for _ in 0..5 {
        send("GET", "/fn/hello/", b"", want("hello", "ok", 200, "off"));
    }
    send(
        "POST",
        "/fn/echo/",
        b"metered",
        want("echo", "ok", 200, "miss"),
    );
    for _ in 0..2 {
        send(
            "POST",
            "/fn/echo/",
            b"metered",
            want("echo", "ok", 200, "hit"),
        );
    }
    send(
        "GET",
        "/fn/hostile/panic",
        b"",
        want("hostile", "trap", 500, "off"),
    );
    send(
        "GET",
        "/fn/hostile/loop",
        b"",
        want("hostile", "timeout", 504, "off"),
    );
    let pixels = json!({"pixels": vec![0; 64]}).to_string();
    send(
        "POST",
        "/fn/digits/",
        pixels.as_bytes(),
        want("digits", "ok", 200, "off"),
    );

    let all = wait_for_requests(&server, "", sent.len() as u64);
    assert_eq!(all["currency"], "USD", "{all}");
    let totals = &all["totals"];
    let records = usage_csv(&server, "");
    let now_ms = unix_ms();
    assert_eq!(records.len(), sent.len());

    // Each answer's request id is exactly one record, which says what the answer said.
    let mut by_id: HashMap<&str, &Record> = HashMap::new();
    for r in &records {
        assert!(
            by_id.insert(r.get("request_id"), r).is_none(),
            "recorded twice: {r:?}"
        );
    }
    for s in &sent {
        let r = by_id
            .get(s.id.as_str())
            .unwrap_or_else(|| panic!("no record for {s:?}"));
        assert_eq!(
            (r.get("function"), r.get("version"), r.get("tenant")),
            (s.function, "1", "anonymous"),
            "{r:?}"
        );
        assert_eq!(
            (r.get("outcome"), r.num("status"), r.get("cache")),
            (s.outcome, u64::from(s.status), s.cache),
            "{r:?}"
        );
        assert!(matches!(r.get("cold"), "true" | "false"), "{r:?}");
        let start_ms = r.num("start_ms");
        assert!(
            (t0_ms - 1000..=now_ms + 1000).contains(&start_ms),
            "{start_ms} outside the test's {t0_ms}..={now_ms}: {r:?}"
        );
        assert_eq!(
            r.get("start").get(..19),
            Some(&rfc3339(start_ms)[..19]),
            "start and start_ms disagree: {r:?}"
        );
        // Memory time and cost follow the published formula, term by term.
        assert_eq!(
            r.num("mem_mib_ms"),
            r.num("memory_peak_bytes").div_ceil(1 << 20) * r.num("wall_us") / 1000,
            "{r:?}"
        );
        assert_eq!(r.num("cost"), priced(r), "{r:?}");
    }
    let of = |function: &str| {
        records
            .iter()
            .filter(|r| r.get("function") == function)
            .collect::<Vec<&Record>>()
    };
    for r in of("hello") {
        assert!(
            r.num("memory_peak_bytes") > 0 && r.num("wall_us") > 0 && r.num("bytes_out") > 0,
            "{r:?}"
        );
    }
    for r in of("echo") {
        if r.get("cache") == "hit" {
            assert!(
                r.num("cost") < PER_REQUEST,
                "a hit costs less than a miss's request charge alone: {r:?}"
            );
        } else {
            assert!(
                r.num("cost") >= PER_REQUEST && r.num("bytes_in") > 0,
                "{r:?}"
            );
        }
    }
    for r in of("digits") {
        assert!(r.num("inference_cpu_us") > 0, "{r:?}");
        assert_eq!(r.num("inference_gpu_us"), 0, "{r:?}");
    }
    for r in of("hostile") {
        if r.get("outcome") == "timeout" {
            assert!(r.num("wall_us") >= 150_000, "ran to its timeout: {r:?}");
        }
    }

    // The totals are the sums of the records.
    let sum = |column: &str| records.iter().map(|r| r.num(column)).sum::<u64>();
    assert_eq!(totals["requests"], records.len(), "{all}");
    assert_eq!(totals["cost"], sum("cost"), "{all}");
    assert_eq!(totals["cache_hits"], 2, "{all}");
    assert_eq!(totals["errors"], 2, "the trap and the timeout: {all}");
    assert_eq!(totals["cpu_us"], sum("cpu_us"), "{all}");
    assert_eq!(totals["mem_mib_ms"], sum("mem_mib_ms"), "{all}");
    assert_eq!(totals["bytes_in"], sum("bytes_in"), "{all}");
    assert_eq!(totals["bytes_out"], sum("bytes_out"), "{all}");
    assert_eq!(
        totals["inference_us"]["cpu"],
        sum("inference_cpu_us"),
        "{all}"
    );
    assert_eq!(
        totals["inference_us"]["gpu"],
        sum("inference_gpu_us"),
        "{all}"
    );

    // Every grouping splits the same totals.
    for group_by in ["function", "version", "tenant", "hour", "day"] {
        let u = usage(&server, &format!("group_by={group_by}"));
        assert_eq!(u["group_by"], group_by, "{u}");
        let groups = u["groups"]
            .as_array()
            .unwrap_or_else(|| panic!("no groups: {u}"));
        for field in [
            "requests",
            "cost",
            "cache_hits",
            "errors",
            "cpu_us",
            "bytes_in",
            "bytes_out",
        ] {
            let summed: u64 = groups
                .iter()
                .map(|g| g[field].as_u64().unwrap_or_else(|| panic!("{field}: {g}")))
                .sum();
            assert_eq!(totals[field], summed, "group_by={group_by}, {field}: {u}");
            assert_eq!(
                u["totals"][field], totals[field],
                "group_by={group_by}: {u}"
            );
        }
        let keys: BTreeSet<&str> = groups
            .iter()
            .map(|g| g["key"].as_str().unwrap_or_else(|| panic!("{g}")))
            .collect();
        match group_by {
            "function" => {
                assert_eq!(
                    keys,
                    BTreeSet::from(["digits", "echo", "hello", "hostile"]),
                    "{u}"
                );
                let hello = groups.iter().find(|g| g["key"] == "hello").unwrap();
                assert_eq!(hello["requests"], 5, "{u}");
                assert_eq!(
                    hello["cost"],
                    of("hello").iter().map(|r| r.num("cost")).sum::<u64>()
                );
            }
            "version" => assert_eq!(
                keys,
                BTreeSet::from(["digits@1", "echo@1", "hello@1", "hostile@1"]),
                "{u}"
            ),
            "tenant" => assert_eq!(keys, BTreeSet::from(["anonymous"]), "{u}"),
            "hour" => assert!(keys.iter().all(|k| k.contains(":00:00")), "{u}"),
            _ => assert!(keys.iter().all(|k| k.contains("T00:00:00")), "{u}"),
        }
    }

    // Filters.
    assert_eq!(usage(&server, "function=hello")["totals"]["requests"], 5);
    assert_eq!(
        usage(&server, "tenant=anonymous")["totals"]["requests"],
        records.len()
    );

    // A window, since <= start < until, in unix milliseconds and in RFC 3339.
    let mut starts: Vec<u64> = records.iter().map(|r| r.num("start_ms")).collect();
    starts.sort_unstable();
    starts.dedup();
    assert!(starts.len() >= 2, "{starts:?}");
    let since = starts[starts.len() / 2];
    let (inside, before): (Vec<&Record>, Vec<&Record>) =
        records.iter().partition(|r| r.num("start_ms") >= since);
    let ids = |rs: &[&Record]| -> BTreeSet<String> {
        rs.iter().map(|r| r.get("request_id").to_string()).collect()
    };
    let cost = |rs: &[&Record]| rs.iter().map(|r| r.num("cost")).sum::<u64>();
    for window in [
        format!("since={since}&until=2100-01-01T00:00:00Z"),
        format!("since={}&until=4102444800000", rfc3339(since)),
    ] {
        let u = usage(&server, &window);
        assert_eq!(u["totals"]["requests"], inside.len(), "{window}: {u}");
        assert_eq!(u["totals"]["cost"], cost(&inside), "{window}: {u}");
        let got: Vec<Record> = usage_csv(&server, &format!("&{window}"));
        assert_eq!(
            ids(&got.iter().collect::<Vec<_>>()),
            ids(&inside),
            "{window}"
        );
    }
    let u = usage(&server, &format!("since=0&until={since}"));
    assert_eq!(u["totals"]["requests"], before.len(), "{u}");
    assert_eq!(u["totals"]["cost"], cost(&before), "{u}");
}

#[test]
fn kiln_usage_prints_a_table_json_and_csv() {
    let server = TestServer::start_with_config(METERING);
    server.deploy_example("hello", "hello", "");
    server.deploy_example("echo", "echo", "");
    for _ in 0..3 {
        assert_eq!(server.get("/fn/hello/").status, 200);
    }
    for body in ["one", "two"] {
        let a = server.request("POST", "/fn/echo/", &[], body.as_bytes());
        assert_eq!(a.status, 200);
    }
    wait_for_requests(&server, "", 5);

    let out = server.cli(&["usage", "--group-by", "function"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = table.lines().next().unwrap_or_default().to_lowercase();
    assert!(
        header.contains("requests") && header.contains("cost"),
        "{table}"
    );
    for (name, requests) in [("hello", "3"), ("echo", "2")] {
        assert!(
            table.lines().any(|l| {
                let cells: Vec<&str> = l.split_whitespace().collect();
                cells.contains(&name) && cells.contains(&requests)
            }),
            "no line for {name} with {requests} requests:\n{table}"
        );
    }

    let out = server.cli(&["usage", "--function", "hello", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let u: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u["totals"]["requests"], 3, "{u}");

    let out = server.cli(&["usage", "--output", "csv"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = parse_csv(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(records.len(), 5);
}

#[test]
fn usage_with_a_bad_parameter_is_400_and_good_ones_are_accepted() {
    let server = TestServer::start_with_config(METERING);
    for query in [
        "group_by=bogus",
        "since=notatime",
        "until=2026-13-45T99:00:00Z",
        "format=xml",
    ] {
        let a = server.get(&format!("/v1/usage?{query}"));
        assert_eq!(
            (a.status, a.error_code().as_str()),
            (400, "request.invalid"),
            "{query}: {}",
            a.text()
        );
    }
    for query in [
        "since=0",
        "since=2026-11-27T10:00:00.5Z&until=4102444800000",
        "group_by=day",
        "format=csv",
    ] {
        let a = server.get(&format!("/v1/usage?{query}"));
        assert_eq!(a.status, 200, "{query}: {}", a.text());
    }
    assert_eq!(usage(&server, "")["totals"]["requests"], 0);
}

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
        let Ok(mut resp) = agent.get(url).call() else {
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
