//! Multi-tenant security over real HTTP: API keys and scopes, tenant isolation, public
//! functions, the admin-key bootstrap, rate limits, signed bundles and the audit log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_tests::{Answer, Launch, TestServer, example, parse_csv, root, temp_dir};
use serde_json::{Value, json};

/// Creates a key through the API (as admin); returns its secret and id.
fn create_key(
    server: &TestServer,
    tenant: &str,
    scopes: &[&str],
    rate: Option<&str>,
) -> (String, String) {
    let mut body = json!({"tenant": tenant, "scopes": scopes});
    if let Some(r) = rate {
        body["rate"] = r.into();
    }
    let a = server.request("POST", "/v1/keys", &[], body.to_string().as_bytes());
    assert_eq!(a.status, 201, "{}", a.text());
    let v = a.json();
    (
        v["key"].as_str().unwrap().to_string(),
        v["id"].as_str().unwrap().to_string(),
    )
}

/// A request with API key `key` (empty: none).
fn call(server: &TestServer, key: &str, method: &str, path: &str, body: &[u8]) -> Answer {
    let bearer = if key.is_empty() {
        String::new()
    } else {
        format!("Bearer {key}")
    };
    server.request(method, path, &[("authorization", &bearer)], body)
}

/// Deploys a bare example component with key `key`.
fn deploy_as(
    server: &TestServer,
    key: &str,
    name: &str,
    example_name: &str,
    query: &str,
) -> Answer {
    let bearer = format!("Bearer {key}");
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    server.request(
        "POST",
        &format!("/v1/functions/{name}/versions{q}"),
        &[
            ("content-type", "application/wasm"),
            ("authorization", &bearer),
        ],
        &std::fs::read(example(example_name)).unwrap(),
    )
}

#[test]
fn control_plane_needs_a_key_with_the_right_scope() {
    let server = TestServer::start();
    server.deploy_example("hello", "hello", "");
    // No key: 401 with a challenge; a made-up key: 401.
    let a = call(&server, "", "GET", "/v1/functions", b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (401, "auth.missing_key")
    );
    assert!(a.header("www-authenticate").unwrap().starts_with("Bearer"));
    let a = call(
        &server,
        "kiln_000000000000_nope",
        "GET",
        "/v1/functions",
        b"",
    );
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
    // /metrics names every tenant's functions: admin only. /healthz stays open.
    assert_eq!(call(&server, "", "GET", "/metrics", b"").status, 401);
    assert_eq!(call(&server, "", "GET", "/healthz", b"").status, 200);

    // A key with usage:read only can read usage, and nothing else.
    let (reader, _) = create_key(&server, "acme", &["usage:read"], None);
    assert_eq!(call(&server, &reader, "GET", "/v1/usage", b"").status, 200);
    for (method, path) in [
        ("POST", "/v1/keys"),
        ("GET", "/v1/keys"),
        ("GET", "/v1/audit"),
        ("GET", "/metrics"),
    ] {
        let a = call(&server, &reader, method, path, b"{}");
        assert_eq!(
            (a.status, a.error_code().as_str()),
            (403, "auth.forbidden"),
            "{method} {path}: {}",
            a.text()
        );
    }
    let a = deploy_as(&server, &reader, "mine", "hello", "");
    assert_eq!(a.status, 403, "{}", a.text());
    assert!(a.text().contains("deploy scope"), "{}", a.text());

    // A deploy scope is a pattern over function names.
    let (team, _) = create_key(&server, "acme", &["deploy:team-*", "invoke:team-*"], None);
    assert_eq!(
        deploy_as(&server, &team, "team-hello", "hello", "").status,
        201
    );
    let a = deploy_as(&server, &team, "other-hello", "hello", "");
    assert_eq!(a.status, 403, "{}", a.text());
    assert_eq!(
        call(&server, &team, "GET", "/fn/team-hello/", b"").text(),
        "hello\n"
    );
    // Same tenant, no deploy scope: may not delete it.
    let a = call(&server, &reader, "DELETE", "/v1/functions/team-hello", b"");
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
        call(&server, &key, "GET", "/fn/acme-hello/", b"").text(),
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
    let a = call(&server, &key, "GET", "/fn/acme-hello/", b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (401, "auth.revoked_key"),
        "{}",
        a.text()
    );
    assert_eq!(call(&server, &key, "GET", "/v1/functions", b"").status, 401);
    let mut server = server;
    server.restart();
    assert_eq!(call(&server, &key, "GET", "/v1/functions", b"").status, 401);
    assert_eq!(
        server.request("DELETE", "/v1/keys/nope", &[], b"").status,
        404
    );
}

