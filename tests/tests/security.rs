//! Multi-tenant security over real HTTP: API keys and scopes, tenant isolation, public
//! functions, the admin-key bootstrap, rate limits, signed bundles and the audit log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_tests::{Launch, TestServer, example, parse_csv, root, temp_dir};
use serde_json::{Value, json};

#[test]
fn control_plane_needs_a_key_with_the_right_scope() {
    let server = TestServer::start();
    server.deploy_example("hello", "hello", "");
    // No key: 401 with a challenge; a made-up key: 401.
    let a = server.call_as("", "GET", "/v1/functions", b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (401, "auth.missing_key")
    );
    assert!(a.header("www-authenticate").unwrap().starts_with("Bearer"));
    let a = server.call_as("kiln_000000000000_nope", "GET", "/v1/functions", b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (401, "auth.invalid_key")
    );
    let a = server.request(
        "GET",
        "/v1/functions",
        &[("authorization", "Basic Zm9vOmJhcg==")],
        b"",
    );
    assert_eq!(a.status, 401);
    // /metrics names every tenant's functions: admin or metrics:read only. /healthz
    // stays open and says nothing about functions or tenants.
    assert_eq!(server.call_as("", "GET", "/metrics", b"").status, 401);
    let health = server.call_as("", "GET", "/healthz", b"");
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), json!({"status": "ok"}));
    let (scraper, _) = server.create_key("ops", &["metrics:read"], None);
    let scraped = server.call_as(&scraper, "GET", "/metrics", b"");
    assert_eq!(scraped.status, 200, "{}", scraped.text());
    assert!(
        scraped.text().contains("kiln_build_info{version=\""),
        "{}",
        scraped.text()
    );
    for path in ["/v1/usage", "/v1/audit"] {
        let a = server.call_as(&scraper, "GET", path, b"");
        assert_eq!(a.status, 403, "{path}: {}", a.text());
    }
    // Another tenant's private function does not exist for it.
    assert_eq!(
        server.call_as(&scraper, "GET", "/fn/hello/", b"").status,
        404
    );

    // A key with usage:read only can read usage, and nothing else.
    let (reader, _) = server.create_key("acme", &["usage:read"], None);
    assert_eq!(server.call_as(&reader, "GET", "/v1/usage", b"").status, 200);
    for (method, path) in [
        ("POST", "/v1/keys"),
        ("GET", "/v1/keys"),
        ("GET", "/v1/audit"),
        ("GET", "/metrics"),
    ] {
        let a = server.call_as(&reader, method, path, b"{}");
        assert_eq!(
            (a.status, a.error_code().as_str()),
            (403, "auth.forbidden"),
            "{method} {path}: {}",
            a.text()
        );
    }
    let a = server.deploy_as(&reader, "mine", "hello", "");
    assert_eq!(a.status, 403, "{}", a.text());
    assert!(a.text().contains("deploy scope"), "{}", a.text());

    // A deploy scope is a pattern over function names.
    let (team, _) = server.create_key("acme", &["deploy:team-*", "invoke:team-*"], None);
    assert_eq!(
        server.deploy_as(&team, "team-hello", "hello", "").status,
        201
    );
    let a = server.deploy_as(&team, "other-hello", "hello", "");
    assert_eq!(a.status, 403, "{}", a.text());
    assert_eq!(
        server.call_as(&team, "GET", "/fn/team-hello/", b"").text(),
        "hello\n"
    );
    // Same tenant, no deploy scope: may not delete it.
    let a = server.call_as(&reader, "DELETE", "/v1/functions/team-hello", b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (403, "auth.forbidden"),
        "{}",
        a.text()
    );

    // Bad key requests say why.
    for bad in [
        json!({"tenant": "Acme", "scopes": ["admin"]}),
        json!({"tenant": "acme", "scopes": []}),
        json!({"tenant": "acme", "scopes": ["root"]}),
        json!({"tenant": "acme", "scopes": ["admin"], "rate": "lots"}),
        json!({"tenant": "acme", "scopes": ["admin"], "extra": 1}),
    ] {
        let a = server.request("POST", "/v1/keys", &[], bad.to_string().as_bytes());
        assert_eq!(
            (a.status, a.error_code().as_str()),
            (400, "request.invalid"),
            "{bad}: {}",
            a.text()
        );
    }
}

