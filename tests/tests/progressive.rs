//! Progressive rollouts over real HTTP: a failing candidate rolled back at its first gate
//! (errors, latency) with the numbers in the history, a healthy one reaching 100% from the
//! CLI, a rollout resumed after a restart, and pause / resume / abort.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_tests::{Answer, TestServer, json};
use serde_json::Value;

/// Function `svc`: version 1 from `stable`, version 2 from `candidate` (examples).
fn two_versions(server: &TestServer, stable: &str, candidate: &str) {
    server.deploy_example("svc", stable, "max_concurrency=64");
    server.deploy_example("svc", candidate, "max_concurrency=64");
    // No policy yet: deploying v2 made it serve everything; pin v1 first, as a team would.
    let a = server.request(
        "PUT",
        "/v1/functions/svc/traffic",
        &[("content-type", "application/json")],
        json!({"weights": {"1": 100}}).to_string().as_bytes(),
    );
    assert_eq!(a.status, 200, "{}", a.text());
}

fn start(server: &TestServer, body: &Value) -> Answer {
    server.request(
        "POST",
        "/v1/functions/svc/rollout",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn rollout(server: &TestServer) -> Value {
    let a = server.get("/v1/functions/svc/rollout");
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()
}

fn weights(server: &TestServer) -> Value {
    server.get("/v1/functions/svc/traffic").json()["policy"]["weights"].clone()
}

/// Calls `path` from 4 threads until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(server: &TestServer, path: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..4)
            .map(|_| {
                let (url, stop) = (format!("{}{path}", server.url), stop.clone());
                std::thread::spawn(move || {
                    let agent = kiln_tests::agent();
                    while !stop.load(Ordering::Relaxed) {
                        let _ = agent
                            .get(&url)
                            .header("authorization", kiln_tests::ADMIN_BEARER)
                            .call();
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Load { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Starts a rollout of `svc` (`body`), calls each of `paths` from 4 threads until it has
/// ended, and returns it as it ended.
fn rollout_under_load(server: &TestServer, body: &Value, paths: &[&str]) -> Value {
    let a = start(server, body);
    assert_eq!(a.status, 201, "{}", a.text());
    let _load: Vec<Load> = paths.iter().map(|p| Load::start(server, p)).collect();
    wait_until_ended(server)
}

/// Polls the rollout until its state is no longer `running` (or 60 s pass).
fn wait_until_ended(server: &TestServer) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = rollout(server);
        if r["state"] != "running" || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_candidate_answering_500s_is_rolled_back_at_the_first_gate_and_the_history_says_why() {
    let server = TestServer::start();
    // hello answers 200 on any path; hostile panics on /panic (500).
    two_versions(&server, "hello", "hostile");
    let a = start(
        &server,
        &json!({"to": 2, "steps": [50, 100], "interval": "1s", "min_requests": 10}),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    assert_eq!(
        (a.json()["state"].clone(), a.json()["stable"].clone()),
        (json!("running"), json!(1))
    );
    assert_eq!(weights(&server), json!({"1": 50, "2": 50}));
    let r = {
        let _load = Load::start(&server, "/fn/svc/panic");
        wait_until_ended(&server)
    };
    assert_eq!(r["state"], "rolled_back", "{r}");
    assert_eq!(r["step"], 0, "rolled back at the first gate: {r}");
    let check = &r["last_check"];
    assert_eq!(check["verdict"], "fail", "{r}");
    assert!(check["candidate"]["errors"].as_u64().unwrap() >= 10, "{r}");
    assert_eq!(check["stable"]["errors"], 0, "{r}");
    assert_eq!(weights(&server), json!({"1": 100, "2": 0}));
    // Everything is on v1 again.
    for _ in 0..20 {
        let a = server.get("/fn/svc/panic");
        assert_eq!((a.status, a.header("x-kiln-version")), (200, Some("1")));
    }
    let history = server.get("/v1/functions/svc/history").json();
    let last = &history["history"][0];
    assert_eq!(last["kind"], "rollout.rollback", "{history}");
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains("automatic rollback at step 1/2") && reason.contains("error rate"),
        "{reason}"
    );
    assert_eq!(last["detail"]["check"]["verdict"], "fail", "{last}");
    assert!(
        last["detail"]["check"]["candidate"]["error_rate"]
            .as_f64()
            .unwrap()
            > 0.5
    );
    assert_eq!(history["history"][1]["kind"], "rollout.step");
    // The rollout is one change: rolling back returns to the policy before it.
    let a = server.request("POST", "/v1/functions/svc/rollback", &[], b"");
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(weights(&server), json!({"1": 100}));
    let metrics = server.get("/metrics").text();
    assert_eq!(
        kiln_tests::metric_sample(&metrics, "kiln_rollout_rollbacks_total{function=\"svc\"}"),
        1.0
    );
    // A rollout that ended leaves the traffic free again.
    let a = server.request(
        "PUT",
        "/v1/functions/svc/traffic",
        &[("content-type", "application/json")],
        json!({"weights": {"1": 100}}).to_string().as_bytes(),
    );
    assert_eq!(a.status, 200, "{}", a.text());
}

#[test]
fn callers_forcing_the_candidate_cannot_steer_its_gates() {
    let server = TestServer::start();
    // Routed traffic gets 404 from hostile (not an error); forced calls to /panic fail.
    two_versions(&server, "hello", "hostile");
    let r = rollout_under_load(
        &server,
        &json!({"to": 2, "steps": [50, 100], "interval": "1s", "min_requests": 10, "max_p99_ratio": 10}),
        &["/fn/svc/healthy", "/fn/svc@2/panic"],
    );
    assert_eq!(r["state"], "completed", "{r}");
    let all = server.get("/v1/functions/svc/versions/2/stats").json();
    assert!(
        all["errors"].as_u64().unwrap() > 0,
        "the forced errors happened: {all}"
    );
}

#[test]
fn a_slow_candidate_fails_the_latency_gate() {
    let server = TestServer::start();
    // On /sleep, hostile sleeps 40 ms; hello answers at once.
    two_versions(&server, "hello", "hostile");
    let r = rollout_under_load(
        &server,
        &json!({"to": 2, "steps": [50, 100], "interval": "1s", "min_requests": 10, "max_p99_ratio": 3}),
        &["/fn/svc/sleep?ms=40"],
    );
    assert_eq!(r["state"], "rolled_back", "{r}");
    let reason = r["outcome"].as_str().unwrap();
    assert!(reason.contains("p99"), "{reason}");
    assert_eq!(weights(&server), json!({"1": 100, "2": 0}));
}

#[test]
fn a_healthy_rollout_started_from_the_cli_reaches_100_percent() {
    let server = TestServer::start();
    two_versions(&server, "hello", "hello");
    let stdout = server.cli_ok(&[
        "rollout",
        "svc",
        "--to",
        "2",
        "--steps",
        "10,50,100",
        "--interval",
        "1s",
        "--min-requests",
        "5",
        "--max-p99-ratio",
        "10",
    ]);
    // Nothing calls the function yet, so no step can pass: the command returned once the
    // rollout was started, not when it ended.
    assert_eq!(rollout(&server)["state"], "running");
    assert!(
        stdout.contains("v1 -> v2 running at step 1/3 (10% on v2)"),
        "{stdout}"
    );
    let r = {
        let _load = Load::start(&server, "/fn/svc/");
        wait_until_ended(&server)
    };
    assert_eq!(r["state"], "completed", "{r}");
    assert_eq!(r["percent"], 100);
    assert_eq!(weights(&server), json!({"1": 0, "2": 100}));
    let history = server.get("/v1/functions/svc/history").json();
    let steps: Vec<&Value> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "rollout.step")
        .collect();
    assert_eq!(steps.len(), 3, "{history}");
    assert!(
        steps[0]["reason"]
            .as_str()
            .unwrap()
            .contains("step 3/3: v2 at 100%")
            && steps[0]["reason"].as_str().unwrap().contains("healthy"),
        "{history}"
    );
    let out = server.cli(&["rollout", "svc"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("completed"));
    let metrics = server.get("/metrics").text();
    assert_eq!(
        kiln_tests::metric_sample(&metrics, "kiln_rollout_steps_total{function=\"svc\"}"),
        3.0
    );
    // The steps were one change: rolling back returns to the policy before the rollout.
    server.cli_ok(&["rollback", "svc", "--reason", "undo the rollout"]);
    assert_eq!(weights(&server), json!({"1": 100}));
}

#[test]
fn a_rollout_resumes_after_a_restart() {
    let mut server = TestServer::start();
    two_versions(&server, "hello", "hello");
    let a = start(
        &server,
        &json!({"to": 2, "steps": [10, 50, 100], "interval": "1s", "min_requests": 5, "max_p99_ratio": 10}),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    {
        let _load = Load::start(&server, "/fn/svc/");
        let deadline = Instant::now() + Duration::from_secs(30);
        while rollout(&server)["step"] == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let r = rollout(&server);
    assert_eq!(
        (r["state"].clone(), r["step"].clone()),
        (json!("running"), json!(1)),
        "{r}"
    );
    server.restart();
    let r = rollout(&server);
    assert_eq!(
        (r["state"].clone(), r["step"].clone()),
        (json!("running"), json!(1)),
        "{r}"
    );
    assert_eq!(weights(&server), json!({"1": 50, "2": 50}));
    let r = {
        let _load = Load::start(&server, "/fn/svc/");
        wait_until_ended(&server)
    };
    assert_eq!(r["state"], "completed", "{r}");
    assert_eq!(weights(&server), json!({"1": 0, "2": 100}));
}

#[test]
fn rollouts_are_paused_resumed_aborted_and_own_the_traffic_meanwhile() {
    let server = TestServer::start();
    two_versions(&server, "hello", "hello");
    for (bad, why) in [
        (json!({"to": 9}), "no version 9"),
        (json!({"to": 2, "steps": [50, 25]}), "rise"),
        (json!({"to": 2, "max_error_rate": 3}), "max_error_rate"),
        (json!({"to": 1}), "already serves all"),
        (json!({"to": 2, "later": true}), "unknown field"),
    ] {
        let a = start(&server, &bad);
        assert_eq!(
            (a.status, a.error_code().as_str()),
            (400, "request.invalid"),
            "{bad}"
        );
        assert!(a.text().contains(why), "{bad}: {}", a.text());
    }
    assert_eq!(
        server.get("/v1/functions/svc/rollout").error_code(),
        "rollout.not_found"
    );
    let a = start(
        &server,
        &json!({"to": 2, "steps": [30, 100], "interval": "1s", "min_requests": 1}),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    let again = start(&server, &json!({"to": 2}));
    assert_eq!(
        (again.status, again.error_code().as_str()),
        (409, "rollout.active")
    );
    server.cli_ok(&[
        "rollout",
        "svc",
        "--pause",
        "--reason",
        "checking dashboards",
    ]);
    assert_eq!(rollout(&server)["state"], "paused");
    {
        let _load = Load::start(&server, "/fn/svc/");
        std::thread::sleep(Duration::from_millis(2500));
    }
    assert_eq!(
        rollout(&server)["step"],
        0,
        "a paused rollout does not advance"
    );
    // Hand edits would fight the rollout: refused, naming the way out.
    let a = server.request(
        "PUT",
        "/v1/functions/svc/traffic",
        &[("content-type", "application/json")],
        json!({"weights": {"1": 100}}).to_string().as_bytes(),
    );
    assert_eq!((a.status, a.error_code().as_str()), (409, "rollout.active"));
    assert!(a.text().contains("--abort"), "{}", a.text());
    let again = server.request("POST", "/v1/functions/svc/rollout/pause", &[], b"");
    assert_eq!(
        (again.status, again.error_code().as_str()),
        (409, "rollout.not_active")
    );
    let a = server.request("POST", "/v1/functions/svc/rollout/resume", &[], b"");
    assert_eq!(
        (a.status, a.json()["state"].clone()),
        (200, json!("running"))
    );
    server.cli_ok(&["rollout", "svc", "--abort", "--reason", "wrong build"]);
    let r = rollout(&server);
    assert_eq!(
        (r["state"].clone(), r["outcome"].clone()),
        (json!("aborted"), json!("wrong build"))
    );
    assert_eq!(weights(&server), json!({"1": 100, "2": 0}));
    let a = server.request("POST", "/v1/functions/svc/rollout/resume", &[], b"");
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (409, "rollout.not_active")
    );
    let kinds: Vec<String> = server.get("/v1/functions/svc/history").json()["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds[..4],
        [
            "rollout.abort",
            "rollout.resume",
            "rollout.pause",
            "rollout.step"
        ],
        "{kinds:?}"
    );
    // A rollback during a rollout aborts it.
    let a = start(&server, &json!({"to": 2, "interval": "1m"}));
    assert_eq!(a.status, 201, "{}", a.text());
    let a = server.request("POST", "/v1/functions/svc/rollback", &[], b"");
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(rollout(&server)["state"], "aborted");
    assert_eq!(weights(&server), json!({"1": 100, "2": 0}));
}