#[test]
fn tenants_cannot_touch_each_others_functions_usage_or_models() {
    let server = TestServer::start();
    let all = ["deploy:*", "invoke:*", "usage:read", "audit:read"];
    let (a_key, _) = create_key(&server, "tenant-a", &all, None);
    let (b_key, _) = create_key(&server, "tenant-b", &all, None);

    // B deploys a function with its own model (a digits manifest) and calls it once.
    let model = std::fs::read(root().join("examples/digits/model/digits.onnx")).unwrap();
    let model_digest = kiln_tests::digest(&model);
    let put = |key: &str, bytes: &[u8]| {
        let d = kiln_tests::digest(bytes);
        let a = call(&server, key, "PUT", &format!("/v1/blobs/{d}"), bytes);
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
        call(
            &server,
            &b_key,
            "GET",
            "/fn/b-fn/nn/load?name=b-secret-model",
            b""
        )
        .text(),
        "ok\n"
    );

    // A cannot deploy over, invoke, show, delete, purge or list B's function...
    let a = deploy_as(&server, &a_key, "b-fn", "hello", "");
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
        let a = call(&server, &a_key, method, path, b"");
        let missing = call(
            &server,
            &a_key,
            method,
            &path.replace("b-fn", "no-such-fn"),
            b"",
        );
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
    let listed = call(&server, &a_key, "GET", "/v1/functions", b"").json();
    assert_eq!(listed["functions"], json!([]));
    assert_eq!(
        call(&server, &b_key, "GET", "/fn/b-fn/counter", b"").text(),
        "1\n",
        "B's function still serves B"
    );

    // ...nor read B's usage: asking for it is refused, and A's own view has none of it.
    let a = call(&server, &a_key, "GET", "/v1/usage?tenant=tenant-b", b"");
    assert_eq!(a.status, 403, "{}", a.text());
    let mine = call(&server, &a_key, "GET", "/v1/usage?format=csv", b"");
    assert!(parse_csv(&mine.text()).is_empty(), "{}", mine.text());

    // ...nor use B's model: its blob is invisible to A, and naming it fails the deploy.
    let a = call(
        &server,
        &a_key,
        "HEAD",
        &format!("/v1/blobs/{model_digest}"),
        b"",
    );
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
    let a = call(
        &server,
        &a_key,
        "GET",
        "/fn/a-fn/nn/load?name=b-secret-model",
        b"",
    );
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
    let b_view = parse_csv(&call(&server, &b_key, "GET", "/v1/usage?format=csv", b"").text());
    assert!(b_view.iter().all(|r| r.get("tenant") == "tenant-b") && !b_view.is_empty());

    // The caller's key never reaches the guest: a function cannot collect its callers' keys.
    let seen = call(&server, &b_key, "GET", "/fn/b-fn/request-headers", b"").text();
    assert!(
        seen.contains("user-agent") && !seen.contains("authorization"),
        "{seen}"
    );
}

