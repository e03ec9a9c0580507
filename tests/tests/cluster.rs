//! Two nodes on one PostgreSQL database and one S3 bucket (a real moto server), running at
//! once: what one node changes, the other applies within a second — a deploy, a traffic
//! change, a key made and revoked, a delete — and every node's usage lands in the one
//! ledger. Prints the propagation times it saw. And the database cut off (a proxy in front
//! of it closes every connection): functions keep serving, the control plane answers 503,
//! and no usage record is lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kiln_tests::cluster::Cluster;
use kiln_tests::proxy::Proxy;
use kiln_tests::{Launch, TestServer, json, temp_dir};

/// How long until `ok` holds (asserting it does within a second).
fn within_a_second(what: &str, mut ok: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !ok() {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{what}: not applied on the other node within 1 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

#[test]
fn changes_on_one_node_apply_on_the_other_within_a_second() {
    let Some(cluster) = Cluster::start("cluster::changes", 2, false) else {
        return;
    };
    let [a, b] = &cluster.nodes[..] else {
        unreachable!()
    };
    let mut seen = Vec::new();

    // A deploy on A serves on B (fetching the artifact A compiled).
    a.deploy_example("hello", "hello", "");
    seen.push(within_a_second("deploy", || {
        b.get("/fn/hello/").status == 200
    }));
    let r = b.get("/fn/hello/");
    assert_eq!(r.text(), "hello\n");

    // A traffic change on B routes on A.
    a.deploy_example("hello", "hello", "");
    assert_eq!(a.get("/fn/hello/").header("x-kiln-version"), Some("2"));
    let put = b.request(
        "PUT",
        "/v1/functions/hello/traffic",
        &[("content-type", "application/json")],
        json!({"weights": {"1": 100}}).to_string().as_bytes(),
    );
    assert_eq!(put.status, 200, "{}", put.text());
    seen.push(within_a_second("traffic", || {
        a.get("/fn/hello/").header("x-kiln-version") == Some("1")
    }));

    // Sticky keys land on the same version on every node: one secret, kept in the
    // database, salts every node's hash.
    let put = b.request(
        "PUT",
        "/v1/functions/hello/traffic",
        &[("content-type", "application/json")],
        json!({"weights": {"1": 50, "2": 50}, "sticky": "header:x-user-id"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(put.status, 200, "{}", put.text());
    let revision = put.json()["revision"].clone();
    within_a_second("sticky policy", || {
        a.get("/v1/functions/hello/traffic").json()["revision"] == revision
    });
    let landing = |s: &TestServer, user: &str| {
        s.request("GET", "/fn/hello/", &[("x-user-id", user)], b"")
            .header("x-kiln-version")
            .map(str::to_string)
    };
    let mut versions = std::collections::BTreeSet::new();
    for user in (0..40).map(|u| format!("user-{u}")) {
        let on_a = landing(a, &user);
        assert_eq!(
            on_a,
            landing(b, &user),
            "{user} lands differently on the two nodes"
        );
        versions.insert(on_a);
    }
    assert_eq!(
        versions.len(),
        2,
        "keys spread over both versions: {versions:?}"
    );

    // A key made on A works on B; revoked on B, it is refused on A.
    let (key, id) = a.create_key("default", &["invoke:*"], None);
    let auth = format!("Bearer {key}");
    let call = |s: &TestServer| {
        s.request(
            "GET",
            "/fn/hello/",
            &[("authorization", auth.as_str())],
            b"",
        )
        .status
    };
    seen.push(within_a_second("key create", || call(b) == 200));
    let revoke = b.request("DELETE", &format!("/v1/keys/{id}"), &[], b"");
    assert_eq!(revoke.status, 200, "{}", revoke.text());
    seen.push(within_a_second("key revoke", || call(a) == 401));
    assert_eq!(call(b), 401);

    // Both nodes' requests are in the one ledger.
    let total = |s: &TestServer| {
        s.get("/v1/usage?function=hello").json()["totals"]["requests"]
            .as_u64()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let answered = (a.get("/fn/hello/").status, b.get("/fn/hello/").status);
    assert_eq!(answered, (200, 200));
    while total(a) != total(b) || total(a) < 4 {
        assert!(
            Instant::now() < deadline,
            "usage differs: {} vs {}",
            total(a),
            total(b)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Deleted and made again on A at once: B keeps nothing of the old function (its
    // versions, its policy), whether or not it saw the moment in between.
    assert_eq!(
        a.request("DELETE", "/v1/functions/hello", &[], b"").status,
        200
    );
    let v3 = a.deploy_example("hello", "hello", "");
    assert_eq!(v3["version"], 3, "numbers are never reused");
    seen.push(within_a_second("delete and create", || {
        b.get("/fn/hello@3/").status == 200
    }));
    assert_eq!(
        b.get("/fn/hello@1/").status,
        404,
        "an old version survived on B"
    );
    assert_eq!(
        b.get("/fn/hello/").header("x-kiln-version"),
        Some("3"),
        "the old policy survived on B"
    );

    // A delete on A is a 404 on B.
    assert_eq!(
        a.request("DELETE", "/v1/functions/hello", &[], b"").status,
        200
    );
    seen.push(within_a_second("delete", || {
        b.get("/fn/hello/").status == 404
    }));
    eprintln!("propagation: {seen:?}");
}

#[test]
fn database_cut_off_keeps_functions_serving_answers_503_and_loses_no_usage() {
    let Some(db) = kiln_tests::pg::shared_database("cluster::outage") else {
        return;
    };
    // The node reaches PostgreSQL through a proxy the test can cut.
    let (head, rest) = db.url.split_once('@').expect("user@host in the URL");
    let (address, name) = rest.split_once('/').expect("a database name");
    let mut proxy = Proxy::start(address);
    let url = format!("{head}@127.0.0.1:{}/{name}", proxy.port);
    let server = TestServer::launch(
        temp_dir("outage-node"),
        None,
        Launch {
            args: vec!["--database".into(), url],
            ..Launch::default()
        },
    )
    .unwrap_or_else(|log| panic!("kiln serve exited before serving:\n{log}"));
    server.deploy_example("hello", "hello", "");
    let mut answered = 0;
    assert_eq!(server.get("/fn/hello/").status, 200);
    answered += 1;

    proxy.cut();
    for _ in 0..20 {
        let r = server.get("/fn/hello/");
        assert_eq!(
            r.status,
            200,
            "a function failed while the database was away: {}",
            r.text()
        );
        answered += 1;
    }
    let wasm = std::fs::read(kiln_tests::example("hello")).unwrap();
    let deploy = server.deploy_wasm("hello", &wasm, "");
    assert_eq!(deploy.status, 503, "{}", deploy.text());
    assert_eq!(deploy.error_code(), "store.unavailable");
    let ready = server.get("/readyz");
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("database"), "{}", ready.text());

    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.get("/readyz").status != 200 {
        assert!(Instant::now() < deadline, "readyz did not recover");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.deploy_wasm("hello", &wasm, "").status, 201);
    // Every answered request's record reaches the database once it is back.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let total = server.get("/v1/usage?function=hello").json()["totals"]["requests"]
            .as_u64()
            .unwrap();
        if total == answered {
            break;
        }
        assert!(
            total < answered,
            "more records than requests: {total} > {answered}"
        );
        assert!(
            Instant::now() < deadline,
            "usage records lost: {total} of {answered}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn two_nodes_each_enforce_half_of_a_key_rate() {
    let Some(cluster) = Cluster::start("cluster::rates", 2, false) else {
        return;
    };
    let [a, b] = &cluster.nodes[..] else {
        unreachable!()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    for n in [a, b] {
        while n.get("/v1/cluster").json()["rate_limit_nodes"] != 2 {
            assert!(
                Instant::now() < deadline,
                "{} does not share rates with two nodes",
                n.url
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    a.deploy_example("hello", "hello", "");
    // 10 a minute for the cluster: 5 on each of the two nodes.
    let (key, _) = a.create_key("default", &["invoke:*"], Some("10/m"));
    let auth = format!("Bearer {key}");
    let call = |s: &TestServer| {
        s.request(
            "GET",
            "/fn/hello/",
            &[("authorization", auth.as_str())],
            b"",
        )
        .status
    };
    within_a_second("key create", || call(b) != 401);
    // That call took one of B's five.
    let passed = |s: &TestServer, n: usize| (0..n).filter(|_| call(s) == 200).count();
    assert_eq!(passed(a, 8), 5, "node A's share of 10/m");
    assert_eq!(passed(b, 8), 4, "node B's share, one already used");
    let refused = a.request(
        "GET",
        "/fn/hello/",
        &[("authorization", auth.as_str())],
        b"",
    );
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.error_code(), "rate.limited");
}

/// The `.jsonl` files waiting in a node's usage spool.
fn spooled(server: &TestServer) -> usize {
    std::fs::read_dir(server.data_dir.join("usage-spool"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
            })
            .count()
        })
        .unwrap_or(0)
}

#[test]
fn strict_usage_answered_while_the_database_is_away_waits_on_disk_and_survives_a_kill() {
    let Some(db) = kiln_tests::pg::shared_database("cluster::spool") else {
        return;
    };
    let (head, rest) = db.url.split_once('@').expect("user@host in the URL");
    let (address, name) = rest.split_once('/').expect("a database name");
    let mut proxy = Proxy::start(address);
    let url = format!("{head}@127.0.0.1:{}/{name}", proxy.port);
    let dir = temp_dir("spool-node");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("kiln.toml");
    std::fs::write(&config, "[metering]\ndurability = \"strict\"\n").unwrap();
    let mut server = TestServer::launch(
        dir,
        Some(config),
        Launch {
            args: vec!["--database".into(), url],
            ..Launch::default()
        },
    )
    .unwrap_or_else(|log| panic!("kiln serve exited before serving:\n{log}"));
    server.deploy_example("hello", "hello", "");
    assert_eq!(server.get("/fn/hello/").status, 200);
    let mut answered = 1;

    // Strict: each answer waits for its record, which now goes to the local disk.
    proxy.cut();
    for _ in 0..10 {
        let r = server.get("/fn/hello/");
        assert_eq!(r.status, 200, "{}", r.text());
        answered += 1;
    }
    assert!(spooled(&server) > 0, "no usage waits on disk");
    // The node dies before the database is back: the records are on its disk.
    server.kill9();
    proxy.restore();
    server.restart_after_kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let total = server.get("/v1/usage?function=hello").json()["totals"]["requests"]
            .as_u64()
            .unwrap();
        assert!(total <= answered, "more records than requests: {total}");
        if total == answered && spooled(&server) == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage records lost: {total} of {answered}, {} files still spooled",
            spooled(&server)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
