//! Variables and secrets end to end: the echo example declares `greeting` (default
//! "hello"), `api_key` (secret) and `region`; its guest reads them through `wasi:config`
//! and its environment. Values set with `kiln vars set` reach the next request, per alias;
//! a secret is never given back, never written in clear (database, audit, history, server
//! log), survives a restart, and does not open under another key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use kiln_tests::{Answer, Launch, TestServer, Value, json, kiln_bin, root, temp_dir};

const SECRET: &str = "s3cr3t-Value-that-must-never-leak";

/// What the guest of `target` (`vars`, `vars:staging`...) read for `key`: through
/// wasi:config, and from its environment (upper-cased).
fn read(server: &TestServer, target: &str, key: &str) -> (Option<String>, Option<String>) {
    let env = key.to_ascii_uppercase();
    let a = server.request(
        "GET",
        &format!("/fn/{target}/"),
        &[("x-echo-var", key), ("x-echo-env", &env)],
        b"",
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let h = |n| a.header(n).map(str::to_string);
    (h("x-var"), h("x-env"))
}

fn env_names(server: &TestServer, target: &str) -> Vec<String> {
    let a = server.request(
        "GET",
        &format!("/fn/{target}/"),
        &[("x-echo-env-names", "1")],
        b"",
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let mut names: Vec<String> = a
        .header("x-env-names")
        .unwrap_or_default()
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

fn change(server: &TestServer, body: Value) -> Answer {
    server.request(
        "POST",
        "/v1/functions/vars/variables",
        &[],
        body.to_string().as_bytes(),
    )
}

fn some(v: &str) -> (Option<String>, Option<String>) {
    (Some(v.to_string()), Some(v.to_string()))
}

/// `kiln vars set vars api_key [--secret]` with the value on standard input.
fn set_from_stdin(server: &TestServer, value: &str) {
    let mut child = Command::new(kiln_bin())
        .args(["vars", "set", "vars", "api_key"])
        .env("KILN_SERVER", &server.url)
        .env("KILN_API_KEY", kiln_tests::ADMIN_KEY)
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{value}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(!printed.contains(value), "{printed}");
    assert!(printed.contains("(secret)"), "{printed}");
}

/// The entry of `key` (for every request, not an alias) in a `GET .../variables` answer.
fn entry<'a>(answer: &'a Value, key: &str) -> &'a Value {
    answer["variables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["key"] == key && v.get("alias").is_none())
        .unwrap_or_else(|| panic!("{key} in {answer}"))
}

/// Every file under `dir` holds none of `needle`'s bytes.
fn nowhere_in_files(dir: &std::path::Path, needle: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            nowhere_in_files(&path, needle);
        } else if let Ok(bytes) = std::fs::read(&path) {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} holds the secret in clear",
                path.display()
            );
        }
    }
}

