//! Prediction caches end to end: the opt-in response cache (hits, misses, bypass, vary,
//! TTL, versions, purge, coalescing), the per-version inference cache on the digits model,
//! their metrics, and `[cache]` in a `kiln.toml` deployed through the CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kiln_tests::{Answer, TestServer, Value, example, json, metric_sample, root};

/// `kiln_faas_invocations_total` of one function's version 1 with outcome `ok`.
fn invocations_ok(server: &TestServer, function: &str) -> f64 {
    metric_sample(
        &server.get("/metrics").text(),
        &format!(
            "kiln_faas_invocations_total{{function=\"{function}\",version=\"1\",outcome=\"ok\"}}"
        ),
    )
}

/// The `server-timing` entries of an answer as (name, desc) pairs.
fn timings(a: &Answer) -> Vec<(String, Option<String>)> {
    a.headers
        .get_all("server-timing")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|entry| {
            let mut params = entry.split(';').map(str::trim);
            let name = params.next().unwrap_or_default().to_string();
            let desc = params
                .find_map(|p| p.strip_prefix("desc="))
                .map(|d| d.trim_matches('"').to_string());
            (name, desc)
        })
        .collect()
}

/// Whether `server-timing` has an entry called `name`.
fn has_timing(a: &Answer, name: &str) -> bool {
    timings(a).iter().any(|(n, _)| n == name)
}

/// The `desc` of the `server-timing` entry called `name`.
fn timing_desc(a: &Answer, name: &str) -> Option<String> {
    timings(a)
        .into_iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, d)| d)
}

/// The `x-kiln-cache` header, `"-"` when there is none.
fn cache_state(a: &Answer) -> &str {
    a.header("x-kiln-cache").unwrap_or("-")
}

/// POSTs `body` to `path`, asserting a 200.
fn post(server: &TestServer, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let a = server.request("POST", path, headers, body);
    assert_eq!(a.status, 200, "{path}: {}", a.text());
    a
}

/// Deploys the echo example from a JSON manifest with `cache`, asserting a 201.
fn deploy_echo(server: &TestServer, name: &str, cache: Value) -> Value {
    let component = server.put_blob(&std::fs::read(example("echo")).unwrap());
    let a = server.deploy_manifest(name, &json!({"component": component, "cache": cache}));
    assert_eq!(a.status, 201, "deploy {name}: {}", a.text());
    a.json()
}

#[test]
fn response_cache_hits_identical_requests_and_misses_on_body_vary_bypass_and_expiry() {
    let server = TestServer::start();
    let v = deploy_echo(
        &server,
        "echo",
        json!({"responses": {"ttl": "2s", "vary": ["x-user"]}}),
    );
    assert_eq!(v["cache"]["responses"]["vary"], json!(["x-user"]), "{v}");
    assert_eq!(v["cache"]["inference"], true, "{v}");
    let alice = [("x-user", "alice")];

    let first = post(&server, "/fn/echo/", &alice, b"A");
    let stored_at = Instant::now();
    assert_eq!((cache_state(&first), first.text().as_str()), ("miss", "A"));
    assert_eq!(timing_desc(&first, "cache").as_deref(), Some("miss"));
    assert!(first.header("x-kiln-request-id").is_some());

    // The same request again is answered from the cache, without an instance.
    let hit = post(&server, "/fn/echo/", &alice, b"A");
    assert_eq!((cache_state(&hit), hit.text().as_str()), ("hit", "A"));
    assert_eq!(hit.header("x-kiln-version"), Some("1"));
    assert_eq!(
        hit.header("x-path"),
        Some("/"),
        "the guest's headers are kept"
    );
    let age: u64 = hit
        .header("age")
        .expect("a hit has an age header")
        .parse()
        .unwrap();
    assert!(age <= 2, "age {age}");
    assert_eq!(
        timing_desc(&hit, "cache").as_deref(),
        Some("hit"),
        "{:?}",
        hit.header("server-timing")
    );
    assert!(
        !has_timing(&hit, "instantiate"),
        "{:?}",
        hit.header("server-timing")
    );
    assert_eq!(
        invocations_ok(&server, "echo"),
        1.0,
        "a hit is no invocation"
    );

    // Another body, or another value of a vary header, is another entry.
    let other_body = post(&server, "/fn/echo/", &alice, b"B");
    assert_eq!(
        (cache_state(&other_body), other_body.text().as_str()),
        ("miss", "B")
    );
    let bob = post(&server, "/fn/echo/", &[("x-user", "bob")], b"A");
    assert_eq!((cache_state(&bob), bob.text().as_str()), ("miss", "A"));

    // `cache-control: no-cache` runs the function and stores nothing.
    let no_cache = [("x-user", "carol"), ("cache-control", "no-cache")];
    let bypass = post(&server, "/fn/echo/", &no_cache, b"C");
    assert_eq!(
        (cache_state(&bypass), bypass.text().as_str()),
        ("bypass", "C")
    );
    assert_eq!(timing_desc(&bypass, "cache").as_deref(), Some("bypass"));
    let after_bypass = post(&server, "/fn/echo/", &[("x-user", "carol")], b"C");
    assert_eq!(
        cache_state(&after_bypass),
        "miss",
        "a bypass stores nothing"
    );
    assert_eq!(invocations_ok(&server, "echo"), 5.0);

    let metrics = server.get("/metrics").text();
    assert!(
        metric_sample(&metrics, "kiln_cache_hits_total{cache=\"response\"}") >= 1.0,
        "{metrics}"
    );
    assert!(
        metric_sample(&metrics, "kiln_cache_misses_total{cache=\"response\"}") >= 4.0,
        "{metrics}"
    );

    // Past the TTL the entry is gone.
    std::thread::sleep(
        (stored_at + Duration::from_millis(2500)).saturating_duration_since(Instant::now()),
    );
    let expired = post(&server, "/fn/echo/", &alice, b"A");
    assert_eq!(
        (cache_state(&expired), expired.text().as_str()),
        ("miss", "A")
    );
}

