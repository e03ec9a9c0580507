//! Traffic policies over real HTTP: weighted routing, sticky keys, forced versions, new
//! versions waiting at 0%, validation, atomic updates, history, the CLI, restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use kiln_tests::{Answer, TestServer, json};
use serde_json::Value;

/// A server with `hello` deployed `versions` times (same component, versions 1..=n).
fn server_with_versions(versions: u32) -> TestServer {
    let server = TestServer::start();
    for _ in 0..versions {
        server.deploy_example("hello", "hello", "max_concurrency=256");
    }
    server
}

fn set(server: &TestServer, body: &Value) -> Answer {
    server.request(
        "PUT",
        "/v1/functions/hello/traffic",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn version_of(a: &Answer) -> u32 {
    assert_eq!(a.status, 200, "{}", a.text());
    a.header("x-kiln-version").unwrap().parse().unwrap()
}

/// Sends `n` requests from 8 threads; counts the answering versions.
fn spread(server: &TestServer, n: usize) -> BTreeMap<u32, usize> {
    let url = format!("{}/fn/hello/", server.url);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let agent = kiln_tests::agent();
                let mut seen = BTreeMap::new();
                for _ in 0..n / 8 {
                    let r = agent
                        .get(&url)
                        .header("authorization", kiln_tests::ADMIN_BEARER)
                        .call()
                        .unwrap();
                    let v: u32 = r.headers()["x-kiln-version"]
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    *seen.entry(v).or_insert(0) += 1;
                }
                seen
            })
        })
        .collect();
    let mut all = BTreeMap::new();
    for t in threads {
        for (v, n) in t.join().unwrap() {
            *all.entry(v).or_insert(0) += n;
        }
    }
    all
}

#[test]
fn weighted_routing_follows_the_weights_within_two_points() {
    let server = server_with_versions(2);
    let a = set(&server, &json!({"weights": {"1": 70, "2": 30}}));
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["revision"], 1);
    let seen = spread(&server, 10_000);
    let share = |v: u32| *seen.get(&v).unwrap_or(&0) as f64 / 100.0;
    assert!((68.0..=72.0).contains(&share(1)), "{seen:?}");
    assert!((28.0..=32.0).contains(&share(2)), "{seen:?}");
}

#[test]
fn sticky_keys_stay_on_one_version() {
    let mut server = server_with_versions(2);
    let a = set(
        &server,
        &json!({"weights": {"1": 50, "2": 50}, "sticky": "header:x-user-id"}),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let mut versions = BTreeSet::new();
    for user in 0..60 {
        let user = format!("user-{user}");
        let first = version_of(&server.request("GET", "/fn/hello/", &[("x-user-id", &user)], b""));
        for _ in 0..4 {
            let again =
                version_of(&server.request("GET", "/fn/hello/", &[("x-user-id", &user)], b""));
            assert_eq!(again, first, "{user} moved");
        }
        versions.insert(first);
    }
    assert_eq!(
        versions,
        BTreeSet::from([1, 2]),
        "users spread over both versions"
    );
    // The hash's secret is kept in the database: after a restart every user lands where
    // they did.
    let landings = |server: &TestServer| -> Vec<u32> {
        (0..20)
            .map(|u| {
                let user = format!("user-{u}");
                version_of(&server.request("GET", "/fn/hello/", &[("x-user-id", &user)], b""))
            })
            .collect()
    };
    let before = landings(&server);
    server.restart();
    let after = landings(&server);
    assert_eq!(before, after);
}

#[test]
fn new_versions_wait_at_zero_and_a_request_can_force_any_version() {
    let server = server_with_versions(1);
    assert_eq!(set(&server, &json!({"weights": {"1": 100}})).status, 200);
    server.deploy_example("hello", "hello", "");
    // Deploying did not move traffic: version 2 waits at 0% until a policy names it.
    for _ in 0..20 {
        assert_eq!(version_of(&server.get("/fn/hello/")), 1);
    }
    assert_eq!(
        version_of(&server.request("GET", "/fn/hello/", &[("x-kiln-version", "2")], b"")),
        2
    );
    assert_eq!(version_of(&server.get("/fn/hello@2/")), 2);
    let a = server.request("GET", "/fn/hello/", &[("x-kiln-version", "9")], b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (404, "version.not_found")
    );
    let a = server.request("GET", "/fn/hello/", &[("x-kiln-version", "two")], b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "request.invalid")
    );
    // The policy shows, and a function without one says who serves.
    let t = server.get("/v1/functions/hello/traffic").json();
    assert_eq!(
        (t["policy"]["weights"].clone(), t["latest_version"].clone()),
        (json!({"1": 100}), json!(2))
    );
}