#[test]
fn public_functions_need_no_key_and_bill_their_owner() {
    let server = TestServer::start();
    let (key, _) = create_key(&server, "pub", &["deploy:*", "invoke:*"], None);
    assert_eq!(
        deploy_as(&server, &key, "open", "hello", "public=true").status,
        201
    );
    assert_eq!(deploy_as(&server, &key, "closed", "hello", "").status, 201);
    let a = call(&server, "", "GET", "/fn/open/", b"");
    assert_eq!((a.status, a.text().as_str()), (200, "hello\n"));
    // A private function and a missing one look the same to an anonymous caller.
    for path in ["/fn/closed/", "/fn/missing/"] {
        let a = call(&server, "", "GET", path, b"");
        assert_eq!(
            (a.status, a.error_code().as_str()),
            (401, "auth.missing_key"),
            "{path}"
        );
    }
    // A wrong key is refused even on a public function.
    assert_eq!(
        call(&server, "kiln_bad", "GET", "/fn/open/", b"").status,
        401
    );
    let info = server.get("/v1/functions/open").json();
    assert_eq!(
        (info["public"].clone(), info["tenant"].clone()),
        (json!(true), json!("pub"))
    );
    // A later version can make it private again.
    assert_eq!(
        deploy_as(&server, &key, "open", "hello", "public=false").status,
        201
    );
    assert_eq!(call(&server, "", "GET", "/fn/open/", b"").status, 401);
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
        args: Vec::new(),
    };
    let mut server = TestServer::launch(dir, None, launch).expect("serves");
    let key = server
        .banner
        .iter()
        .find(|l| l.starts_with("kiln_"))
        .cloned()
        .expect("an admin key is printed");
    assert_eq!(call(&server, &key, "GET", "/v1/keys", b"").status, 200);
    assert_eq!(call(&server, "", "GET", "/v1/functions", b"").status, 401);
    server.restart();
    assert!(
        server.banner.iter().all(|l| !l.starts_with("kiln_")),
        "printed once: {:?}",
        server.banner
    );
    assert_eq!(call(&server, &key, "GET", "/v1/keys", b"").status, 200);
    let audit = call(&server, &key, "GET", "/v1/audit?action=key.bootstrap", b"").json();
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
    let r = agent
        .post(format!("{url}/v1/keys"))
        .header("content-type", "application/json")
        .send(r#"{"tenant":"ops","scopes":["admin"]}"#)
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = agent.get(format!("{url}/v1/functions")).call().unwrap();
    assert_eq!(r.status().as_u16(), 401, "no longer open once a key exists");
    // With KILN_ADMIN_KEY it starts and enforces keys.
    let launch = Launch {
        admin_key: Some(kiln_tests::ADMIN_KEY.into()),
        args: beyond(&[]).args,
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
        args: Vec::new(),
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
    let (slow, _) = create_key(&server, "default", &["invoke:*", "usage:read"], Some("3/m"));
    for _ in 0..3 {
        assert_eq!(call(&server, &slow, "GET", "/fn/hello/", b"").status, 200);
    }
    let a = call(&server, &slow, "GET", "/fn/hello/", b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (429, "rate.limited"),
        "{}",
        a.text()
    );
    let wait: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&wait), "retry-after {wait}");
    assert_eq!(call(&server, &slow, "GET", "/v1/usage", b"").status, 429);
    // Other keys are not affected.
    assert_eq!(server.get("/fn/hello/").status, 200);

    // Per function (manifest [limits] rate): shared by every caller.
    let (other, _) = create_key(&server, "default", &["invoke:*"], None);
    assert_eq!(server.get("/fn/limited/").status, 200);
    assert_eq!(
        call(&server, &other, "GET", "/fn/limited/", b"").status,
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
fn signed_bundles_are_required_verified_and_shown() {
    let dir = temp_dir("signing");
    let keygen = |name: &str| {
        let file = dir.join(name);
        let out = std::process::Command::new(kiln_tests::kiln_bin())
            .args(["keygen", "--out", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            file,
            String::from_utf8(out.stdout).unwrap().trim().to_string(),
        )
    };
    let (key_file, public) = keygen("publisher.key");
    assert!(public.starts_with("ed25519:"), "{public}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (rogue_file, _) = keygen("rogue.key");

    // Tenant `secured` must sign; the others need not.
    let server = TestServer::start_with_config(&format!(
        "[auth.tenant_publishers]\nsecured = [\"{public}\"]\n"
    ));
    let (secured, _) = create_key(&server, "secured", &["deploy:*", "invoke:*"], None);
    let hello = example("hello");
    let hello_path = hello.to_str().unwrap();
    let deploy = |name: &str, sign: Option<&std::path::Path>| {
        let mut args = vec!["deploy", hello_path, "--name", name];
        if let Some(k) = sign {
            args.extend(["--sign", k.to_str().unwrap()]);
        }
        let out = server.cli_as(&secured, &args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Signed with the trusted key: deployed, and the version names its signer. Signing
    // again (a newer signature) deploys again.
    let (ok, err) = deploy("signed", Some(&key_file));
    assert!(ok, "{err}");
    let v = server.get("/v1/functions/signed/versions/1").json();
    assert_eq!(v["signer"], public.as_str());
    assert_eq!(
        call(&server, &secured, "GET", "/fn/signed/", b"").text(),
        "hello\n"
    );
    assert!(deploy("signed", Some(&key_file)).0);
    // Unsigned: refused through the CLI and as a bare upload; untrusted signer: refused.
    let (ok, err) = deploy("unsigned", None);
    assert!(!ok && err.contains("bundle.unsigned"), "{err}");
    let a = deploy_as(&server, &secured, "bare", "hello", "");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (403, "bundle.unsigned")
    );
    let (ok, err) = deploy("rogue", Some(&rogue_file));
    assert!(!ok && err.contains("bundle.untrusted_signer"), "{err}");
    // The owner's rule holds for an admin too: no unsigned version of a secured function.
    let a = server.deploy_wasm("signed", &std::fs::read(&hello).unwrap(), "");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (403, "bundle.unsigned"),
        "{}",
        a.text()
    );
    // Tenants without publishers deploy unsigned bundles as before.
    assert_eq!(
        server
            .deploy_wasm("free", &std::fs::read(&hello).unwrap(), "")
            .status,
        201
    );

    // By hand: a manifest changed after signing, replayed onto another function, or
    // replayed as it was.
    let component = server.put_blob(&std::fs::read(&hello).unwrap());
    let held = call(
        &server,
        &secured,
        "PUT",
        &format!("/v1/blobs/{component}"),
        &std::fs::read(&hello).unwrap(),
    );
    assert!(held.status == 200 || held.status == 201, "{}", held.text());
    let secret = std::fs::read_to_string(&key_file).unwrap();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let post = |function: &str, body: &str, headers: &[(&str, &str)]| {
        let bearer = format!("Bearer {secured}");
        let mut h = vec![
            ("content-type", "application/json"),
            ("authorization", bearer.as_str()),
        ];
        h.extend_from_slice(headers);
        server.request(
            "POST",
            &format!("/v1/functions/{function}/versions"),
            &h,
            body.as_bytes(),
        )
    };
    let manifest = json!({"component": component, "signed_at": now_ms()}).to_string();
    let (signer, sig) = sign_with(&secret, "good", &manifest);
    let headers = [
        ("x-kiln-signer", signer.as_str()),
        ("x-kiln-signature", sig.as_str()),
    ];
    assert_eq!(post("good", &manifest, &headers).status, 201);
    let tampered = manifest.replace('}', r#","limits":{"memory_mb":1024}}"#);
    let a = post("good", &tampered, &headers);
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "bundle.bad_signature"),
        "{}",
        a.text()
    );
    assert_eq!(
        post("elsewhere", &manifest, &headers).error_code(),
        "bundle.bad_signature"
    );
    let a = post("good", &manifest, &[("x-kiln-signer", signer.as_str())]);
    assert_eq!(a.error_code(), "bundle.malformed_signature");
    let a = post("good", &manifest, &headers);
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "bundle.replayed"),
        "{}",
        a.text()
    );
    // Deleting the function does not make an old signature usable again.
    assert_eq!(
        call(&server, &secured, "DELETE", "/v1/functions/good", b"").status,
        200
    );
    assert_eq!(
        post("good", &manifest, &headers).error_code(),
        "bundle.replayed"
    );
    let unstamped = json!({"component": component}).to_string();
    let (s2, g2) = sign_with(&secret, "good", &unstamped);
    let a = post(
        "good",
        &unstamped,
        &[
            ("x-kiln-signer", s2.as_str()),
            ("x-kiln-signature", g2.as_str()),
        ],
    );
    assert_eq!(a.error_code(), "bundle.malformed_signature", "{}", a.text());

    // A stored blob altered on disk after upload no longer matches its digest.
    let blob = find_blob(&server.data_dir, component.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes.push(0);
    std::fs::write(&blob, bytes).unwrap();
    let fresh = json!({"component": component, "signed_at": now_ms()}).to_string();
    let (s3, g3) = sign_with(&secret, "good", &fresh);
    let a = post(
        "good",
        &fresh,
        &[
            ("x-kiln-signer", s3.as_str()),
            ("x-kiln-signature", g3.as_str()),
        ],
    );
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (400, "bundle.digest_mismatch"),
        "{}",
        a.text()
    );
    assert_eq!(
        call(&server, &secured, "GET", "/fn/signed/", b"").text(),
        "hello\n",
        "what was deployed keeps serving"
    );
}