#[test]
fn response_cache_stores_only_200_answers() {
    let server = TestServer::start();
    server.deploy_example("hostile", "hostile", "cache_ttl=30s");
    for _ in 0..2 {
        let a = server.get("/fn/hostile/nothing");
        assert_eq!((a.status, cache_state(&a)), (404, "miss"), "{}", a.text());
    }
    assert_eq!(
        metric_sample(
            &server.get("/metrics").text(),
            "kiln_faas_invocations_total{function=\"hostile\",version=\"1\",outcome=\"ok\"}"
        ),
        2.0
    );
}

#[test]
fn a_new_version_never_sees_old_entries_and_a_pinned_version_keeps_its_own() {
    let server = TestServer::start();
    let cache = json!({"responses": {"ttl": "60s"}});
    deploy_echo(&server, "echo", cache.clone());
    assert_eq!(
        cache_state(&post(&server, "/fn/echo/", &[], b"same")),
        "miss"
    );
    assert_eq!(
        cache_state(&post(&server, "/fn/echo/", &[], b"same")),
        "hit"
    );

    let v2 = deploy_echo(&server, "echo", cache);
    assert_eq!(v2["version"], 2);
    let a = post(&server, "/fn/echo/", &[], b"same");
    assert_eq!(
        (cache_state(&a), a.header("x-kiln-version")),
        ("miss", Some("2"))
    );
    let a = post(&server, "/fn/echo/", &[], b"same");
    assert_eq!(
        (cache_state(&a), a.header("x-kiln-version")),
        ("hit", Some("2"))
    );
    let a = post(&server, "/fn/echo@1/", &[], b"same");
    assert_eq!(
        (
            cache_state(&a),
            a.header("x-kiln-version"),
            a.text().as_str()
        ),
        ("hit", Some("1"), "same")
    );
}

#[test]
fn purging_a_functions_cache_empties_it_and_unknown_functions_are_404() {
    let server = TestServer::start();
    deploy_echo(&server, "echo", json!({"responses": {"ttl": "60s"}}));
    assert_eq!(cache_state(&post(&server, "/fn/echo/", &[], b"a")), "miss");
    assert_eq!(cache_state(&post(&server, "/fn/echo/", &[], b"a")), "hit");
    assert_eq!(cache_state(&post(&server, "/fn/echo/", &[], b"b")), "miss");

    let a = server.request("DELETE", "/v1/functions/echo/cache", &[], b"");
    assert_eq!(a.status, 200, "{}", a.text());
    let purged = a.json();
    assert_eq!(purged["function"], "echo", "{purged}");
    assert_eq!(purged["removed"]["responses"], 2, "{purged}");
    assert!(purged["removed"]["inference"].is_u64(), "{purged}");

    assert_eq!(cache_state(&post(&server, "/fn/echo/", &[], b"a")), "miss");
    assert_eq!(cache_state(&post(&server, "/fn/echo/", &[], b"b")), "miss");
    assert_eq!(cache_state(&post(&server, "/fn/echo/", &[], b"a")), "hit");

    let a = server.request("DELETE", "/v1/functions/nothing/cache", &[], b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (404, "function.not_found"),
        "{}",
        a.text()
    );
}

#[test]
fn concurrent_identical_misses_run_the_function_once() {
    let server = TestServer::start();
    server.deploy_example("hostile", "hostile", "cache_ttl=30s");
    let answers: Vec<Answer> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| server.get("/fn/hostile/sleep?ms=500")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for a in &answers {
        assert_eq!((a.status, a.text().as_str()), (200, "slept\n"));
    }
    let states: Vec<&str> = answers.iter().map(cache_state).collect();
    let count = |state: &str| states.iter().filter(|s| **s == state).count();
    assert_eq!((count("miss"), count("hit")), (1, 7), "{states:?}");
    assert_eq!(invocations_ok(&server, "hostile"), 1.0);
}

