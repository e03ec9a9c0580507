//! Per-request metering end to end: every answered `/fn/` request is exactly one usage record,
//! priced by the published formula; `GET /v1/usage` (JSON, CSV, groups, windows) and
//! `kiln usage` add up. What survives restarts and crashes is in `ledger.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_tests::{Record, TestServer, Value, json, parse_csv, usage, usage_csv};

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
    server.deploy_digits("digits", json!({}));
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
            (s.function, "1", "default"),
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
            "tenant" => assert_eq!(keys, BTreeSet::from(["default"]), "{u}"),
            "hour" => assert!(keys.iter().all(|k| k.contains(":00:00")), "{u}"),
            _ => assert!(keys.iter().all(|k| k.contains("T00:00:00")), "{u}"),
        }
    }

    // Filters.
    assert_eq!(usage(&server, "function=hello")["totals"]["requests"], 5);
    assert_eq!(
        usage(&server, "tenant=default")["totals"]["requests"],
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
