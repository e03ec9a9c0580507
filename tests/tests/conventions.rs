//! The API's conventions, as a client sees them over real HTTP: every list paged by cursor,
//! `Idempotency-Key` on the creates, `HEAD` on every `GET`, times in RFC 3339 (offsets and
//! spans back from now accepted), the OpenAPI document served without a key, and the CLI's
//! `--output json` for answers and errors alike.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use kiln_tests::{TestServer, example};
use serde_json::{Value, json};

/// Walks a list `limit` items at a time; returns the items' `field`s in order and the
/// number of pages.
fn walk(
    server: &TestServer,
    path: &str,
    key: &str,
    field: &str,
    limit: usize,
) -> (Vec<String>, usize) {
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut url = format!("{path}{sep}limit={limit}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let a = server.get(&url);
        assert_eq!(a.status, 200, "{url}: {}", a.text());
        let v = a.json();
        let items = v[key].as_array().unwrap();
        assert!(items.len() <= limit, "{url}: {} items", items.len());
        seen.extend(items.iter().map(|i| match &i[field] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }));
        pages += 1;
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => {
                assert!(v["next_cursor"].is_null(), "{v}");
                return (seen, pages);
            }
        }
    }
}

#[test]
fn every_list_pages_by_cursor_without_repeats_or_gaps() {
    let server = TestServer::start();
    let wasm = std::fs::read(example("hello")).unwrap();
    for name in ["pa", "pb", "pc", "pd", "pe"] {
        assert_eq!(server.deploy_wasm(name, &wasm, "").status, 201);
    }
    for _ in 0..4 {
        assert_eq!(server.deploy_wasm("pa", &wasm, "").status, 201);
    }
    for t in ["t1", "t2", "t3", "t4"] {
        server.create_key(t, &["invoke:*"], None);
    }

    let (names, pages) = walk(&server, "/v1/functions", "functions", "name", 2);
    assert_eq!(names, ["pa", "pb", "pc", "pd", "pe"]);
    assert_eq!(pages, 3);
    let (versions, _) = walk(
        &server,
        "/v1/functions/pa/versions",
        "versions",
        "version",
        2,
    );
    assert_eq!(versions, ["1", "2", "3", "4", "5"]);
    let (keys, _) = walk(&server, "/v1/keys", "keys", "id", 2);
    let everything = server.get("/v1/keys?limit=1000").json();
    let all: Vec<&str> = everything["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(keys, all, "pages of two are the one big page, in order");
    assert!(all.len() >= 4, "{everything}");
    let (audit, pages) = walk(&server, "/v1/audit?action=key.create", "entries", "seq", 3);
    assert_eq!(audit.len(), 4);
    assert_eq!(pages, 2);
    let seqs: BTreeSet<&String> = audit.iter().collect();
    assert_eq!(seqs.len(), 4, "no entry twice: {audit:?}");
    let (history, _) = walk(&server, "/v1/functions/pa/history", "history", "seq", 1);
    assert!(history.is_empty(), "no traffic changes yet: {history:?}");
    for weights in [
        json!({"1": 100}),
        json!({"2": 100}),
        json!({"1": 50, "2": 50}),
    ] {
        let put = server.request(
            "PUT",
            "/v1/functions/pa/traffic",
            &[("content-type", "application/json")],
            json!({ "weights": weights }).to_string().as_bytes(),
        );
        assert_eq!(put.status, 200, "{}", put.text());
    }
    let (history, pages) = walk(&server, "/v1/functions/pa/history", "history", "seq", 1);
    let distinct: BTreeSet<&String> = history.iter().collect();
    assert_eq!(
        (history.len(), distinct.len(), pages),
        (3, 3, 3),
        "{history:?}"
    );

    // A page that ends the list says so; a cursor of another list or a bad limit is a 400.
    let last = server.get("/v1/functions?limit=5").json();
    assert!(last["next_cursor"].is_null(), "{last}");
    let versions_cursor = server.get("/v1/functions/pa/versions?limit=1").json()["next_cursor"]
        .as_str()
        .unwrap()
        .to_string();
    for bad in [
        format!("/v1/functions?cursor={versions_cursor}"),
        "/v1/functions?cursor=not-a-cursor".to_string(),
        "/v1/functions?limit=0".to_string(),
        "/v1/keys?limit=1001".to_string(),
        "/v1/functions?page=2".to_string(),
    ] {
        let a = server.get(&bad);
        assert_eq!(a.status, 400, "{bad}: {}", a.text());
        assert_eq!(a.error_code(), "request.invalid", "{bad}");
    }

    // The CLI follows the cursors: every function, every audit entry asked for.
    let cli: Value = serde_json::from_str(&server.cli_ok(&["functions", "-o", "json"])).unwrap();
    assert_eq!(cli.as_array().unwrap().len(), 5);
    let cli: Value =
        serde_json::from_str(&server.cli_ok(&["audit", "--limit", "3", "-o", "json"])).unwrap();
    assert_eq!(cli.as_array().unwrap().len(), 3);
}

#[test]
fn an_idempotency_key_makes_one_key_and_one_version_however_often_it_is_retried() {
    let server = TestServer::start();
    let body = json!({"tenant": "acme", "scopes": ["invoke:*"]}).to_string();
    let create = |key: &str, body: &str| {
        server.request(
            "POST",
            "/v1/keys",
            &[("idempotency-key", key)],
            body.as_bytes(),
        )
    };
    let first = create("retry-1", &body);
    assert_eq!(first.status, 201, "{}", first.text());
    assert!(first.header("idempotent-replayed").is_none());
    let again = create("retry-1", &body);
    assert_eq!(again.status, 201, "{}", again.text());
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.json(), first.json(), "the same key, secret included");
    assert_eq!(again.header("location"), first.header("location"));
    let keys = server.get("/v1/keys").json();
    let acme = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["tenant"] == "acme")
        .count();
    assert_eq!(acme, 1, "one key made: {keys}");
    // The same key on another request is refused; a new key makes a new one.
    let other = json!({"tenant": "acme", "scopes": ["usage:read"]}).to_string();
    let reused = create("retry-1", &other);
    assert_eq!(reused.status, 422, "{}", reused.text());
    assert_eq!(reused.error_code(), "idempotency.key_reused");
    assert_eq!(create("retry-2", &other).status, 201);
    // A failed request does not hold its key: fixed, the retry runs.
    let bad = create("retry-3", r#"{"tenant": "acme", "scopes": ["nonsense"]}"#);
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(create("retry-3", &body).status, 201);
    for bad_key in ["", "has space", &"x".repeat(256)] {
        let a = create(bad_key, &body);
        assert_eq!(a.status, 400, "{bad_key:?}: {}", a.text());
    }

    // A deploy retried with its key is one version, answered twice the same.
    let wasm = std::fs::read(example("hello")).unwrap();
    let deploy = |key: &str, query: &str| {
        server.request(
            "POST",
            &format!("/v1/functions/idem/versions{query}"),
            &[
                ("content-type", "application/wasm"),
                ("idempotency-key", key),
            ],
            &wasm,
        )
    };
    let v1 = deploy("d-1", "");
    assert_eq!(v1.status, 201, "{}", v1.text());
    let replay = deploy("d-1", "");
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.json()["version"], 1);
    let changed = deploy("d-1", "?timeout_ms=500");
    assert_eq!(changed.status, 422, "other limits are another request");
    assert_eq!(
        deploy("d-2", "").json()["version"],
        2,
        "a new key deploys anew"
    );
    let versions = server.get("/v1/functions/idem/versions").json();
    assert_eq!(
        versions["versions"].as_array().unwrap().len(),
        2,
        "{versions}"
    );
    // Another caller's key of the same name is its own.
    let (deployer, _) = server.create_key("default", &["deploy:idem"], None);
    let bearer = format!("Bearer {deployer}");
    let theirs = server.request(
        "POST",
        "/v1/functions/idem/versions",
        &[
            ("content-type", "application/wasm"),
            ("idempotency-key", "d-1"),
            ("authorization", &bearer),
        ],
        &wasm,
    );
    assert_eq!(theirs.status, 201, "{}", theirs.text());
    assert!(theirs.header("idempotent-replayed").is_none());
    assert_eq!(theirs.json()["version"], 3);
}