#[test]
fn functions_without_response_caching_answer_without_a_cache_header() {
    let server = TestServer::start();
    let v = server.deploy_example("hello", "hello", "");
    assert_eq!(v["cache"]["inference"], true, "{v}");
    assert!(v["cache"].get("responses").is_none(), "{v}");
    for _ in 0..2 {
        let a = server.get("/fn/hello/");
        assert_eq!(a.status, 200);
        assert_eq!(a.header("x-kiln-cache"), None);
        assert!(!has_timing(&a, "cache"), "{:?}", a.header("server-timing"));
        assert!(
            has_timing(&a, "instantiate"),
            "{:?}",
            a.header("server-timing")
        );
    }
    assert_eq!(invocations_ok(&server, "hello"), 2.0);
}

fn heldout() -> Value {
    let text = std::fs::read_to_string(root().join("examples/digits/model/heldout.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `models[0]` of a version's detail.
fn model_info(server: &TestServer, name: &str) -> Value {
    server
        .get(&format!("/v1/functions/{name}/versions/1"))
        .json()["models"][0]
        .clone()
}

fn runs_and_hits(server: &TestServer, name: &str) -> (u64, u64) {
    let info = model_info(server, name);
    (
        info["runs"].as_u64().unwrap_or_else(|| panic!("{info}")),
        info["cache_hits"]
            .as_u64()
            .unwrap_or_else(|| panic!("{info}")),
    )
}

#[test]
fn inference_cache_answers_repeated_computes_without_running_the_model() {
    let server = TestServer::start();
    let v = server.deploy_digits("digits", json!({}));
    assert_eq!(v["cache"]["inference"], true, "on by default: {v}");
    assert!(v["cache"].get("responses").is_none(), "{v}");
    let v = server.deploy_digits("digits-nocache", json!({"cache": {"inference": false}}));
    assert_eq!(v["cache"]["inference"], false);

    let pixels = json!({"pixels": heldout()["inputs"][0]}).to_string();
    let classify = |name: &str| {
        let a = post(&server, &format!("/fn/{name}/"), &[], pixels.as_bytes());
        assert_eq!(a.json()["digit"], heldout()["predicted"][0]);
        assert_eq!(cache_state(&a), "-", "no response cache on {name}");
        a
    };

    let first = classify("digits");
    let timing = first
        .header("server-timing")
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        timing_desc(&first, "inference-cache").as_deref(),
        Some("miss"),
        "{timing}"
    );
    assert!(has_timing(&first, "inference"), "{timing}");
    let second = classify("digits");
    let timing = second
        .header("server-timing")
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        timing_desc(&second, "inference-cache").as_deref(),
        Some("hit"),
        "{timing}"
    );
    assert!(
        !has_timing(&second, "inference"),
        "a cached compute adds no backend time: {timing}"
    );
    assert_eq!(first.json(), second.json(), "same answer from the cache");
    assert_eq!(runs_and_hits(&server, "digits"), (1, 1));

    let metrics = server.get("/metrics").text();
    assert!(
        metric_sample(&metrics, "kiln_cache_hits_total{cache=\"inference\"}") >= 1.0,
        "{metrics}"
    );

    // A purge drops the computed results: the model runs again.
    let a = server.request("DELETE", "/v1/functions/digits/cache", &[], b"");
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["removed"]["inference"], 1, "{}", a.text());
    let third = classify("digits");
    assert_eq!(
        timing_desc(&third, "inference-cache").as_deref(),
        Some("miss")
    );
    assert_eq!(third.json(), first.json());
    assert_eq!(runs_and_hits(&server, "digits"), (2, 1));

    // With the cache off every request runs the model. Both functions name the same model
    // bytes, which may share one loaded graph and its counters, so count the increase.
    let (runs_before, hits_before) = runs_and_hits(&server, "digits-nocache");
    for _ in 0..2 {
        let a = classify("digits-nocache");
        let timing = a.header("server-timing").unwrap_or_default().to_string();
        assert!(!has_timing(&a, "inference-cache"), "{timing}");
        assert!(has_timing(&a, "inference"), "{timing}");
        assert_eq!(a.json(), first.json(), "same answer with the cache off");
    }
    let (runs_after, hits_after) = runs_and_hits(&server, "digits-nocache");
    assert_eq!((runs_after - runs_before, hits_after - hits_before), (2, 0));
}

#[test]
fn cache_table_in_kiln_toml_turns_on_response_caching_through_the_cli() {
    let server = TestServer::start();
    server.deploy_toml("cached", "echo", "[cache]\nresponses = { ttl = \"60s\" }\n");
    let v = server.get("/v1/functions/cached/versions/1").json();
    assert!(v["cache"]["responses"]["ttl"].is_string(), "{v}");

    let a = post(&server, "/fn/cached/", &[], b"from the cli");
    assert_eq!(
        (cache_state(&a), a.text().as_str()),
        ("miss", "from the cli")
    );
    let a = post(&server, "/fn/cached/", &[], b"from the cli");
    assert_eq!(
        (cache_state(&a), a.text().as_str()),
        ("hit", "from the cli")
    );
}