#[test]
fn values_reach_the_next_request_per_alias_and_secrets_never_come_back() {
    let mut server = TestServer::start();
    server.cli_ok(&["deploy", "examples/echo", "--name", "vars"]);
    // Defaults, and nothing of the host's environment.
    assert_eq!(read(&server, "vars", "greeting"), some("hello"));
    assert_eq!(read(&server, "vars", "region"), (None, None));
    assert_eq!(env_names(&server, "vars"), ["GREETING"]);
    let version = server.get("/v1/functions/vars/versions/1").json();
    assert_eq!(
        version["variables"]["api_key"],
        json!({"secret": true}),
        "{version}"
    );

    // Values apply to the next request; an alias's values to its requests only.
    server.cli_ok(&["vars", "set", "vars", "greeting=hi there", "region=eu"]);
    assert_eq!(read(&server, "vars", "greeting"), some("hi there"));
    assert_eq!(env_names(&server, "vars"), ["GREETING", "REGION"]);
    let a = server.request(
        "PUT",
        "/v1/functions/vars/aliases/staging",
        &[],
        json!({"weights": {"1": 100}}).to_string().as_bytes(),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    server.cli_ok(&[
        "vars",
        "set",
        "vars",
        "greeting=staged",
        "--alias",
        "staging",
    ]);
    assert_eq!(read(&server, "vars:staging", "greeting"), some("staged"));
    assert_eq!(read(&server, "vars:staging", "region"), some("eu"));
    assert_eq!(read(&server, "vars", "greeting"), some("hi there"));
    assert_eq!(read(&server, "vars@1", "greeting"), some("hi there"));

    // A secret: the guest reads it; nobody else ever sees it again.
    server.cli_ok(&[
        "vars",
        "set",
        "vars",
        &format!("api_key={SECRET}"),
        "--secret",
    ]);
    assert_eq!(read(&server, "vars", "api_key"), some(SECRET));
    let listed = server.cli_ok(&["vars", "list", "vars"]);
    assert!(
        listed.contains("(secret)") && !listed.contains(SECRET),
        "{listed}"
    );
    let json_list = server.cli_ok(&["vars", "list", "vars", "-o", "json"]);
    assert!(!json_list.contains(SECRET), "{json_list}");
    let listed = server.get("/v1/functions/vars/variables").json();
    let api_key = entry(&listed, "api_key");
    assert_eq!(api_key["secret"], true, "{listed}");
    assert!(api_key.get("value").is_none(), "{listed}");
    let staging = server
        .get("/v1/functions/vars/variables?alias=staging")
        .json();
    assert_eq!(
        staging["variables"].as_array().unwrap().len(),
        1,
        "{staging}"
    );
    assert_eq!(staging["variables"][0]["value"], "staged", "{staging}");

    // A declared secret stays secret when set without --secret, and from standard input.
    set_from_stdin(&server, "from-stdin-secret");
    assert_eq!(read(&server, "vars", "api_key"), some("from-stdin-secret"));
    let a = change(&server, json!({"set": {"api_key": SECRET}}));
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(!a.text().contains(SECRET));
    assert_eq!(read(&server, "vars", "api_key"), some(SECRET));

    // Refused changes say why and change nothing; a mistyped body never quotes a value.
    for (body, code) in [
        (json!({"set": {"Bad-Key": "x"}}), "request.invalid"),
        (
            json!({"set": {"greeting": "x".repeat(17 * 1024)}}),
            "request.invalid",
        ),
        (json!({"set": SECRET}), "request.invalid"),
        (json!({}), "request.invalid"),
        (
            json!({"alias": "No Such!", "set": {"greeting": "x"}}),
            "request.invalid",
        ),
    ] {
        let a = change(&server, body);
        assert_eq!(
            (a.status, a.error_code().as_str()),
            (400, code),
            "{}",
            a.text()
        );
        assert!(!a.text().contains(SECRET), "{}", a.text());
    }
    assert_eq!(read(&server, "vars", "greeting"), some("hi there"));

    // Unset: back to the default; the alias keeps its own value.
    server.cli_ok(&["vars", "unset", "vars", "greeting"]);
    assert_eq!(read(&server, "vars", "greeting"), some("hello"));
    assert_eq!(read(&server, "vars:staging", "greeting"), some("staged"));

    // Every change is in the history and the audit log, by name only.
    let history = server.get("/v1/functions/vars/history").json();
    let kinds: Vec<&str> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .filter(|k| *k == "variables")
        .collect();
    assert_eq!(kinds.len(), 6, "{history}");
    let audit = server
        .get("/v1/audit?action=variables.set&limit=100")
        .json();
    let entries = audit["entries"].as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("set api_key"))),
        "{audit}"
    );
    assert!(!history.to_string().contains(SECRET) && !audit.to_string().contains(SECRET));

    // A version that declares a variable secret seals the value it had in clear: the
    // guest still reads it; the API shows it as a secret from then on.
    let digest = server.get("/v1/functions/vars/versions/1").json()["digest"].clone();
    let v2 = server.deploy_manifest(
        "vars",
        &json!({
            "component": digest,
            "variables": {
                "greeting": {"default": "hello"},
                "api_key": {"secret": true},
                "region": {"secret": true}
            }
        }),
    );
    assert_eq!(v2.status, 201, "{}", v2.text());
    assert_eq!(read(&server, "vars", "region"), some("eu"));
    let listed = server.get("/v1/functions/vars/variables").json();
    let region = entry(&listed, "region");
    assert_eq!(region["secret"], true, "{listed}");
    assert!(region.get("value").is_none(), "{listed}");
    let history = server.get("/v1/functions/vars/history").json();
    let sealed = &history["history"][0];
    assert_eq!(sealed["kind"], "variables", "{history}");
    assert_eq!(
        sealed["detail"]["set"],
        json!([{"key": "region", "secret": true}]),
        "{history}"
    );

    // Another tenant sees none of it and changes nothing.
    let (other, _) = server.create_key("tenant-b", &["deploy:*", "invoke:*"], None);
    let a = server.call_as(&other, "GET", "/v1/functions/vars/variables", b"");
    assert_eq!(a.status, 404, "{}", a.text());
    let body = json!({"set": {"greeting": "hijacked"}}).to_string();
    let a = server.call_as(
        &other,
        "POST",
        "/v1/functions/vars/variables",
        body.as_bytes(),
    );
    assert!(matches!(a.status, 403 | 404), "{}", a.text());
    assert_eq!(read(&server, "vars", "greeting"), some("hello"));

    // A restart keeps the values, the secret opening with the data dir's key.
    server.restart();
    assert_eq!(read(&server, "vars", "api_key"), some(SECRET));
    assert_eq!(read(&server, "vars:staging", "greeting"), some("staged"));
    server.terminate();
    // The secrets are nowhere in clear: not in the databases, not in the server's log.
    nowhere_in_files(&server.data_dir, SECRET);

    // Under another key the secret does not open: its requests fail with a clear error,
    // the listing says so, and everything else serves.
    let data_dir = server.data_dir.clone();
    let wrong = TestServer::launch(
        data_dir,
        None,
        Launch {
            env: vec![("KILN_SECRETS_KEY".into(), "ab".repeat(32))],
            ..Launch::default()
        },
    )
    .unwrap_or_else(|log| panic!("kiln serve exited before serving:\n{log}"));
    let a = wrong.request("GET", "/fn/vars/", &[], b"");
    assert_eq!(a.status, 500, "{}", a.text());
    assert_eq!(
        a.error_code(),
        "function.variable_unreadable",
        "{}",
        a.text()
    );
    assert!(a.text().contains("KILN_SECRETS_KEY"), "{}", a.text());
    let listed = wrong.get("/v1/functions/vars/variables").json();
    // Every secret is sealed in the store, the one sealed at version 2's deploy included.
    for key in ["api_key", "region"] {
        let v = entry(&listed, key);
        assert_eq!(v["unreadable"], true, "{key}: {listed}");
    }
    wrong.deploy_example("plain", "hello", "");
    assert_eq!(wrong.request("GET", "/fn/plain/", &[], b"").status, 200);
}