#[test]
fn keys_are_created_listed_and_revoked_at_once_through_the_cli() {
    let server = TestServer::start();
    server.deploy_example("hello", "hello", "");
    let out = server.cli(&[
        "keys",
        "create",
        "--tenant",
        "acme",
        "--scope",
        "deploy:*",
        "--scope",
        "invoke:*",
        "--scope",
        "usage:read",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.lines().last().unwrap().trim().to_string();
    assert!(
        key.starts_with("kiln_"),
        "the key is the last line: {stdout}"
    );

    // The key works for the CLI (KILN_API_KEY) and for HTTP.
    let out = server.cli_as(
        &key,
        &[
            "deploy",
            example("hello").to_str().unwrap(),
            "--name",
            "acme-hello",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        server.call_as(&key, "GET", "/fn/acme-hello/", b"").text(),
        "hello\n"
    );
    // --api-key wins over the environment.
    let out = server.cli_as("", &["functions", "--api-key", &key, "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["acme-hello"],
        "a tenant lists its own functions only"
    );
    let out = server.cli_as("", &["functions"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.missing_key"));

    // The list shows the key, never a secret.
    let out = server.cli(&["keys", "list", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains(&key), "secrets are never listed");
    let keys: Value = serde_json::from_str(&text).unwrap();
    let acme = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["tenant"] == "acme")
        .expect("listed");
    let id = acme["id"].as_str().unwrap().to_string();
    assert_eq!(
        acme["scopes"],
        json!(["deploy:*", "invoke:*", "usage:read"])
    );
    assert!(key.contains(&id), "the secret carries its id");
    let table = String::from_utf8(server.cli(&["keys", "list"]).stdout).unwrap();
    assert!(table.contains(&id) && table.contains("active"), "{table}");

    // Revocation takes effect on the very next request, and survives a restart.
    let out = server.cli(&["keys", "revoke", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = server.call_as(&key, "GET", "/fn/acme-hello/", b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (401, "auth.revoked_key"),
        "{}",
        a.text()
    );
    assert_eq!(
        server.call_as(&key, "GET", "/v1/functions", b"").status,
        401
    );
    let mut server = server;
    server.restart();
    assert_eq!(
        server.call_as(&key, "GET", "/v1/functions", b"").status,
        401
    );
    assert_eq!(
        server.request("DELETE", "/v1/keys/nope", &[], b"").status,
        404
    );
}

#[test]
fn tenants_cannot_touch_each_others_functions_usage_or_models() {
    let server = TestServer::start();
    let all = ["deploy:*", "invoke:*", "usage:read", "audit:read"];
    let (a_key, _) = server.create_key("tenant-a", &all, None);
    let (b_key, _) = server.create_key("tenant-b", &all, None);

    // B deploys a function with its own model (a digits manifest) and calls it once.
    let model = std::fs::read(root().join("examples/digits/model/digits.onnx")).unwrap();
    let model_digest = kiln_tests::digest(&model);
    let put = |key: &str, bytes: &[u8]| {
        let d = kiln_tests::digest(bytes);
        let a = server.call_as(key, "PUT", &format!("/v1/blobs/{d}"), bytes);
        assert!(a.status == 201 || a.status == 200, "{}", a.text());
        d
    };
    put(&b_key, &model);
    let component = put(&b_key, &std::fs::read(example("hostile")).unwrap());
    let manifest =
        json!({"component": component, "models": {"b-secret-model": {"digest": model_digest}}});
    let deploy = |key: &str, name: &str, manifest: &Value| {
        server.request(
            "POST",
            &format!("/v1/functions/{name}/versions"),
            &[
                ("content-type", "application/json"),
                ("authorization", &format!("Bearer {key}")),
            ],
            manifest.to_string().as_bytes(),
        )
    };
    assert_eq!(deploy(&b_key, "b-fn", &manifest).status, 201);
    assert_eq!(
        server
            .call_as(&b_key, "GET", "/fn/b-fn/nn/load?name=b-secret-model", b"")
            .text(),
        "ok\n"
    );

    // A cannot deploy over, invoke, show, delete, purge or list B's function...
    let a = server.deploy_as(&a_key, "b-fn", "hello", "");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (403, "auth.forbidden"),
        "{}",
        a.text()
    );
    for (method, path) in [
        ("GET", "/fn/b-fn/nn/load?name=b-secret-model"),
        ("GET", "/v1/functions/b-fn"),
        ("GET", "/v1/functions/b-fn/versions"),
        ("GET", "/v1/functions/b-fn/versions/1"),
        ("DELETE", "/v1/functions/b-fn/cache"),
        ("DELETE", "/v1/functions/b-fn"),
    ] {
        // Another tenant's function looks exactly like a missing one.
        let a = server.call_as(&a_key, method, path, b"");
        let missing = server.call_as(&a_key, method, &path.replace("b-fn", "no-such-fn"), b"");
        assert_eq!(
            (a.status, a.error_code()),
            (404, "function.not_found".to_string()),
            "{method} {path}: {}",
            a.text()
        );
        assert_eq!(
            a.text().replace("b-fn", "no-such-fn"),
            missing.text(),
            "{method} {path}"
        );
    }
    let listed = server.call_as(&a_key, "GET", "/v1/functions", b"").json();
    assert_eq!(listed["functions"], json!([]));
    assert_eq!(
        server
            .call_as(&b_key, "GET", "/fn/b-fn/counter", b"")
            .text(),
        "1\n",
        "B's function still serves B"
    );

    // ...nor read B's usage: asking for it is refused, and A's own view has none of it.
    let a = server.call_as(&a_key, "GET", "/v1/usage?tenant=tenant-b", b"");
    assert_eq!(a.status, 403, "{}", a.text());
    let mine = server.call_as(&a_key, "GET", "/v1/usage?format=csv", b"");
    assert!(parse_csv(&mine.text()).is_empty(), "{}", mine.text());

    // ...nor use B's model: its blob is invisible to A, and naming it fails the deploy.
    let a = server.call_as(&a_key, "HEAD", &format!("/v1/blobs/{model_digest}"), b"");
    assert_eq!(a.status, 404);
    let a_component = put(&a_key, &std::fs::read(example("hostile")).unwrap());
    let steal = json!({"component": a_component, "models": {"stolen": {"digest": model_digest}}});
    let a = deploy(&a_key, "a-fn", &steal);
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (404, "blob.not_found"),
        "{}",
        a.text()
    );
    // A's guest asking for B's model by name gets NotFound: names are per version.
    assert_eq!(
        deploy(&a_key, "a-fn", &json!({"component": a_component})).status,
        201
    );
    let a = server.call_as(&a_key, "GET", "/fn/a-fn/nn/load?name=b-secret-model", b"");
    assert!(
        a.text()
            .starts_with("not-found: no model named \"b-secret-model\""),
        "{}",
        a.text()
    );
    // Uploading the same bytes proves A holds them: then A may use them.
    put(&a_key, &model);
    assert_eq!(deploy(&a_key, "a-fn", &steal).status, 201);

    // Each request is billed to the tenant of the key that made it.
    let records = parse_csv(
        &server
            .request("GET", "/v1/usage?format=csv", &[], b"")
            .text(),
    );
    let tenant_of = |function: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r.get("function") == function)
            .map(|r| r.get("tenant").to_string())
            .collect()
    };
    assert!(!tenant_of("b-fn").is_empty());
    assert!(
        tenant_of("b-fn").iter().all(|t| t == "tenant-b"),
        "{:?}",
        tenant_of("b-fn")
    );
    assert!(!tenant_of("a-fn").is_empty());
    assert!(
        tenant_of("a-fn").iter().all(|t| t == "tenant-a"),
        "{:?}",
        tenant_of("a-fn")
    );
    let b_view = parse_csv(
        &server
            .call_as(&b_key, "GET", "/v1/usage?format=csv", b"")
            .text(),
    );
    assert!(b_view.iter().all(|r| r.get("tenant") == "tenant-b") && !b_view.is_empty());

    // The caller's key never reaches the guest: a function cannot collect its callers' keys.
    let seen = server
        .call_as(&b_key, "GET", "/fn/b-fn/request-headers", b"")
        .text();
    assert!(
        seen.contains("user-agent") && !seen.contains("authorization"),
        "{seen}"
    );
}

#[test]
fn public_functions_need_no_key_and_bill_their_owner() {
    let server = TestServer::start();
    let (key, _) = server.create_key("pub", &["deploy:*", "invoke:*"], None);
    assert_eq!(
        server
            .deploy_as(&key, "open", "hello", "public=true")
            .status,
        201
    );
    assert_eq!(server.deploy_as(&key, "closed", "hello", "").status, 201);
    let a = server.call_as("", "GET", "/fn/open/", b"");
    assert_eq!((a.status, a.text().as_str()), (200, "hello\n"));
    // A private function and a missing one look the same to an anonymous caller.
    for path in ["/fn/closed/", "/fn/missing/"] {
        let a = server.call_as("", "GET", path, b"");
        assert_eq!(
            (a.status, a.error_code().as_str()),
            (401, "auth.missing_key"),
            "{path}"
        );
    }
    // A wrong key is refused even on a public function.
    assert_eq!(
        server.call_as("kiln_bad", "GET", "/fn/open/", b"").status,
        401
    );
    let info = server.get("/v1/functions/open").json();
    assert_eq!(
        (info["public"].clone(), info["tenant"].clone()),
        (json!(true), json!("pub"))
    );
    // A later version can make it private again.
    assert_eq!(
        server
            .deploy_as(&key, "open", "hello", "public=false")
            .status,
        201
    );
    assert_eq!(server.call_as("", "GET", "/fn/open/", b"").status, 401);
    let records = parse_csv(
        &server
            .request("GET", "/v1/usage?format=csv&function=open", &[], b"")
            .text(),
    );
    assert_eq!(records.len(), 1, "the refused call is not billed");
    assert_eq!(
        records[0].get("tenant"),
        "pub",
        "an anonymous call bills the owner"
    );
}

#[test]
fn first_start_on_loopback_prints_an_admin_key_once() {
    let dir = temp_dir("bootstrap");
    let launch = Launch {
        admin_key: None,
        ..Launch::default()
    };
    let mut server = TestServer::launch(dir, None, launch).expect("serves");
    let key = server
        .banner
        .iter()
        .find(|l| l.starts_with("kiln_"))
        .cloned()
        .expect("an admin key is printed");
    assert_eq!(server.call_as(&key, "GET", "/v1/keys", b"").status, 200);
    assert_eq!(server.call_as("", "GET", "/v1/functions", b"").status, 401);
    server.restart();
    assert!(
        server.banner.iter().all(|l| !l.starts_with("kiln_")),
        "printed once: {:?}",
        server.banner
    );
    assert_eq!(server.call_as(&key, "GET", "/v1/keys", b"").status, 200);
    let audit = server
        .call_as(&key, "GET", "/v1/audit?action=key.bootstrap", b"")
        .json();
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1, "{audit}");
}

#[test]
fn beyond_loopback_without_keys_refuses_to_start_unless_insecure() {
    let beyond = |extra: &[&str]| Launch {
        admin_key: None,
        args: ["--listen", "0.0.0.0:0"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect(),
        env: Vec::new(),
    };
    let log = TestServer::launch(temp_dir("refuse"), None, beyond(&[]))
        .err()
        .expect("refuses to start");
    assert!(
        log.contains("KILN_ADMIN_KEY") && log.contains("--insecure"),
        "{log}"
    );
    // --insecure: no authentication at all.
    let server =
        TestServer::launch(temp_dir("insecure"), None, beyond(&["--insecure"])).expect("serves");
    let url = server.url.replace("0.0.0.0", "127.0.0.1");
    let agent = kiln_tests::agent();
    let r = agent.get(format!("{url}/v1/functions")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(server.log().contains("authentication is OFF"));
    // The first key created turns authentication on, at once.
    // With an Idempotency-Key but no bearer key to seal under, the answer (the new
    // key's secret) is not kept in the database.
    let mut r = agent
        .post(format!("{url}/v1/keys"))
        .header("content-type", "application/json")
        .header("idempotency-key", "first-key")
        .send(r#"{"tenant":"ops","scopes":["admin"]}"#)
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let made: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    let secret = made["key"].as_str().expect("the new key").to_string();
    let r = agent.get(format!("{url}/v1/functions")).call().unwrap();
    assert_eq!(r.status().as_u16(), 401, "no longer open once a key exists");
    // In the SQLite files, when the metadata is there (the suite's second run keeps it in
    // PostgreSQL).
    let mut stored = Vec::new();
    for file in ["kiln.db", "kiln.db-wal"] {
        stored.extend(std::fs::read(server.data_dir.join(file)).unwrap_or_default());
    }
    assert!(
        !stored.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the new key's secret is in the database"
    );
    // With KILN_ADMIN_KEY it starts and enforces keys.
    let launch = Launch {
        admin_key: Some(kiln_tests::ADMIN_KEY.into()),
        args: beyond(&[]).args,
        ..Launch::default()
    };
    let server = TestServer::launch(temp_dir("beyond-key"), None, launch).expect("serves");
    let url = server.url.replace("0.0.0.0", "127.0.0.1");
    assert_eq!(
        agent
            .get(format!("{url}/v1/functions"))
            .call()
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    // A short KILN_ADMIN_KEY is refused.
    let launch = Launch {
        admin_key: Some("short".into()),
        ..Launch::default()
    };
    let log = TestServer::launch(temp_dir("short"), None, launch)
        .err()
        .expect("refuses");
    assert!(log.contains("too short"), "{log}");
}

#[test]
fn rate_limits_per_key_and_per_function_answer_429_with_retry_after() {
    let server = TestServer::start();
    server.deploy_example("hello", "hello", "");
    server.deploy_example("limited", "hello", "rate=2/m");
    // Per key: 3 a minute, on every endpoint.
    let (slow, _) = server.create_key("default", &["invoke:*", "usage:read"], Some("3/m"));
    for _ in 0..3 {
        assert_eq!(server.call_as(&slow, "GET", "/fn/hello/", b"").status, 200);
    }
    let a = server.call_as(&slow, "GET", "/fn/hello/", b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (429, "rate.limited"),
        "{}",
        a.text()
    );
    let wait: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&wait), "retry-after {wait}");
    assert_eq!(server.call_as(&slow, "GET", "/v1/usage", b"").status, 429);
    // Other keys are not affected.
    assert_eq!(server.get("/fn/hello/").status, 200);

    // Per function (manifest [limits] rate): shared by every caller.
    let (other, _) = server.create_key("default", &["invoke:*"], None);
    assert_eq!(server.get("/fn/limited/").status, 200);
    assert_eq!(
        server.call_as(&other, "GET", "/fn/limited/", b"").status,
        200
    );
    let a = server.get("/fn/limited/");
    assert_eq!(a.status, 429, "{}", a.text());
    assert!(
        a.text().contains("function \\\"limited\\\""),
        "{}",
        a.text()
    );
    assert!(a.header("retry-after").is_some());
    assert_eq!(
        server.get("/fn/hello/").status,
        200,
        "other functions keep answering"
    );
    let v = server.get("/v1/functions/limited/versions/1").json();
    assert_eq!(v["limits"]["rate"], "2/m");
}

#[test]
fn forcing_a_version_no_policy_routes_needs_invoke_rights_even_when_public() {
    let server = TestServer::start();
    let (owner, _) = server.create_key("pub", &["deploy:*", "invoke:*"], None);
    let (deployer, _) = server.create_key("pub", &["deploy:*"], None);
    for _ in 0..2 {
        let a = server.deploy_as(&owner, "open", "hello", "public=true");
        assert_eq!(a.status, 201, "{}", a.text());
    }
    // No policy: the latest version takes the traffic; forcing it is fine for anyone.
    assert_eq!(server.call_as("", "GET", "/fn/open@2/", b"").status, 200);
    // Version 1 takes none: an anonymous caller cannot reach it, by path or by header.
    let a = server.call_as("", "GET", "/fn/open@1/", b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (403, "auth.forbidden"),
        "{}",
        a.text()
    );
    assert!(a.text().contains("takes no public traffic"), "{}", a.text());
    let a = server.request(
        "GET",
        "/fn/open/",
        &[("authorization", ""), ("x-kiln-version", "1")],
        b"",
    );
    assert_eq!(a.status, 403, "{}", a.text());
    // A key of the tenant without invoke rights neither; with them, yes.
    assert_eq!(
        server.call_as(&deployer, "GET", "/fn/open@1/", b"").status,
        403
    );
    let a = server.call_as(&owner, "GET", "/fn/open@1/", b"");
    assert_eq!((a.status, a.header("x-kiln-version")), (200, Some("1")));
    // A policy that routes version 1 opens it to everyone; version 2, now at 0%, closes.
    let pin = server.request(
        "PUT",
        "/v1/functions/open/traffic",
        &[("content-type", "application/json")],
        json!({"weights": {"1": 100}}).to_string().as_bytes(),
    );
    assert_eq!(pin.status, 200, "{}", pin.text());
    assert_eq!(server.call_as("", "GET", "/fn/open@1/", b"").status, 200);
    assert_eq!(server.call_as("", "GET", "/fn/open@2/", b"").status, 403);
}