/// Signs as the documented format says (`kiln-bundle-v1 \0 function \0 body`, Ed25519,
/// the seed from a `kiln keygen` file): an implementation apart from Kiln's, so the test
/// holds the wire format, not just agreement with itself. Returns the two header values.
fn sign_with(secret_file_text: &str, function: &str, body: &str) -> (String, String) {
    use ed25519_dalek::Signer;
    let seed: [u8; 32] = secret_file_text
        .lines()
        .find_map(|l| l.strip_prefix("kiln-ed25519-secret:"))
        .map(|h| hex::decode(h.trim()).unwrap().try_into().unwrap())
        .expect("a kiln keygen file");
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let mut message = b"kiln-bundle-v1\0".to_vec();
    message.extend_from_slice(function.as_bytes());
    message.push(0);
    message.extend_from_slice(body.as_bytes());
    (
        format!("ed25519:{}", hex::encode(key.verifying_key().as_bytes())),
        hex::encode(key.sign(&message).to_bytes()),
    )
}

/// The blob file named `hex` under the data dir.
fn find_blob(data_dir: &std::path::Path, hex: &str) -> std::path::PathBuf {
    let mut stack = vec![data_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == hex) {
                return path;
            }
        }
    }
    panic!("blob {hex} not found under {}", data_dir.display());
}

