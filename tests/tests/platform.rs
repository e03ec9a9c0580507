//! Deploy, invoke, pin, list, delete, restart, and the CLI, end to end over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_tests::{TestServer, Value, example, root};

#[test]
fn deploy_invoke_pin_list_delete() {
    let server = TestServer::start();
    let v1 = server.deploy_example("greet", "hello", "timeout_ms=2000&memory_mb=64");
    assert_eq!(v1["function"], "greet");
    assert_eq!(v1["version"], 1);
    assert!(v1["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(v1["url"].as_str().unwrap().ends_with("/fn/greet/"));
    assert_eq!(v1["limits"]["timeout_ms"], 2000);
    assert_eq!(v1["limits"]["memory_mb"], 64);

    let a = server.get("/fn/greet/");
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.text(), "hello\n");
    assert_eq!(a.header("x-kiln-version"), Some("1"));
    let timing = a.header("server-timing").unwrap();
    assert!(
        timing.contains("instantiate;dur=") && timing.contains("handler;dur="),
        "{timing}"
    );
    assert!(a.header("x-kiln-request-id").is_some());

    // A second version takes over unpinned traffic; the first stays reachable pinned.
    let v2 = server.deploy_example("greet", "echo", "");
    assert_eq!(v2["version"], 2);
    let a = server.request(
        "POST",
        "/fn/greet/some/path?q=1",
        &[("x-test", "yes")],
        b"payload",
    );
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-kiln-version"), Some("2"));
    assert_eq!(a.header("x-path"), Some("/some/path?q=1"));
    assert_eq!(a.header("x-method"), Some("POST"));
    assert_eq!(a.header("x-test"), Some("yes"));
    assert_eq!(a.body, b"payload");
    let a = server.get("/fn/greet@1/");
    assert_eq!((a.status, a.text().as_str()), (200, "hello\n"));
    let a = server.get("/fn/greet@7/");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (404, "version.not_found")
    );

    let list = server.get("/v1/functions").json();
    let f = &list["functions"][0];
    assert_eq!(
        (f["name"].as_str(), f["latest_version"].as_u64()),
        (Some("greet"), Some(2))
    );
    let versions = server.get("/v1/functions/greet/versions").json();
    assert_eq!(versions["versions"].as_array().unwrap().len(), 2);
    let one = server.get("/v1/functions/greet/versions/1").json();
    assert_eq!(one["digest"], v1["digest"]);
    assert_eq!(
        server.get("/v1/functions/greet").json()["latest_version"],
        2
    );

    let a = server.request("DELETE", "/v1/functions/greet", &[], b"");
    assert_eq!(a.status, 200, "{}", a.text());
    let a = server.get("/fn/greet/");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (404, "function.not_found")
    );
    assert_eq!(server.get("/v1/functions/greet").status, 404);
    assert_eq!(
        server
            .request("DELETE", "/v1/functions/greet", &[], b"")
            .status,
        404
    );

    // Version numbers are never reused, even after a delete.
    let v3 = server.deploy_example("greet", "hello", "");
    assert_eq!(v3["version"], 3);
}