#[test]
fn racing_retries_with_one_key_make_one_version_and_the_others_are_told_to_wait() {
    let server = TestServer::start();
    // A component this server never compiled: the first request holds its claim while
    // the compile runs (tens of milliseconds), and the others arrive meanwhile.
    let wasm = std::fs::read(example("echo")).unwrap();
    let answers: Vec<_> = std::thread::scope(|s| {
        let racers: Vec<_> = (0..5)
            .map(|_| {
                s.spawn(|| {
                    server.request(
                        "POST",
                        "/v1/functions/race/versions",
                        &[
                            ("content-type", "application/wasm"),
                            ("idempotency-key", "race-1"),
                        ],
                        &wasm,
                    )
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let made = answers
        .iter()
        .filter(|a| a.status == 201 && a.header("idempotent-replayed").is_none())
        .count();
    let waiting = answers.iter().filter(|a| a.status == 409).count();
    assert_eq!(made, 1, "exactly one request made the version");
    assert!(
        waiting >= 1,
        "a retry that raced the first was told to wait"
    );
    for a in answers.iter().filter(|a| a.status == 409) {
        assert_eq!(a.error_code(), "idempotency.in_progress", "{}", a.text());
    }
    for a in &answers {
        assert!(matches!(a.status, 201 | 409), "{}: {}", a.status, a.text());
    }
    let versions = server.get("/v1/functions/race/versions").json();
    assert_eq!(
        versions["versions"].as_array().unwrap().len(),
        1,
        "{versions}"
    );
}

#[test]
fn a_kept_answer_holds_no_secret_in_the_database() {
    let server = TestServer::start();
    let body = json!({"tenant": "acme", "scopes": ["invoke:*"]}).to_string();
    let made = server.request(
        "POST",
        "/v1/keys",
        &[("idempotency-key", "sealed-1")],
        body.as_bytes(),
    );
    assert_eq!(made.status, 201, "{}", made.text());
    let secret = made.json()["key"].as_str().unwrap().to_string();
    let replay = server.request(
        "POST",
        "/v1/keys",
        &[("idempotency-key", "sealed-1")],
        body.as_bytes(),
    );
    assert_eq!(
        replay.json()["key"],
        secret.as_str(),
        "the replay still carries it"
    );
    // The SQLite files (on PostgreSQL the unit tests of the sealing hold for the row).
    let db = server.data_dir.join("kiln.db");
    if db.exists() {
        let mut bytes = Vec::new();
        for file in ["kiln.db", "kiln.db-wal"] {
            bytes.extend(std::fs::read(server.data_dir.join(file)).unwrap_or_default());
        }
        assert!(
            bytes.windows(8).any(|w| w == b"sealed-1"),
            "the claim is in these files"
        );
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the new key's secret is stored in clear"
        );
    }
}

#[test]
fn anonymous_callers_and_encoded_slashes_reach_nothing_they_should_not() {
    let server = TestServer::start();
    server.deploy_example("hello", "hello", "");
    for method in ["GET", "HEAD"] {
        let a = server.request(method, "/v1/keys", &[("authorization", "")], b"");
        assert_eq!(a.status, 401, "{method} /v1/keys without a key");
    }
    let (invoker, _) = server.create_key("default", &["invoke:*"], None);
    let bearer = format!("Bearer {invoker}");
    let a = server.request("HEAD", "/v1/keys", &[("authorization", &bearer)], b"");
    assert_eq!(a.status, 403, "HEAD /v1/keys with an invoke key");
    // An encoded slash stays inside its segment: never another route or function.
    for path in [
        "/v1/functions/hello%2Fversions",
        "/v1/functions/a%2Fb",
        "/v1/functions/hello%2F..%2F..%2Fkeys",
    ] {
        let a = server.get(path);
        assert!(
            matches!(a.status, 400 | 404),
            "{path}: {} {}",
            a.status,
            a.text()
        );
        assert!(
            matches!(
                a.error_code().as_str(),
                "request.invalid" | "function.not_found"
            ),
            "{path}: {}",
            a.text()
        );
    }
}

#[test]
fn head_answers_every_get_and_405_names_the_methods() {
    let server = TestServer::start();
    server.deploy_example("hello", "hello", "");
    for path in [
        "/v1/functions",
        "/v1/functions/hello",
        "/v1/functions/hello/versions/1",
        "/v1/functions/hello/traffic",
        "/v1/keys",
        "/v1/usage",
        "/v1/openapi.json",
    ] {
        let get = server.get(path);
        let head = server.request("HEAD", path, &[], b"");
        assert_eq!(head.status, get.status, "{path}");
        assert!(head.body.is_empty(), "{path}: HEAD has no body");
        assert_eq!(
            head.header("content-type"),
            get.header("content-type"),
            "{path}"
        );
    }
    let a = server.request("HEAD", "/v1/functions/nope", &[], b"");
    assert_eq!(a.status, 404);
    let a = server.request("PATCH", "/v1/functions", &[], b"");
    assert_eq!(a.status, 405);
    assert_eq!(a.header("allow"), Some("GET, HEAD"));
    assert_eq!(a.error_code(), "method.not_allowed");
}

#[test]
fn times_are_rfc3339_out_and_any_offset_or_span_in() {
    let server = TestServer::start();
    server.deploy_example("hello", "hello", "");
    let f = server.get("/v1/functions/hello").json();
    let created = f["created_at"].as_str().expect("created_at is text");
    assert!(created.ends_with('Z') && created.contains('T'), "{created}");
    let key = &server.get("/v1/keys").json()["keys"][0];
    assert!(key["created_at"].as_str().unwrap().ends_with('Z'), "{key}");

    // The deploy is inside the last hour, whichever way the hour is written.
    let now_utc = server.get("/v1/audit?action=version.create").json()["entries"][0]["at"]
        .as_str()
        .unwrap()
        .to_string();
    for since in ["1h", "90m", "2026-01-01T01:00:00%2B01:00", "2026-01-01"] {
        let a = server.get(&format!("/v1/audit?action=version.create&since={since}"));
        assert_eq!(a.status, 200, "{since}: {}", a.text());
        assert_eq!(
            a.json()["entries"].as_array().unwrap().len(),
            1,
            "since={since}"
        );
    }
    for until in ["1h", "2026-01-01T00:00:00-05:00"] {
        let a = server.get(&format!("/v1/audit?action=version.create&until={until}"));
        assert!(
            a.json()["entries"].as_array().unwrap().is_empty(),
            "until={until} ({now_utc})"
        );
    }
    // Bounds after the deploy find nothing, however their offset is written: an offset
    // read with the wrong sign, or a `since` ignored, would find the deploy.
    let at = now_utc.parse::<jiff::Timestamp>().expect("RFC 3339");
    let later = |secs: i64, offset_h: i8| {
        let zone = jiff::tz::TimeZone::fixed(jiff::tz::offset(offset_h));
        let t = at
            .checked_add(jiff::SignedDuration::from_secs(secs))
            .unwrap();
        t.to_zoned(zone)
            .strftime("%Y-%m-%dT%H:%M:%S%:z")
            .to_string()
    };
    for (since, found) in [
        (later(2, 0), 0),
        (later(3600, 1), 0),
        (later(3600, -5), 0),
        (later(-2, 2), 1),
        (later(-2, -7), 1),
    ] {
        for written in [since.replace('+', "%2B"), since.clone()] {
            let a = server.get(&format!("/v1/audit?action=version.create&since={written}"));
            assert_eq!(a.status, 200, "{written}: {}", a.text());
            assert_eq!(
                a.json()["entries"].as_array().unwrap().len(),
                found,
                "since={written} (deployed at {now_utc})"
            );
        }
    }
    let usage = server.get("/v1/usage?since=7d&until=2099-01-01T00:00:00%2B09:00");
    assert_eq!(usage.status, 200, "{}", usage.text());
    let bad = server.get("/v1/audit?since=yesterday");
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("RFC 3339"), "{}", bad.text());
    let out = server.cli_ok(&[
        "audit",
        "--since",
        "1h",
        "--action",
        "version.create",
        "-o",
        "json",
    ]);
    let entries: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 1, "{out}");
}

#[test]
fn the_openapi_document_is_served_to_anyone() {
    let server = TestServer::start();
    let a = server.request("GET", "/v1/openapi.json", &[("authorization", "")], b"");
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.header("content-type"), Some("application/json"));
    let doc = a.json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(doc["paths"]["/v1/functions/{name}/versions"]["post"].is_object());
    // Reading it is no action on anything: nothing in the audit log.
    let audit = server.get("/v1/audit").json();
    assert!(!audit["entries"].to_string().contains("openapi"), "{audit}");
}

#[test]
fn the_cli_prints_json_answers_and_json_errors_with_their_code() {
    let server = TestServer::start();
    let out = server.cli_ok(&["-o", "json", "deploy", example("hello").to_str().unwrap()]);
    let v: Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(v["function"], "hello");
    assert_eq!(v["version"], 1);
    let out = server.cli_ok(&[
        "keys", "create", "--tenant", "t", "--scope", "invoke:*", "--output", "json",
    ]);
    let key: Value = serde_json::from_str(&out).expect(&out);
    assert!(key["key"].as_str().unwrap().starts_with("kiln_"), "{key}");
    let out = server.cli_ok(&["keys", "revoke", key["id"].as_str().unwrap(), "-o", "json"]);
    let revoked: Value = serde_json::from_str(&out).expect(&out);
    assert!(
        revoked["revoked_at"].as_str().unwrap().ends_with('Z'),
        "{revoked}"
    );
    let out = server.cli_ok(&["invoke", "hello", "-o", "json"]);
    let call: Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(call["status"], 200);
    assert_eq!(call["body"], "hello\n", "{call}");
    let out = server.cli_ok(&["delete", "hello", "--yes", "-o", "json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["deleted"],
        "hello"
    );

    // Errors: on stdout, as JSON, with the server's code; the exit status fails.
    let out = server.cli(&["delete", "hello", "--yes", "-o", "json"]);
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
    assert_eq!(err["error"]["code"], "function.not_found", "{err}");
    assert_eq!(err["error"]["status"], 404, "{err}");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("hello"),
        "{err}"
    );
    // An error of the CLI itself has a code too.
    let out = server.cli(&["-o", "json", "deploy", "/nonexistent/dir"]);
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
    assert_eq!(err["error"]["code"], "cli.error", "{err}");
    // And csv is for usage alone.
    let out = server.cli(&["functions", "-o", "csv"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kiln usage"));
}

#[test]
fn path_segments_may_be_percent_encoded() {
    let server = TestServer::start();
    let bytes = b"a blob whose digest travels with its colon escaped";
    let digest = kiln_tests::digest(bytes);
    let escaped = digest.replace(':', "%3A");
    let put = server.request("PUT", &format!("/v1/blobs/{escaped}"), &[], bytes);
    assert_eq!(put.status, 201, "{}", put.text());
    let head = server.request("HEAD", &format!("/v1/blobs/{digest}"), &[], b"");
    assert_eq!(head.status, 200);
    let bad = server.request("GET", "/v1/functions/%zz", &[], b"");
    assert_eq!(bad.status, 400, "{}", bad.text());
}