#[test]
fn audit_log_records_who_did_what_and_is_filtered_by_tenant() {
    let server = TestServer::start();
    let (a_key, a_id) = create_key(&server, "tenant-a", &["deploy:*", "audit:read"], None);
    let (b_key, _) = create_key(&server, "tenant-b", &["deploy:*", "audit:read"], None);
    assert_eq!(deploy_as(&server, &a_key, "a-fn", "hello", "").status, 201);
    assert_eq!(deploy_as(&server, &b_key, "a-fn", "hello", "").status, 403);
    assert_eq!(
        call(&server, &b_key, "DELETE", "/v1/functions/a-fn", b"").status,
        404
    );
    assert_eq!(
        call(&server, &a_key, "GET", "/v1/functions", b"").status,
        200
    );
    assert_eq!(
        call(&server, &a_key, "DELETE", "/v1/functions/a-fn/cache", b"").status,
        200
    );
    // No key: refused, counted, not written (anyone could flood the log with these).
    for _ in 0..3 {
        assert_eq!(call(&server, "", "GET", "/v1/functions", b"").status, 401);
    }
    assert_eq!(
        call(&server, "kiln_bad", "GET", "/v1/functions", b"").status,
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
    let mine = call(&server, &a_key, "GET", "/v1/audit", b"").json();
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
    let theirs = call(&server, &b_key, "GET", "/v1/audit", b"").json();
    assert!(
        theirs["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["target"] != "a-fn" || e["tenant"] == "tenant-b"),
        "{theirs:#}"
    );
    assert_eq!(
        call(&server, &a_key, "GET", "/v1/audit?tenant=tenant-b", b"").status,
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

/// A local upstream on a free port: answers every request with `pong`, or (`silent`)
/// accepts connections and never answers. Returns its port.
fn upstream(silent: bool) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            if silent {
                held.push(conn);
                continue;
            }
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\npong",
                );
            });
        }
    });
    port
}