#[test]
fn invalid_policies_are_refused_with_the_reason() {
    let server = server_with_versions(2);
    for (body, says) in [
        (json!({"weights": {"1": 90, "2": 20}}), "sum to 110"),
        (json!({"weights": {"1": 50, "7": 50}}), "7"),
        (json!({"weights": {}}), "at least one"),
        (
            json!({"weights": {"1": 100}, "sticky": "cookie:id"}),
            "header:",
        ),
        (json!({"weights": {"1": 100}, "bogus": 1}), "bogus"),
        (json!({"weights": {"x": 100}}), "invalid"),
    ] {
        let a = set(&server, &body);
        assert_eq!(
            (a.status, a.error_code().as_str()),
            (400, "request.invalid"),
            "{body}"
        );
        assert!(a.text().contains(says), "{body}: {}", a.text());
    }
    let a = server.request(
        "PUT",
        "/v1/functions/missing/traffic",
        &[],
        json!({"weights": {"1": 100}}).to_string().as_bytes(),
    );
    assert_eq!(a.status, 404);
    assert!(
        server.get("/v1/functions/hello/traffic").json()["policy"].is_null(),
        "nothing was applied"
    );
}

#[test]
fn concurrent_policy_updates_are_never_half_applied() {
    let server = server_with_versions(3);
    let policies = [
        json!({"weights": {"1": 100}}),
        json!({"weights": {"2": 40, "3": 60}}),
        json!({"weights": {"1": 10, "2": 10, "3": 80}, "sticky": "header:x-user-id"}),
    ];
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..3)
            .map(|w| {
                let (server, policies) = (&server, &policies);
                s.spawn(move || {
                    for i in 0..20 {
                        assert_eq!(set(server, &policies[(w + i) % 3]).status, 200);
                    }
                })
            })
            .collect();
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (server, policies) = (&server, &policies);
                s.spawn(move || {
                    for _ in 0..40 {
                        let t = server.get("/v1/functions/hello/traffic").json();
                        if !t["policy"].is_null() {
                            assert!(
                                policies.contains(&t["policy"]),
                                "a policy never submitted: {t}"
                            );
                        }
                        let v = version_of(&server.get("/fn/hello/"));
                        assert!((1..=3).contains(&v));
                    }
                })
            })
            .collect();
        for t in writers.into_iter().chain(readers) {
            t.join().unwrap();
        }
    });
    // Every change is in the history, numbered without gaps.
    let h = server.get("/v1/functions/hello/history").json();
    let revisions: Vec<u64> = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["detail"]["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revisions, (1..=60).rev().collect::<Vec<_>>());
}