#[test]
fn restart_serves_every_function_from_compiled_artifacts() {
    let mut server = TestServer::start();
    server.deploy_example("hello", "hello", "");
    server.deploy_example("echo", "echo", "");
    assert_eq!(server.get("/fn/hello/").status, 200);

    server.restart();
    assert!(server.log().contains("kiln ready"));
    let a = server.get("/fn/hello/");
    assert_eq!((a.status, a.text().as_str()), (200, "hello\n"));
    // The first request after a restart maps the artifact (a cold start), the next is warm.
    assert!(
        a.header("server-timing").unwrap().contains("cold;dur="),
        "{:?}",
        a.headers
    );
    let again = server.get("/fn/hello/");
    assert!(!again.header("server-timing").unwrap().contains("cold"));
    assert_eq!(
        server.request("PUT", "/fn/echo/x", &[], b"abc").body,
        b"abc"
    );
    // Mapping, not recompiling: no "recompiling" warning in the log.
    assert!(!server.log().contains("recompiling"), "{}", server.log());
    assert_eq!(
        server.get("/v1/functions").json()["functions"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn cli_builds_deploys_invokes_and_lists() {
    let server = TestServer::start();
    example("hello"); // make sure the example workspace is built once before `kiln build`
    let dir = root().join("examples/hello");
    let out = server.cli(&["build", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = server.cli(&["deploy", dir.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("deployed hello version 1"), "{stdout}");
    assert!(stdout.contains("/fn/hello/"), "{stdout}");

    let out = server.cli(&["invoke", "hello"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");

    // A bare .wasm file deploys too; --name overrides the file stem.
    let echo = example("echo");
    let out = server.cli(&["deploy", echo.to_str().unwrap(), "--name", "parrot"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server.cli(&[
        "invoke",
        "parrot",
        "--path",
        "/p",
        "--data",
        "squawk",
        "-H",
        "x-test: 1",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "squawk");

    let out = server.cli(&["functions", "--output", "json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hello", "parrot"]);
    let out = server.cli(&["functions"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("NAME    TENANT   PUBLIC") && table.contains("parrot  default  false"),
        "{table}"
    );
    let out = server.cli(&["versions", "hello", "--output", "json"]);
    let versions: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(versions[0]["version"], 1);

    // Errors reach the user as the server's message and a failing exit code.
    let out = server.cli(&["versions", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("function.not_found"));
}

#[test]
fn manifest_with_unknown_key_is_rejected_naming_key_and_line() {
    let server = TestServer::start();
    let dir = kiln_tests::temp_dir("manifest");
    std::fs::write(
        dir.join("kiln.toml"),
        "name = \"x\"\ncomponent = \"x.wasm\"\n[limits]\ntimeout_ms = 5\nmemroy_mb = 1\n",
    )
    .unwrap();
    let out = server.cli(&["deploy", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("memroy_mb") && err.contains("line 5"), "{err}");
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let mut server = TestServer::start();
    server.deploy_example("slow", "hostile", "");
    let inflight = kiln_tests::spawn_get(format!("{}/fn/slow/sleep?ms=1500", server.url));
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(server.terminate(), Some(0));
    let (status, body) = inflight.join().unwrap();
    assert_eq!((status, body.as_str()), (200, "slept\n"));
}

#[test]
fn health_and_unknown_routes_answer_json() {
    let server = TestServer::start();
    let h = server.get("/healthz");
    assert_eq!((h.status, h.json()["status"].as_str()), (200, Some("ok")));
    let a = server.get("/nope");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (404, "route.not_found")
    );
    let a = server.request("PATCH", "/v1/functions", &[], b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (405, "method.not_allowed")
    );
    assert_eq!(a.header("allow"), Some("GET, HEAD"));
    let a = server.request("PATCH", "/v1/functions/x/traffic", &[], b"");
    assert_eq!((a.status, a.header("allow")), (405, Some("GET, HEAD, PUT")));
}

#[test]
fn created_resources_say_where_and_urls_follow_the_public_url() {
    let server =
        TestServer::start_with_config("[server]\npublic_url = \"https://kiln.example.com\"\n");
    let a = server.deploy_wasm(
        "hello",
        &std::fs::read(kiln_tests::example("hello")).unwrap(),
        "",
    );
    assert_eq!(a.status, 201, "{}", a.text());
    assert_eq!(a.header("location"), Some("/v1/functions/hello/versions/1"));
    assert_eq!(a.json()["url"], "https://kiln.example.com/fn/hello/");
    let listed = server.get("/v1/functions/hello/versions").json();
    assert_eq!(
        listed["versions"][0]["url"], "https://kiln.example.com/fn/hello@1/",
        "{listed}"
    );
    let a = server.request(
        "POST",
        "/v1/keys",
        &[],
        br#"{"tenant": "acme", "scopes": ["invoke:*"]}"#,
    );
    assert_eq!(a.status, 201, "{}", a.text());
    let id = a.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        a.header("location"),
        Some(format!("/v1/keys/{id}").as_str())
    );
    // Without one, the scheme is the server's own and the host the request's.
    let plain = TestServer::start();
    let a = plain.deploy_wasm(
        "hello",
        &std::fs::read(kiln_tests::example("hello")).unwrap(),
        "",
    );
    let url = a.json()["url"].as_str().unwrap().to_string();
    assert_eq!(url, format!("{}/fn/hello/", plain.url));
}

#[test]
fn a_public_url_with_a_path_is_refused_at_start() {
    let dir = kiln_tests::temp_dir("data");
    let config = dir.join("kiln.toml");
    std::fs::write(
        &config,
        "[server]\npublic_url = \"https://kiln.example.com/api\"\n",
    )
    .unwrap();
    let log = TestServer::launch(dir, Some(config), kiln_tests::Launch::default())
        .err()
        .expect("must not start");
    assert!(log.contains("server.public_url"), "{log}");
}

#[test]
fn kiln_delete_asks_on_a_terminal_unless_yes() {
    let server = TestServer::start();
    server.deploy_example("hello", "hello", "");
    // On a terminal (a pty from script(1)), a wrong answer deletes nothing.
    let run_on_tty = |answer: &str, args: &str| {
        let mut child = std::process::Command::new("script")
            .args([
                "-qec",
                &format!("{} delete hello {args}", kiln_tests::kiln_bin().display()),
                "/dev/null",
            ])
            .env("KILN_SERVER", &server.url)
            .env("KILN_API_KEY", kiln_tests::ADMIN_KEY)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(answer.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (ok, out) = run_on_tty("nope\n", "");
    assert!(
        !ok && out.contains("type its name") && out.contains("not deleted"),
        "{out}"
    );
    assert_eq!(server.get("/fn/hello/").status, 200);
    let (ok, out) = run_on_tty("hello\n", "");
    assert!(ok && out.contains("deleted hello"), "{out}");
    assert_eq!(server.get("/fn/hello/").status, 404);
    // --yes, and no terminal at all, do not ask.
    server.deploy_example("hello", "hello", "");
    let (ok, out) = run_on_tty("", "--yes");
    assert!(ok && !out.contains("type its name"), "{out}");
    server.deploy_example("hello", "hello", "");
    assert!(
        server
            .cli_ok(&["delete", "hello"])
            .contains("deleted hello")
    );
}