#[test]
fn outbound_http_is_denied_unless_allowed_and_bounded_in_time() {
    let (up, silent) = (upstream(false), upstream(true));
    // A port nobody may call: it must never see a connection.
    let never = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    never.set_nonblocking(true).unwrap();
    let never_port = never.local_addr().unwrap().port();

    // Upstreams on loopback: the operator opts in to private addresses.
    let server = TestServer::start_with_config(
        "[runtime]\noutbound_timeout_ms = 700\nallow_private_outbound = true\n",
    );
    server.deploy_toml(
        "caller",
        "hostile",
        &format!(
            "allowed_outbound_hosts = [\"http://127.0.0.1:{up}\", \"http://localhost:*\"]\n[limits]\ntimeout_ms = 5000\n"
        ),
    );
    let v = server.get("/v1/functions/caller/versions/1").json();
    assert_eq!(
        v["allowed_outbound_hosts"],
        json!([format!("http://127.0.0.1:{up}"), "http://localhost:*"])
    );

    let call_out = |url: String| server.get(&format!("/fn/caller/outbound?url={url}")).text();
    assert_eq!(
        call_out(format!("http://127.0.0.1:{up}/ping")),
        "status 200\n"
    );
    assert_eq!(
        call_out(format!("http://localhost:{up}/ping")),
        "status 200\n",
        "a port wildcard"
    );
    // Denied before any connection, naming the address.
    let denied = call_out(format!("http://127.0.0.1:{never_port}/"));
    assert!(
        denied.contains(&format!(
            "outbound HTTP to http://127.0.0.1:{never_port} is not allowed"
        )),
        "{denied}"
    );
    let https = call_out(format!("https://127.0.0.1:{up}/"));
    assert!(https.contains("not allowed"), "another scheme: {https}");
    assert!(
        matches!(never.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a denied call connected"
    );

    // An allowed upstream that never answers: cut off by the host-side timeout, so the
    // guest sees the error and answers (past the request's own 5 s it would be a 504).
    let deploy = server.deploy_manifest(
        "slow-caller",
        &json!({"component": server.put_blob(&std::fs::read(example("hostile")).unwrap()),
                "allowed_outbound_hosts": [format!("http://127.0.0.1:{silent}")],
                "limits": {"timeout_ms": 5000}}),
    );
    assert_eq!(deploy.status, 201, "{}", deploy.text());
    let a = server.get(&format!(
        "/fn/slow-caller/outbound?url=http://127.0.0.1:{silent}/"
    ));
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(a.text().contains("Timeout"), "{}", a.text());

    // Bad entries are refused at deploy, naming them.
    let bad = server.deploy_manifest(
        "bad-caller",
        &json!({"component": server.put_blob(&std::fs::read(example("hostile")).unwrap()),
                "allowed_outbound_hosts": ["ftp://files.example.com"]}),
    );
    assert_eq!(
        (bad.status, bad.error_code().as_str()),
        (400, "request.invalid")
    );
    assert!(
        bad.text().contains("ftp://files.example.com"),
        "{}",
        bad.text()
    );

    // Without the operator's opt-in, a manifest cannot open the server's own network:
    // loopback, by address or by a name resolving to it, is refused before connecting.
    let locked = TestServer::start();
    let a = locked.deploy_manifest(
        "caller",
        &json!({"component": locked.put_blob(&std::fs::read(example("hostile")).unwrap()),
                "allowed_outbound_hosts": [format!("http://127.0.0.1:{never_port}"), "http://localhost:*"]}),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    for url in [
        format!("http://127.0.0.1:{never_port}/"),
        format!("http://localhost:{never_port}/"),
    ] {
        let why = locked.get(&format!("/fn/caller/outbound?url={url}")).text();
        assert!(why.contains("non-public address"), "{url}: {why}");
    }
    assert!(
        matches!(never.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a refused call connected"
    );
}