#[test]
fn the_cli_sets_and_shows_traffic_and_the_policy_survives_a_restart() {
    let mut server = server_with_versions(2);
    let stdout = server.cli_ok(&[
        "traffic",
        "hello",
        "1=90",
        "2=10",
        "--sticky",
        "header:x-user-id",
    ]);
    assert_eq!(
        stdout.trim(),
        "hello (revision 1): 1=90 2=10 sticky header:x-user-id"
    );
    let out = server.cli(&["traffic", "hello", "1=90", "2=20"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sum to 110"));
    let out = server.cli(&["history", "hello"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(
        table.contains("traffic") && table.contains("1=90 2=10"),
        "{table}"
    );
    let history = server.get("/v1/functions/hello/history").json();
    assert!(
        history["history"][0]["actor"].is_string(),
        "the actor is the key id: {history}"
    );

    server.restart();
    let out = server.cli(&["traffic", "hello"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello (revision 1): 1=90 2=10 sticky header:x-user-id"
    );
    let first = version_of(&server.request("GET", "/fn/hello/", &[("x-user-id", "u1")], b""));
    assert_eq!(
        version_of(&server.request("GET", "/fn/hello/", &[("x-user-id", "u1")], b"")),
        first
    );
}

#[test]
fn rollback_returns_to_the_previous_policy_and_says_why() {
    let server = server_with_versions(2);
    let a = server.request("POST", "/v1/functions/hello/rollback", &[], b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "request.invalid")
    );
    assert!(
        a.text().contains("no traffic change to roll back"),
        "{}",
        a.text()
    );
    assert_eq!(set(&server, &json!({"weights": {"1": 100}})).status, 200);
    assert_eq!(set(&server, &json!({"weights": {"2": 100}})).status, 200);
    assert_eq!(version_of(&server.get("/fn/hello/")), 2);

    let stdout = server.cli_ok(&["rollback", "hello", "--reason", "v2 looks wrong"]);
    assert_eq!(stdout.trim(), "hello (revision 3): 1=100");
    assert_eq!(version_of(&server.get("/fn/hello/")), 1);
    let h = server.get("/v1/functions/hello/history").json();
    let last = &h["history"][0];
    assert_eq!(
        (last["kind"].as_str(), last["reason"].as_str()),
        (Some("rollback"), Some("v2 looks wrong"))
    );
    assert_eq!(last["detail"]["previous"], json!({"weights": {"2": 100}}));

    // Rolling back again returns to where it was; back past the first policy, the
    // newest version serves everything again.
    assert_eq!(
        server
            .request("POST", "/v1/functions/hello/rollback", &[], b"")
            .status,
        200
    );
    assert_eq!(version_of(&server.get("/fn/hello/")), 2);
    assert_eq!(set(&server, &json!({"weights": {"1": 100}})).status, 200);
    let mut fresh = server_with_versions(2);
    assert_eq!(set(&fresh, &json!({"weights": {"1": 100}})).status, 200);
    let a = fresh.request(
        "POST",
        "/v1/functions/hello/rollback",
        &[],
        b"{\"reason\":\"undo\"}",
    );
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(a.json()["policy"].is_null());
    assert_eq!(version_of(&fresh.get("/fn/hello/")), 2);
    fresh.restart();
    assert!(
        fresh.get("/v1/functions/hello/traffic").json()["policy"].is_null(),
        "kept across a restart"
    );
    assert_eq!(version_of(&fresh.get("/fn/hello/")), 2);
}

#[test]
fn version_stats_show_recent_requests_errors_and_latency() {
    let server = TestServer::start();
    server.deploy_example("hostile", "hostile", "");
    server.deploy_example("hostile", "hostile", "");
    for _ in 0..8 {
        assert_eq!(server.get("/fn/hostile@1/counter").status, 200);
    }
    for _ in 0..2 {
        assert_eq!(server.get("/fn/hostile@1/panic").status, 500);
    }
    let s = server.get("/v1/functions/hostile/versions/1/stats").json();
    assert_eq!(
        (s["requests"].clone(), s["errors"].clone()),
        (json!(10), json!(2)),
        "{s}"
    );
    assert!(
        (s["error_rate"].as_f64().unwrap() - 0.2).abs() < 1e-9,
        "{s}"
    );
    let (p50, p99) = (s["p50_ms"].as_f64().unwrap(), s["p99_ms"].as_f64().unwrap());
    assert!(p50 > 0.0 && p99 >= p50, "{s}");
    assert_eq!(
        (s["window_s"].clone(), s["version"].clone()),
        (json!(60), json!(1))
    );
    // Version 2 had nothing; other windows and bad parameters.
    let s = server
        .get("/v1/functions/hostile/versions/2/stats?window=5m")
        .json();
    assert_eq!(
        (
            s["requests"].clone(),
            s["p99_ms"].clone(),
            s["window_s"].clone()
        ),
        (json!(0), Value::Null, json!(300))
    );
    for bad in ["window=1h", "window=soon", "bogus=1"] {
        let a = server.get(&format!("/v1/functions/hostile/versions/1/stats?{bad}"));
        assert_eq!(a.status, 400, "{bad}");
    }
    assert_eq!(
        server.get("/v1/functions/hostile/versions/9/stats").status,
        404
    );
}

#[test]
fn traffic_history_and_rollouts_stay_within_the_owning_tenant() {
    let server = TestServer::start();
    let (a, _) = server.create_key("team-a", &["deploy:svc", "invoke:svc"], None);
    let (b, _) = server.create_key("team-b", &["deploy:svc", "invoke:svc"], None);
    for _ in 0..2 {
        assert_eq!(server.deploy_as(&a, "svc", "hello", "").status, 201);
    }
    let policy = json!({"weights": {"1": 100}}).to_string();
    assert_eq!(
        server
            .call_as(&a, "PUT", "/v1/functions/svc/traffic", policy.as_bytes())
            .status,
        200
    );
    // Team b cannot see or change team a's traffic, aliases or rollouts: 404, as if absent.
    for (method, path, body) in [
        ("GET", "/v1/functions/svc/traffic", ""),
        ("PUT", "/v1/functions/svc/traffic", policy.as_str()),
        ("PUT", "/v1/functions/svc/aliases/prod", policy.as_str()),
        ("POST", "/v1/functions/svc/rollout", r#"{"to": 2}"#),
        ("POST", "/v1/functions/svc/rollback", ""),
        ("GET", "/v1/functions/svc/history", ""),
    ] {
        let r = server.call_as(&b, method, path, body.as_bytes());
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (404, "function.not_found"),
            "{method} {path}"
        );
    }
    // Once team a deletes it and team b takes the name, b does not read a's history.
    assert_eq!(
        server
            .call_as(&a, "DELETE", "/v1/functions/svc", b"")
            .status,
        200
    );
    assert_eq!(server.deploy_as(&b, "svc", "hello", "").status, 201);
    assert_eq!(
        server
            .call_as(
                &b,
                "PUT",
                "/v1/functions/svc/traffic",
                json!({"weights": {"3": 100}}).to_string().as_bytes()
            )
            .status,
        200
    );
    let history = server
        .call_as(&b, "GET", "/v1/functions/svc/history", b"")
        .json();
    let entries = history["history"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{history}");
    assert_eq!(entries[0]["detail"]["policy"]["weights"], json!({"3": 100}));
    // An admin sees both owners' entries.
    assert_eq!(
        server.get("/v1/functions/svc/history").json()["history"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn if_match_refuses_a_change_decided_on_a_stale_revision() {
    let server = server_with_versions(2);
    let put = |policy: &Value, if_match: Option<&str>| {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(tag) = if_match {
            headers.push(("if-match", tag));
        }
        server.request(
            "PUT",
            "/v1/functions/hello/traffic",
            &headers,
            policy.to_string().as_bytes(),
        )
    };
    let read = server.get("/v1/functions/hello/traffic");
    assert_eq!(read.header("etag"), Some("\"0\""), "no policy yet");
    let a = put(&json!({"weights": {"1": 100}}), Some("\"0\""));
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.header("etag"), Some("\"1\""));
    // Two operators read revision 1; the first change wins, the second is refused.
    let a = put(&json!({"weights": {"1": 50, "2": 50}}), Some("\"1\""));
    assert_eq!(a.status, 200, "{}", a.text());
    let a = put(&json!({"weights": {"2": 100}}), Some("\"1\""));
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (412, "traffic.stale_revision"),
        "{}",
        a.text()
    );
    assert!(a.text().contains("revision 2"), "{}", a.text());
    let now = server.get("/v1/functions/hello/traffic");
    assert_eq!(now.json()["policy"]["weights"], json!({"1": 50, "2": 50}));
    assert_eq!(now.header("etag"), Some("\"2\""));
    // A tag that is no revision is a bad request; `*` and no header change it anyway.
    assert_eq!(
        put(&json!({"weights": {"2": 100}}), Some("W/2")).status,
        400
    );
    assert_eq!(put(&json!({"weights": {"2": 100}}), Some("*")).status, 200);
    assert_eq!(put(&json!({"weights": {"1": 100}}), None).status, 200);

    // Rolled back to no policy, the function is at revision 0 again, and a change decided
    // on that tag goes through.
    server.deploy_example("fresh", "hello", "");
    let fresh = |method: &str, path: &str, tag: Option<&str>, body: &Value| {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(tag) = tag {
            headers.push(("if-match", tag));
        }
        server.request(method, path, &headers, body.to_string().as_bytes())
    };
    let traffic = "/v1/functions/fresh/traffic";
    assert_eq!(
        fresh("PUT", traffic, None, &json!({"weights": {"1": 100}})).status,
        200
    );
    let back = fresh("POST", "/v1/functions/fresh/rollback", None, &json!({}));
    assert_eq!(back.status, 200, "{}", back.text());
    let read = server.get(traffic);
    assert!(read.json()["policy"].is_null(), "{}", read.text());
    assert_eq!(read.header("etag"), Some("\"0\""));
    let a = fresh(
        "PUT",
        traffic,
        Some("\"0\""),
        &json!({"weights": {"1": 100}}),
    );
    assert_eq!(a.status, 200, "{}", a.text());
}
