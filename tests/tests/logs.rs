//! Guest logs end to end: what the echo example prints (its `x-echo-log` header, to stdout
//! and to stderr) is found by the request's `x-kiln-request-id`, by version, through the API
//! and `kiln logs`, and streamed by `kiln logs --follow`; another tenant sees none of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::{TestServer, Value, kiln_bin, root};

/// Calls `talker` as `key`, asking it to print `text`; returns the request id.
fn say(server: &TestServer, key: &str, text: &str) -> String {
    let a = server.request(
        "POST",
        "/fn/talker/",
        &[
            ("authorization", &format!("Bearer {key}")),
            ("x-echo-log", text),
        ],
        b"",
    );
    assert_eq!(a.status, 200, "{}", a.text());
    a.header("x-kiln-request-id").unwrap().to_string()
}

fn lines(server: &TestServer, key: &str, query: &str) -> (u16, Value) {
    let a = server.call_as(
        key,
        "GET",
        &format!("/v1/functions/talker/logs{query}"),
        b"",
    );
    let status = a.status;
    (status, if status == 200 { a.json() } else { Value::Null })
}

#[test]
fn a_request_s_output_is_found_by_its_id_streamed_and_kept_from_other_tenants() {
    let server = TestServer::start();
    let (a_key, _) = server.create_key("tenant-a", &["deploy:*", "invoke:*"], None);
    let (b_key, _) = server.create_key("tenant-b", &["deploy:*", "invoke:*"], None);
    let a = server.deploy_as(&a_key, "talker", "echo", "");
    assert_eq!(a.status, 201, "{}", a.text());

    let first = say(&server, &a_key, "hello one");
    let second = say(&server, &a_key, "hello two");

    // Both requests' lines, oldest first, each stream with its own line.
    let (status, all) = lines(&server, &a_key, "");
    assert_eq!(status, 200);
    let texts: Vec<&str> = all["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "hello one",
            "stderr: hello one",
            "hello two",
            "stderr: hello two"
        ],
        "{all}"
    );
    // One request's lines by its id, with their version and stream.
    let (_, one) = lines(&server, &a_key, &format!("?request_id={first}"));
    let found = one["lines"].as_array().unwrap();
    assert_eq!(found.len(), 2, "{one}");
    assert!(
        found
            .iter()
            .all(|l| l["request_id"] == first.as_str() && l["version"] == 1)
    );
    assert_eq!(
        (found[0]["stream"].as_str(), found[1]["stream"].as_str()),
        (Some("stdout"), Some("stderr"))
    );
    assert_eq!(
        lines(&server, &a_key, "?version=2").1["lines"],
        Value::Array(vec![])
    );
    assert_eq!(
        lines(&server, &a_key, "?limit=1").1["lines"][0]["text"],
        "stderr: hello two"
    );
    assert_eq!(lines(&server, &a_key, "?tail=3").0, 400);

    // Another tenant is told the function is not there; nothing of it shows.
    let (status, _) = lines(&server, &b_key, "");
    assert_eq!(status, 404);

    // The CLI finds the same request's lines.
    let out = server.cli_ok(&["logs", "talker", "--request-id", &second]);
    assert!(out.contains("hello two") && out.contains(&second), "{out}");
    assert!(!out.contains("hello one"), "{out}");

    // --follow prints the lines so far, then each new one as it is printed.
    let mut follow = Command::new(kiln_bin())
        .args(["-o", "json", "logs", "talker", "--follow", "--since", "1h"])
        .env("KILN_SERVER", &server.url)
        .env("KILN_API_KEY", &a_key)
        .env_remove("KILN_TIMEOUT")
        .current_dir(root())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                return;
            }
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a followed line")
    };
    for expected in [
        "hello one",
        "stderr: hello one",
        "hello two",
        "stderr: hello two",
    ] {
        assert_eq!(next()["text"], expected);
    }
    let third = say(&server, &a_key, "hello three");
    let live = next();
    assert_eq!(
        (live["text"].as_str(), live["request_id"].as_str()),
        (Some("hello three"), Some(third.as_str())),
        "{live}"
    );

    // Deleting the function ends the stream; deployed again under the name, the function
    // starts with no lines.
    let d = server.call_as(&a_key, "DELETE", "/v1/functions/talker", b"");
    assert_eq!(d.status, 200, "{}", d.text());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = follow.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "the followed stream did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.deploy_as(&a_key, "talker", "echo", "").status, 201);
    assert_eq!(lines(&server, &a_key, "").1["lines"], Value::Array(vec![]));
    // Without --access-log, requests leave no line of their own.
    assert!(!server.log().contains("kiln::access"), "{}", server.log());
}

/// The server's own log as JSON lines: every line one object.
fn json_log(server: &TestServer) -> Vec<Value> {
    server
        .log()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn the_access_log_has_a_json_line_per_request_with_its_id() {
    let server = TestServer::launch(
        kiln_tests::temp_dir("access-log"),
        None,
        kiln_tests::Launch {
            args: vec!["--access-log".into()],
            env: vec![("KILN_LOG_FORMAT".into(), "json".into())],
            ..kiln_tests::Launch::default()
        },
    )
    .unwrap_or_else(|log| panic!("kiln serve exited before serving:\n{log}"));
    server.deploy_example("hello", "hello", "");
    let a = server.request("GET", "/fn/hello/", &[], b"");
    assert_eq!(a.status, 200, "{}", a.text());
    let id = a.header("x-kiln-request-id").unwrap().to_string();
    let missing = server.request("GET", "/fn/nothing/", &[], b"");
    assert_eq!(missing.status, 404);
    let missing_id = missing.header("x-kiln-request-id").unwrap().to_string();
    let listed = server.get("/v1/functions");
    let listed_id = listed.header("x-kiln-request-id").unwrap().to_string();

    // The data plane's line is written as its body ends: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let found = json_log(&server)
            .into_iter()
            .find(|l| l["target"] == "kiln::access" && l["request_id"] == id.as_str());
        if let Some(l) = found {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no access line for {id}:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        (
            &line["function"],
            &line["version"],
            &line["status"],
            &line["outcome"]
        ),
        (
            &Value::from("hello"),
            &Value::from(1),
            &Value::from(200),
            &Value::from("ok")
        ),
        "{line}"
    );
    assert_eq!(line["tenant"], "default", "{line}");
    assert!(line["duration_ms"].as_f64().unwrap() > 0.0, "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    // The control plane's requests too, by method and path.
    let log = json_log(&server);
    let api = log
        .iter()
        .find(|l| l["target"] == "kiln::access" && l["request_id"] == listed_id.as_str())
        .unwrap_or_else(|| panic!("no access line for GET /v1/functions:\n{}", server.log()));
    assert_eq!(
        (&api["method"], &api["path"], &api["status"]),
        (
            &Value::from("GET"),
            &Value::from("/v1/functions"),
            &Value::from(200)
        )
    );
    // A request for no function is answered before any function is named: the front door's line.
    let refused = log
        .iter()
        .find(|l| l["target"] == "kiln::access" && l["request_id"] == missing_id.as_str())
        .unwrap_or_else(|| panic!("no access line for the 404:\n{}", server.log()));
    assert_eq!(
        (&refused["status"], &refused["path"]),
        (&Value::from(404), &Value::from("/fn/nothing/")),
        "{refused}"
    );
}
