//! Aliases (named traffic policies: staging, prod) over real HTTP: routing by
//! `/fn/{name}:{alias}/`, blue-green by `kiln promote`, the warm switch back with
//! `kiln rollback --alias`, validation, and persistence.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_tests::{Answer, TestServer, json};
use serde_json::Value;

fn put_alias(server: &TestServer, alias: &str, body: &Value) -> Answer {
    server.request(
        "PUT",
        &format!("/v1/functions/hello/aliases/{alias}"),
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// The version that answered `path`, and whether it paid a cold start.
fn served(server: &TestServer, path: &str) -> (u32, bool) {
    let a = server.get(path);
    assert_eq!(a.status, 200, "{path}: {}", a.text());
    (
        a.header("x-kiln-version").unwrap().parse().unwrap(),
        a.header("server-timing")
            .unwrap_or_default()
            .contains("cold;"),
    )
}

#[test]
fn aliases_route_by_name_and_promote_swaps_them_with_a_warm_switch_back() {
    let mut server = TestServer::start();
    for _ in 0..3 {
        server.deploy_example("hello", "hello", "");
    }
    assert_eq!(
        put_alias(&server, "prod", &json!({"weights": {"1": 100}})).status,
        200
    );
    let out = server.cli_ok(&["traffic", "hello", "2=100", "--alias", "staging"]);
    assert_eq!(out.trim(), "hello:staging (revision 1): 2=100");
    assert_eq!(served(&server, "/fn/hello:prod/").0, 1);
    assert_eq!(served(&server, "/fn/hello:staging/").0, 2);
    assert_eq!(
        served(&server, "/fn/hello/").0,
        3,
        "the main policy is untouched"
    );
    assert_eq!(served(&server, "/fn/hello:default/").0, 3);
    let missing = server.get("/fn/hello:qa/");
    assert_eq!(
        (missing.status, missing.error_code().as_str()),
        (404, "alias.not_found")
    );
    assert_eq!(server.get("/fn/hello@1:prod/").status, 400);

    // After a restart nothing is loaded: promoting loads both sides of the swap, so
    // neither the new prod (v2) nor the switch back (v1) pays a cold start.
    server.restart();
    assert_eq!(
        served(&server, "/fn/hello/"),
        (3, true),
        "the first request to a version after a restart is cold"
    );
    let out = server.cli_ok(&["promote", "hello", "--from", "staging", "--to", "prod"]);
    assert_eq!(out.trim(), "hello:prod (revision 2): 2=100");
    assert_eq!(served(&server, "/fn/hello:prod/"), (2, false));
    let history = server.get("/v1/functions/hello/history").json();
    let last = &history["history"][0];
    assert_eq!(
        (last["kind"].clone(), last["detail"]["alias"].clone()),
        (json!("promote"), json!("prod"))
    );
    assert_eq!(last["reason"], "promoted from staging");
    assert_eq!(last["detail"]["previous"]["weights"], json!({"1": 100}));
    let out = server.cli_ok(&[
        "rollback",
        "hello",
        "--alias",
        "prod",
        "--reason",
        "bad numbers",
    ]);
    assert_eq!(out.trim(), "hello:prod (revision 3): 1=100");
    assert_eq!(
        served(&server, "/fn/hello:prod/"),
        (1, false),
        "the switch back is warm"
    );
    assert_eq!(
        served(&server, "/fn/hello:staging/").0,
        2,
        "aliases survive a restart"
    );

    // Promoting onto the main policy: what /fn/hello/ serves.
    server.cli_ok(&["promote", "hello", "--from", "staging", "--to", "default"]);
    assert_eq!(served(&server, "/fn/hello/").0, 2);
    let shown = server.cli_ok(&["traffic", "hello"]);
    assert!(
        shown.contains("hello (revision 1): 2=100")
            && shown.contains("hello:prod (revision 3): 1=100")
            && shown.contains("hello:staging (revision 1): 2=100"),
        "{shown}"
    );
}

#[test]
fn aliases_are_validated_and_can_be_removed() {
    let server = TestServer::start();
    server.deploy_example("hello", "hello", "");
    for (alias, body, code) in [
        ("staging", json!({"weights": {"7": 100}}), "request.invalid"),
        ("staging", json!({"weights": {"1": 50}}), "request.invalid"),
        (
            "Bad-Name",
            json!({"weights": {"1": 100}}),
            "request.invalid",
        ),
    ] {
        let a = put_alias(&server, alias, &body);
        assert_eq!(
            (a.status, a.error_code().as_str()),
            (400, code),
            "{alias} {body}"
        );
    }
    let promote = |from: &str, to: &str| {
        server.request(
            "POST",
            "/v1/functions/hello/promote",
            &[("content-type", "application/json")],
            json!({"from": from, "to": to}).to_string().as_bytes(),
        )
    };
    let a = promote("staging", "prod");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (404, "alias.not_found")
    );
    let a = promote("default", "prod");
    assert_eq!(
        a.status, 400,
        "the main policy is empty: nothing to promote"
    );
    assert_eq!(
        put_alias(&server, "staging", &json!({"weights": {"1": 100}})).status,
        200
    );
    assert_eq!(promote("staging", "staging").status, 400);
    assert_eq!(served(&server, "/fn/hello:staging/").0, 1);
    let a = server.request("DELETE", "/v1/functions/hello/aliases/staging", &[], b"");
    assert_eq!((a.status, a.json()["policy"].clone()), (200, Value::Null));
    assert_eq!(server.get("/fn/hello:staging/").status, 404);
    assert_eq!(
        server.get("/v1/functions/hello/aliases/staging").status,
        404
    );
    let a = server.request("DELETE", "/v1/functions/hello/aliases/default", &[], b"");
    assert_eq!(a.status, 400, "the main policy is not an alias to remove");
    // Removing is a change like any other: rolled back, the alias is back.
    let a = server.request(
        "POST",
        "/v1/functions/hello/rollback",
        &[("content-type", "application/json")],
        json!({"alias": "staging"}).to_string().as_bytes(),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(served(&server, "/fn/hello:staging/").0, 1);
}

#[test]
fn versions_a_policy_needs_and_the_switch_back_target_stay_loaded_under_lru_pressure() {
    // One loaded version at a time: every other load evicts.
    let server = TestServer::start_with_config("[runtime]\nloaded_versions = 1\n");
    for _ in 0..4 {
        server.deploy_example("hello", "hello", "");
    }
    server.deploy_example("other", "hello", "");
    let a = server.request(
        "PUT",
        "/v1/functions/hello/traffic",
        &[("content-type", "application/json")],
        json!({"weights": {"4": 100}}).to_string().as_bytes(),
    );
    assert_eq!(a.status, 200);
    assert_eq!(
        put_alias(&server, "prod", &json!({"weights": {"1": 100}})).status,
        200
    );
    assert_eq!(
        put_alias(&server, "staging", &json!({"weights": {"2": 100}})).status,
        200
    );
    server.cli_ok(&["promote", "hello", "--from", "staging", "--to", "prod"]);
    let evict = || {
        let a = server.get("/fn/other/");
        assert_eq!(a.status, 200);
    };
    evict();
    // No policy sends traffic to version 3: evicted, it is cold again.
    assert_eq!(served(&server, "/fn/hello@3/").0, 3);
    evict();
    assert_eq!(served(&server, "/fn/hello@3/"), (3, true), "the LRU evicts");
    evict();
    assert_eq!(served(&server, "/fn/hello:prod/"), (2, false));
    evict();
    server.cli_ok(&["rollback", "hello", "--alias", "prod"]);
    evict();
    assert_eq!(
        served(&server, "/fn/hello:prod/"),
        (1, false),
        "the switch-back target stayed loaded"
    );
}
