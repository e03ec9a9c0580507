//! Cost budgets end to end: a tenant with a hard monthly budget gets 429 `budget.exhausted`
//! once the ledger says the month's cost reached it, with one `budget.threshold` alert at
//! each of 50, 80 and 100% (signed, to a webhook receiver in the test); another tenant is
//! untouched; removing the budget lets the tenant in again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kiln_tests::webhook::Webhook;
use kiln_tests::{TestServer, Value};

#[test]
fn a_hard_budget_stops_its_tenant_alone_and_alerts_at_each_threshold() {
    let hook = Webhook::start(0);
    let server = TestServer::start_with_config(&format!(
        "[pricing]\nper_request = 1000\n[alerts]\nwebhook = {:?}\nsecret = \"0123456789abcdef0123\"\n",
        hook.url
    ));
    let (a_key, _) = server.create_key("tenant-a", &["deploy:*", "invoke:*"], None);
    let (b_key, _) = server.create_key("tenant-b", &["deploy:*", "invoke:*"], None);
    assert_eq!(server.deploy_as(&a_key, "a-hello", "hello", "").status, 201);
    assert_eq!(server.deploy_as(&b_key, "b-hello", "hello", "").status, 201);
    server.cli_ok(&[
        "budgets",
        "set",
        "tenant-a",
        "--monthly",
        "10000",
        "--alert-at",
        "50,80,100",
        "--hard",
    ]);

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answered = 0;
    loop {
        let a = server.call_as(&a_key, "GET", "/fn/a-hello/", b"");
        if a.status == 429 {
            assert_eq!(a.error_code(), "budget.exhausted", "{}", a.text());
            break;
        }
        assert_eq!(a.status, 200, "{}", a.text());
        answered += 1;
        assert!(
            Instant::now() < deadline,
            "never refused after {answered} requests"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Ten requests of 1000 reach the budget; the refusal follows within a refresh.
    assert!(answered >= 10, "refused after {answered} requests");
    let list = server.get("/v1/budgets").json();
    let a = list["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["tenant"] == "tenant-a")
        .cloned()
        .unwrap();
    assert!(a["spent"].as_u64().unwrap() >= 10_000, "{a}");
    assert_eq!(a["exhausted"], true, "{a}");
    // The other tenant is untouched.
    assert_eq!(
        server.call_as(&b_key, "GET", "/fn/b-hello/", b"").status,
        200
    );

    // One alert per threshold, each once.
    hook.wait_for("budget.threshold", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    let percents = loop {
        let mut p: Vec<u64> = hook
            .deliveries()
            .iter()
            .filter_map(|(_, body)| serde_json::from_slice::<Value>(body).ok())
            .filter(|v| v["type"] == "budget.threshold" && v["data"]["tenant"] == "tenant-a")
            .map(|v| v["data"]["percent"].as_u64().unwrap())
            .collect();
        p.sort();
        if p.len() >= 3 || Instant::now() > deadline {
            break p;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(percents, [50, 80, 100]);
    let out = server.cli_ok(&["budgets", "list"]);
    assert!(out.contains("tenant-a"), "{out}");

    // Without the budget, the tenant is served again at once.
    server.cli_ok(&["budgets", "delete", "tenant-a"]);
    assert_eq!(
        server.call_as(&a_key, "GET", "/fn/a-hello/", b"").status,
        200
    );
    // A budget is the admin's to set.
    let a = server.call_as(
        &a_key,
        "PUT",
        "/v1/budgets/tenant-a",
        br#"{"monthly": 100000000}"#,
    );
    assert_eq!(a.status, 403, "{}", a.text());
}
