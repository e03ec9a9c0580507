//! Rollouts across three nodes on one PostgreSQL database and one bucket (moto): the nodes
//! list one another (`GET /v1/cluster`, `kiln nodes`), a rollout started on one node owns
//! the traffic on all of them, keeps going when its driver is killed with SIGKILL and rolls
//! back a failing candidate whose errors were answered by the two other nodes (the gate
//! judged on their numbers added up), and a driver stopped long enough to lose its lease
//! writes no step once it runs again; a node shut down with SIGTERM hands its rollouts to
//! another node at once instead of letting the lease lapse.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kiln_tests::cluster::Cluster;
use kiln_tests::{TestServer, json};
use serde_json::Value;

fn rollout(s: &TestServer) -> Value {
    let a = s.get("/v1/functions/svc/rollout");
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()
}

/// Waits (up to `limit`) for `ok` on what `s` says of the rollout; returns it.
fn wait_for(s: &TestServer, limit: Duration, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let r = rollout(s);
        if ok(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "{what} within {limit:?}: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn weights(s: &TestServer) -> Value {
    s.get("/v1/functions/svc/traffic").json()["policy"]["weights"].clone()
}

/// Waits until every node routes `svc` by `want` (and so has every change before it).
fn routed_everywhere(nodes: &[TestServer], want: &Value) {
    let deadline = Instant::now() + Duration::from_secs(5);
    for n in nodes {
        while weights(n) != *want {
            assert!(Instant::now() < deadline, "{want} did not reach {}", n.url);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `svc` v1 (hello) pinned, v2 from `candidate`, deployed on the first node; seen by all.
fn two_versions(nodes: &[TestServer], candidate: &str) {
    let s = &nodes[0];
    s.deploy_example("svc", "hello", "max_concurrency=64");
    s.deploy_example("svc", candidate, "max_concurrency=64");
    let pin = s.request(
        "PUT",
        "/v1/functions/svc/traffic",
        &[("content-type", "application/json")],
        json!({"weights": {"1": 100}}).to_string().as_bytes(),
    );
    assert_eq!(pin.status, 200, "{}", pin.text());
    routed_everywhere(nodes, &json!({"1": 100}));
}

fn start(s: &TestServer, body: &Value) -> Value {
    let a = s.request(
        "POST",
        "/v1/functions/svc/rollout",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    a.json()
}

/// Calls `path` `n` times on `s`; returns how many failed (the candidate: v1 answers
/// every path).
fn candidate_answers(s: &TestServer, path: &str, n: usize) -> u64 {
    (0..n).filter(|_| s.get(path).status == 500).count() as u64
}

#[test]
fn the_nodes_list_each_other_and_a_rollout_outlives_its_killed_driver() {
    let Some(cluster) = Cluster::start("cluster::rollout_takeover", 3, true) else {
        return;
    };
    let nodes = &cluster.nodes;
    let [a, b, c] = &nodes[..] else {
        unreachable!()
    };

    // Every node sees the three, with what each reports of itself.
    let deadline = Instant::now() + Duration::from_secs(5);
    let listed = loop {
        let v = b.get("/v1/cluster").json();
        if v["nodes"].as_array().map(Vec::len) == Some(3) {
            break v;
        }
        assert!(Instant::now() < deadline, "three nodes not listed: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(listed["node"], "node-2", "{listed}");
    let ids: Vec<&str> = listed["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["node-1", "node-2", "node-3"]);
    let first = &listed["nodes"][0];
    assert_eq!(
        first["address"],
        a.url.trim_start_matches("http://"),
        "{first}"
    );
    assert_eq!(first["version"], env!("CARGO_PKG_VERSION"), "{first}");
    let cli: Value = serde_json::from_str(&c.cli_ok(&["nodes", "--output", "json"])).unwrap();
    assert_eq!(cli.as_array().map(Vec::len), Some(3), "{cli}");
    let table = c.cli_ok(&["nodes"]);
    assert!(
        table.contains("node-3 *") && table.contains("node-1"),
        "{table}"
    );
    // An admin's view: a key without admin is refused.
    let (key, _) = a.create_key("default", &["invoke:*"], None);
    let refused = a.call_as(&key, "GET", "/v1/cluster", b"");
    assert_eq!(refused.status, 403, "{}", refused.text());

    // hostile panics on /panic (500); hello answers 200 on any path.
    two_versions(nodes, "hostile");
    let started = start(
        a,
        &json!({"to": 2, "steps": [50, 100], "interval": "8s", "min_requests": 20}),
    );
    assert_eq!(
        started["driver"], "node-1",
        "the node that started it drives it: {started}"
    );
    // Another node refuses a traffic change while it runs.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let put = c.request(
            "PUT",
            "/v1/functions/svc/traffic",
            &[("content-type", "application/json")],
            json!({"weights": {"1": 100}}).to_string().as_bytes(),
        );
        if put.status == 409 {
            assert_eq!(put.error_code(), "rollout.active", "{}", put.text());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 3 let a traffic change through: {}",
            put.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    routed_everywhere(&nodes[1..], &json!({"1": 50, "2": 50}));
    // The failing candidate's requests are all answered by nodes 2 and 3, well before the
    // first gate (8 s); then, their numbers published, the driver dies.
    let on_b = candidate_answers(b, "/fn/svc/panic", 40);
    let on_c = candidate_answers(c, "/fn/svc/panic", 40);
    assert!(
        on_b > 0 && on_c > 0,
        "both nodes served the candidate: {on_b}, {on_c}"
    );
    std::thread::sleep(Duration::from_millis(2500));
    let r = rollout(a);
    assert_eq!(
        (r["state"].clone(), r["driver"].clone()),
        (json!("running"), json!("node-1")),
        "{r}"
    );
    a.kill9();
    let killed = Instant::now();
    let r = wait_for(
        b,
        Duration::from_secs(30),
        "rolled back by a new driver",
        |r| r["state"] != "running",
    );
    eprintln!(
        "taken over and judged {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(r["state"], "rolled_back", "{r}");
    assert!(
        r["driver"] == "node-2" || r["driver"] == "node-3",
        "a live node drove it: {r}"
    );
    let check = &r["last_check"]["candidate"];
    assert_eq!(
        check["requests"].as_u64(),
        Some(on_b + on_c),
        "the gate added up both nodes' numbers ({on_b} + {on_c}): {r}"
    );
    assert_eq!(check["errors"], check["requests"], "{r}");
    routed_everywhere(&nodes[1..], &json!({"1": 100, "2": 0}));
}

#[test]
fn a_driver_stopped_past_its_lease_writes_no_step_when_it_runs_again() {
    let Some(cluster) = Cluster::start("cluster::rollout_fencing", 2, true) else {
        return;
    };
    let nodes = &cluster.nodes;
    let [a, b] = &nodes[..] else { unreachable!() };
    two_versions(nodes, "hello");
    // Steps far apart: nothing is due while the test looks, so any write is a stray one.
    let started = start(
        a,
        &json!({"to": 2, "steps": [10, 50, 100], "interval": "1h", "min_requests": 1}),
    );
    assert_eq!(started["driver"], "node-1", "{started}");
    let epoch = started["epoch"].as_u64().unwrap();

    a.signal("STOP");
    let taken = wait_for(b, Duration::from_secs(15), "taken over", |r| {
        r["driver"] == "node-2"
    });
    assert!(taken["epoch"].as_u64().unwrap() > epoch, "{taken}");
    // Node 2 pauses it while node 1 sleeps; node 1, woken, still holds its old view.
    let pause = b.request("POST", "/v1/functions/svc/rollout/pause", &[], b"");
    assert_eq!(pause.status, 200, "{}", pause.text());
    let paused = pause.json();
    a.signal("CONT");
    // Node 1 learns it no longer drives, and sees the pause; nothing it held is written.
    let seen = wait_for(a, Duration::from_secs(5), "node 1 caught up", |r| {
        r["state"] == "paused" && r["driver"] == "node-2"
    });
    assert_eq!(seen["epoch"], paused["epoch"], "{seen}");
    std::thread::sleep(Duration::from_secs(3));
    let now = rollout(b);
    assert_eq!(
        (
            now["state"].clone(),
            now["step"].clone(),
            now["driver"].clone()
        ),
        (json!("paused"), json!(0), json!("node-2")),
        "{now}"
    );
    // Node 1 resumes it: decided on the stored state, not on its stale memory.
    let resume = a.request("POST", "/v1/functions/svc/rollout/resume", &[], b"");
    assert_eq!(resume.status, 200, "{}", resume.text());
    let history = b.get("/v1/functions/svc/history").json();
    let kinds: Vec<&str> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["rollout.resume", "rollout.pause", "rollout.step", "traffic"],
        "one step (the start), then the pause and the resume: {history}"
    );
}

#[test]
fn a_node_shut_down_with_sigterm_hands_its_rollouts_over_at_once() {
    let Some(mut cluster) = Cluster::start("cluster::rollout_release", 2, true) else {
        return;
    };
    two_versions(&cluster.nodes, "hello");
    let started = start(
        &cluster.nodes[0],
        &json!({"to": 2, "steps": [10, 50, 100], "interval": "1h", "min_requests": 1}),
    );
    assert_eq!(started["driver"], "node-1", "{started}");
    let stopped = Instant::now();
    assert_eq!(cluster.nodes[0].terminate(), Some(0));
    let log = cluster.nodes[0].log();
    assert!(log.contains("rollout leases released"), "{log}");
    // Released, not lapsed: the lease (5 s, renewed every second) would still be held
    // for about 4 s more; the other node takes it at its next heartbeat.
    let b = &cluster.nodes[1];
    let taken = wait_for(b, Duration::from_secs(10), "taken over", |r| {
        r["driver"] == "node-2"
    });
    let after = stopped.elapsed();
    assert!(
        after < Duration::from_secs(3),
        "taken over {after:?} after SIGTERM: {taken}"
    );
    assert_eq!(
        (taken["state"].clone(), taken["step"].clone()),
        (json!("running"), json!(0)),
        "{taken}"
    );
}