#[test]
fn a_cluster_node_reads_what_another_set_and_a_node_without_a_key_keeps_no_secrets() {
    let Some(cluster) = kiln_tests::cluster::Cluster::start("variables", 2, false) else {
        return;
    };
    let (one, two) = (&cluster.nodes[0], &cluster.nodes[1]);
    one.cli_ok(&["deploy", "examples/echo", "--name", "vars"]);
    one.cli_ok(&["vars", "set", "vars", "greeting=from-one"]);
    one.cli_ok(&["vars", "set", "vars", &format!("api_key={SECRET}")]);
    // The other node applies the change within its poll.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let seen = (read(two, "vars", "greeting"), read(two, "vars", "api_key"));
        if seen == (some("from-one"), some(SECRET)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node two still sees {seen:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // A node without KILN_SECRETS_KEY refuses to keep a secret, and says how to fix it.
    let keyless = TestServer::launch(
        temp_dir("keyless"),
        None,
        Launch {
            args: vec![
                "--database".into(),
                cluster.db.url.clone(),
                "--blobs".into(),
                cluster.moto.blobs_url("kiln", "cluster"),
            ],
            env: vec![("KILN_SECRETS_KEY".into(), String::new())],
            ..Launch::default()
        },
    )
    .unwrap_or_else(|log| panic!("kiln serve exited before serving:\n{log}"));
    let a = keyless.request(
        "POST",
        "/v1/functions/vars/variables",
        &[],
        json!({"set": {"api_key": "x"}}).to_string().as_bytes(),
    );
    assert_eq!(a.status, 409, "{}", a.text());
    assert_eq!(a.error_code(), "variables.no_secrets_key");
    assert!(a.text().contains("KILN_SECRETS_KEY"), "{}", a.text());
    // Nor can it open the one the others keep: the function's requests say so there.
    let a = keyless.request("GET", "/fn/vars/", &[], b"");
    assert_eq!(
        a.error_code(),
        "function.variable_unreadable",
        "{}",
        a.text()
    );
    // Nor can it deploy a version that makes a clear value secret: it could not seal it.
    let digest = keyless.get("/v1/functions/vars/versions/1").json()["digest"].clone();
    let refused = keyless.deploy_manifest(
        "vars",
        &json!({"component": digest, "variables": {"greeting": {"secret": true}}}),
    );
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert_eq!(refused.error_code(), "variables.no_secrets_key");
    let versions = keyless.get("/v1/functions/vars/versions").json();
    assert_eq!(
        versions["versions"].as_array().map(Vec::len),
        Some(1),
        "{versions}"
    );
}
