//! The audit log over real HTTP: who did what to which tenant's function, what is not
//! written (keyless refusals), tenant filters, `kiln audit`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_tests::TestServer;

#[test]
fn audit_log_records_who_did_what_and_is_filtered_by_tenant() {
    let server = TestServer::start();
    let (a_key, a_id) = server.create_key("tenant-a", &["deploy:*", "audit:read"], None);
    let (b_key, _) = server.create_key("tenant-b", &["deploy:*", "audit:read"], None);
    assert_eq!(server.deploy_as(&a_key, "a-fn", "hello", "").status, 201);
    assert_eq!(server.deploy_as(&b_key, "a-fn", "hello", "").status, 403);
    assert_eq!(
        server
            .call_as(&b_key, "DELETE", "/v1/functions/a-fn", b"")
            .status,
        404
    );
    assert_eq!(
        server.call_as(&a_key, "GET", "/v1/functions", b"").status,
        200
    );
    assert_eq!(
        server
            .call_as(&a_key, "DELETE", "/v1/functions/a-fn/cache", b"")
            .status,
        200
    );
    // No key: refused, counted, not written (anyone could flood the log with these).
    for _ in 0..3 {
        assert_eq!(server.call_as("", "GET", "/v1/functions", b"").status, 401);
    }
    assert_eq!(
        server
            .call_as("kiln_bad", "GET", "/v1/functions", b"")
            .status,
        401
    );
    let metrics = server.get("/metrics").text();
    assert_eq!(
        kiln_tests::metric_sample(&metrics, "kiln_auth_refusals_total{reason=\"missing_key\"}"),
        3.0
    );
    assert_eq!(
        kiln_tests::metric_sample(&metrics, "kiln_auth_refusals_total{reason=\"invalid_key\"}"),
        1.0
    );

    let all = server.get("/v1/audit?limit=100").json();
    let entries = all["entries"].as_array().unwrap();
    let find = |action: &str, outcome: &str| {
        entries
            .iter()
            .find(|e| e["action"] == action && e["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {action} {outcome} in {all:#}"))
    };
    let created = find("version.create", "ok");
    assert_eq!(
        (
            created["key_id"].as_str(),
            created["tenant"].as_str(),
            created["target"].as_str()
        ),
        (Some(a_id.as_str()), Some("tenant-a"), Some("a-fn"))
    );
    assert!(
        created["detail"]
            .as_str()
            .unwrap()
            .starts_with("version 1 (sha256:"),
        "{created}"
    );
    let denied = find("version.create", "denied");
    assert_eq!(
        (denied["tenant"].as_str(), denied["status"].as_u64()),
        (Some("tenant-b"), Some(403))
    );
    let hidden = find("function.delete", "failed");
    assert_eq!(
        (hidden["tenant"].as_str(), hidden["status"].as_u64()),
        (Some("tenant-b"), Some(404))
    );
    assert_eq!(
        find("function.list", "ok")["key_id"],
        a_id.as_str(),
        "reads are recorded too"
    );
    assert!(
        entries.iter().all(|e| e["status"] != 401),
        "no rows for calls without a key"
    );
    assert!(
        find("key.create", "ok")["detail"]
            .as_str()
            .unwrap()
            .contains("tenant-b")
    );
    assert_eq!(find("cache.clear", "ok")["target"], "a-fn");
    let seqs: Vec<i64> = entries.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seqs:?}"
    );
    assert!(entries[0]["at"].as_str().unwrap().ends_with('Z'));

    // An admin acting on tenant A's function: A's own view shows it; B's does not.
    assert_eq!(
        server
            .request("DELETE", "/v1/functions/a-fn", &[], b"")
            .status,
        200
    );
    let mine = server.call_as(&a_key, "GET", "/v1/audit", b"").json();
    let mine = mine["entries"].as_array().unwrap();
    assert!(
        mine.iter()
            .all(|e| e["tenant"] == "tenant-a" || e["subject_tenant"] == "tenant-a"),
        "{mine:#?}"
    );
    let by_admin = mine
        .iter()
        .find(|e| e["action"] == "function.delete" && e["outcome"] == "ok")
        .expect("A sees the admin's delete");
    assert_eq!(by_admin["tenant"], "default");
    let theirs = server.call_as(&b_key, "GET", "/v1/audit", b"").json();
    assert!(
        theirs["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["target"] != "a-fn" || e["tenant"] == "tenant-b"),
        "{theirs:#}"
    );
    assert_eq!(
        server
            .call_as(&a_key, "GET", "/v1/audit?tenant=tenant-b", b"")
            .status,
        403
    );

    // `kiln audit` prints a table, filtered.
    let out = server.cli(&["audit", "--action", "version.create"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("AT"), "{table}");
    assert!(
        table.lines().skip(1).all(|l| l.contains("version.create")),
        "{table}"
    );
    assert_eq!(table.lines().count(), 3, "{table}");
}
