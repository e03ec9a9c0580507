//! The metadata store's rules, checked on both backends (PostgreSQL when one answers).

use super::*;
use crate::store::pg::scratch::{self, ScratchDb};
use cluster::SECRET_LEN;

/// The store on each backend: SQLite in a temp dir, and PostgreSQL in a database of
/// its own when one answers.
pub(super) async fn backends(
    test: &str,
) -> Vec<(MetaStore, Option<ScratchDb>, std::path::PathBuf)> {
    let dir = std::env::temp_dir().join(format!("kiln-meta-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let sqlite = MetaStore::Sqlite(SqliteMeta::open(&dir.join("kiln.db")).expect("open"));
    let mut all = vec![(sqlite, None, dir.clone())];
    if let Some(db) = scratch::database(test).await {
        let pool = crate::store::pg::connect(&db.url).await.expect("connect");
        all.push((MetaStore::Postgres(PgMeta::new(pool)), Some(db), dir));
    }
    all
}

pub(super) fn new(function: &str) -> NewVersion {
    NewVersion {
        function: function.into(),
        digest: Digest::of(b"x"),
        size: 1,
        limits: Limits::default(),
        nn: NnSpec::default(),
        cache: CacheSpec::default(),
        signer: None,
        signed_at: None,
        outbound: Vec::new(),
        tenant: "t".into(),
        enforce_owner: true,
        public: None,
        validation: None,
        variables: Default::default(),
    }
}

async fn version(meta: &MetaStore, n: NewVersion) -> u32 {
    meta.create_version(&n).await.expect("create").0.version
}

#[tokio::test]
async fn versions_count_up_and_are_never_reused_on_every_backend() {
    for (meta, _db, dir) in backends("seq").await {
        let b = meta.describe();
        assert_eq!(version(&meta, new("a")).await, 1, "{b}");
        assert_eq!(version(&meta, new("a")).await, 2, "{b}");
        assert_eq!(version(&meta, new("b")).await, 1, "{b}");
        assert!(meta.delete_function("a").await.expect("delete"), "{b}");
        assert!(!meta.delete_function("a").await.expect("again"), "{b}");
        assert_eq!(version(&meta, new("a")).await, 3, "{b}");
        // Another tenant cannot add versions; an admin can, and the owner stays.
        let mut other = new("a");
        other.tenant = "u".into();
        let err = meta
            .create_version(&other)
            .await
            .expect_err("not the owner");
        assert!(err.downcast_ref::<NotOwner>().is_some(), "{b}: {err:#}");
        other.enforce_owner = false;
        other.public = Some(true);
        let (_, info) = meta.create_version(&other).await.expect("admin");
        assert_eq!((info.tenant.as_str(), info.public), ("t", true), "{b}");
        // A signed manifest must be newer than the last signed deploy.
        let mut signed = new("s");
        signed.signed_at = Some(1000);
        version(&meta, signed.clone()).await;
        let err = meta.create_version(&signed).await.expect_err("replay");
        assert!(err.downcast_ref::<Replayed>().is_some(), "{b}: {err:#}");
        // Models and limits round-trip.
        let mut with_model = new("m");
        with_model.nn.models.push(crate::nn::ModelRef {
            name: "digits".into(),
            digest: Digest::of(b"model"),
            size: 5,
            encoding: crate::nn::Encoding::Onnx,
            target: crate::nn::Target::Auto,
            backend: Some(crate::nn::BackendKind::Tract),
            batch: crate::nn::BatchSpec::Auto,
            monitor: None,
        });
        with_model.nn.guest_load_max_bytes = Some(1024);
        with_model.limits.rate = Some("5/s".parse().expect("rate"));
        with_model.outbound = vec!["https://api.example.com".into()];
        meta.create_version(&with_model).await.expect("m1");
        let all = meta.state().await.expect("state").versions;
        assert_eq!(all.len(), 5, "{b}");
        let m = all.iter().find(|r| r.function == "m").expect("m");
        assert_eq!(
            (&m.nn, m.limits, &m.outbound),
            (&with_model.nn, with_model.limits, &with_model.outbound),
            "{b}"
        );
        let functions = meta.state().await.expect("state").functions;
        assert_eq!(functions.len(), 4, "{b}");
        // Blob owners.
        let d = Digest::of(b"blob");
        assert!(!meta.owns_blob(&d, "t").await.expect("owns"), "{b}");
        meta.add_blob_owner(&d, "t").await.expect("add");
        meta.add_blob_owner(&d, "t").await.expect("add twice");
        assert!(meta.owns_blob(&d, "t").await.expect("owns"), "{b}");
        assert!(!meta.owns_blob(&d, "u").await.expect("owns"), "{b}");
        meta.ping().await.expect("ping");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test]
async fn traffic_changes_keep_revisions_history_and_the_previous_policy_on_every_backend() {
    for (meta, _db, dir) in backends("traffic").await {
        let b = meta.describe();
        version(&meta, new("f")).await;
        version(&meta, new("f")).await;
        let change = |policy: &'static str, kind: &'static str| TrafficChange {
            policy,
            actor: Some("key1"),
            kind,
            reason: "because",
            rollout: None,
            extra: None,
            expect: Expect::NoActiveRollout,
            if_revision: None,
        };
        let p1 = r#"{"weights":{"1":100}}"#;
        let p2 = r#"{"weights":{"1":50,"2":50}}"#;
        assert_eq!(
            meta.set_traffic("f", None, &change(p1, "traffic"))
                .await
                .expect("1")
                .revision,
            1
        );
        assert_eq!(
            meta.set_traffic("f", None, &change(p2, "traffic"))
                .await
                .expect("2")
                .revision,
            2
        );
        assert_eq!(
            meta.set_traffic("f", Some("staging"), &change(p1, "traffic"))
                .await
                .expect("a")
                .revision,
            1,
            "{b}: aliases count their own revisions"
        );
        let (kind, previous) = meta
            .previous_traffic("f", None)
            .await
            .expect("previous")
            .expect("some");
        assert_eq!(kind, "traffic", "{b}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&previous).expect("json"),
            serde_json::from_str::<serde_json::Value>(p1).expect("json"),
            "{b}"
        );
        let (_, previous) = meta
            .previous_traffic("f", Some("staging"))
            .await
            .expect("previous")
            .expect("some");
        assert_eq!(previous, "null", "{b}: the alias had no policy before");
        assert_eq!(meta.state().await.expect("state").traffic.len(), 1, "{b}");
        assert_eq!(meta.state().await.expect("state").aliases.len(), 1, "{b}");
        let history = meta.history("f", 10, None, None).await.expect("history");
        assert_eq!(history.len(), 3, "{b}");
        assert_eq!(history[0]["detail"]["alias"], "staging", "{b}");
        assert_eq!(history[1]["detail"]["revision"], 2, "{b}");
        assert_eq!(history[2]["actor"], "key1", "{b}");
        // The next page starts below the last sequence number seen.
        let older = meta
            .history("f", 10, history[0]["seq"].as_i64(), None)
            .await
            .expect("older");
        assert_eq!(older, history[1..], "{b}");
        assert_eq!(
            meta.history("f", 10, None, Some("t"))
                .await
                .expect("t")
                .len(),
            3,
            "{b}"
        );
        assert!(
            meta.history("f", 10, None, Some("u"))
                .await
                .expect("u")
                .is_empty(),
            "{b}"
        );
        assert!(meta.rollout("f").await.expect("rollout").is_none(), "{b}");
        assert!(
            meta.active_rollouts().await.expect("active").is_empty(),
            "{b}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn running_rollout() -> Rollout {
    serde_json::from_value(serde_json::json!({
        "function": "f", "candidate": 2, "stable": 1, "steps": [10, 100], "step": 0,
        "interval_ms": 1000, "gates": {}, "state": "running", "actor": null,
        "started_at_ms": 1, "step_started_ms": 1, "updated_at_ms": 1,
    }))
    .expect("rollout")
}

#[tokio::test]
async fn one_driver_holds_a_rollout_and_a_write_on_an_old_epoch_is_fenced_on_every_backend() {
    for (meta, _db, dir) in backends("lease").await {
        let b = meta.describe();
        version(&meta, new("f")).await;
        version(&meta, new("f")).await;
        let mut r = running_rollout();
        let start = TrafficChange {
            policy: r#"{"weights":{"1":90,"2":10}}"#,
            actor: None,
            kind: "rollout.step",
            reason: "started",
            rollout: Some(&r),
            extra: None,
            expect: Expect::NoActiveRollout,
            if_revision: None,
        };
        let stored = meta.set_traffic("f", None, &start).await.expect("start");
        assert_eq!(stored.epoch, Some(1), "{b}");
        // A second start, or a hand-made policy, while it runs: refused with the rollout.
        let err = meta
            .set_traffic("f", None, &start)
            .await
            .expect_err("twice");
        let moved = err.downcast_ref::<RolloutMoved>().expect("moved");
        assert_eq!(moved.now.as_ref().map(|r| r.epoch), Some(1), "{b}");
        // Node 1 takes the lease; node 2 cannot while it lasts.
        let taken = meta.take_lease("f", "n1", 60_000).await.expect("take");
        assert_eq!(
            taken.as_ref().map(|r| (r.epoch, r.driver.as_deref())),
            Some((2, Some("n1"))),
            "{b}"
        );
        assert!(
            meta.take_lease("f", "n2", 60_000)
                .await
                .expect("n2")
                .is_none(),
            "{b}"
        );
        assert_eq!(
            meta.renew_lease("f", "n1", 0).await.expect("renew"),
            Some(2),
            "{b}"
        );
        assert_eq!(
            meta.renew_lease("f", "n2", 0).await.expect("renew"),
            None,
            "{b}"
        );
        // A step decided on the epoch before the lease was taken is fenced off.
        r.step = 1;
        let err = meta
            .record_rollout("f", None, "rollout.pause", "x", &r, 1)
            .await
            .expect_err("old epoch");
        assert!(err.downcast_ref::<RolloutMoved>().is_some(), "{b}: {err:#}");
        assert_eq!(
            meta.record_rollout("f", None, "rollout.pause", "x", &r, 2)
                .await
                .expect("write"),
            3,
            "{b}"
        );
        // Node 1's lease (renewed for 0 ms) lapses: node 2 takes over, and node 1's next
        // write and renewal are refused.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let taken = meta.take_lease("f", "n2", 60_000).await.expect("take over");
        assert_eq!(taken.map(|r| (r.epoch, r.step)), Some((4, 1)), "{b}");
        let err = meta
            .record_rollout("f", None, "rollout.pause", "x", &r, 3)
            .await
            .expect_err("fenced");
        assert!(err.downcast_ref::<RolloutMoved>().is_some(), "{b}: {err:#}");
        assert_eq!(
            meta.renew_lease("f", "n1", 60_000).await.expect("renew"),
            None,
            "{b}"
        );
        let state = meta.state().await.expect("state");
        assert_eq!(state.rollouts.len(), 1, "{b}");
        assert_eq!(
            (state.rollouts[0].epoch, state.rollouts[0].driver.as_deref()),
            (4, Some("n2")),
            "{b}"
        );
        // Published numbers: only those of the step asked for, from other processes.
        let stats = |v: u32, s: &str| PublishedStats {
            version: v,
            stats: s.into(),
        };
        meta.publish_rollout_stats("f", "n1#1", 1, &[stats(2, "a"), stats(1, "b")])
            .await
            .expect("publish");
        meta.publish_rollout_stats("f", "n2#1", 1, &[stats(2, "c")])
            .await
            .expect("publish");
        meta.publish_rollout_stats("f", "n3#1", 7, &[stats(2, "d")])
            .await
            .expect("publish");
        let mut seen: Vec<String> = meta
            .rollout_stats("f", 1, "n2#1")
            .await
            .expect("read")
            .into_iter()
            .map(|p| p.stats)
            .collect();
        seen.sort();
        assert_eq!(seen, ["a", "b"], "{b}");
        // Heartbeats: the live nodes, with what they reported.
        let report = |id: &str| NodeReport {
            id: id.into(),
            address: "127.0.0.1:1".into(),
            version: "0".into(),
            started_at_ms: 5,
            heartbeat_ms: 0,
            loaded: vec!["f@1".into()],
            in_flight: 3,
        };
        meta.heartbeat(&report("n1")).await.expect("beat");
        meta.heartbeat(&report("n2")).await.expect("beat");
        meta.heartbeat(&report("n1")).await.expect("beat again");
        let nodes = meta.nodes(60_000).await.expect("nodes");
        assert_eq!(
            nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
            ["n1", "n2"],
            "{b}"
        );
        assert_eq!(
            (nodes[0].in_flight, nodes[0].loaded.clone()),
            (3, vec!["f@1".to_string()]),
            "{b}"
        );
        assert!(nodes[0].heartbeat_ms > 0, "{b}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            meta.nodes(5).await.expect("nodes").is_empty(),
            "{b}: none beat in the last 5 ms"
        );
        // Deleting the function forgets its rollout and numbers.
        meta.delete_function("f").await.expect("delete");
        assert!(
            meta.rollout_stats("f", 1, "x")
                .await
                .expect("read")
                .is_empty(),
            "{b}"
        );
        assert!(
            meta.state().await.expect("state").rollouts.is_empty(),
            "{b}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test]
async fn a_secret_is_made_once_and_every_caller_reads_the_same_on_every_backend() {
    for (meta, db, dir) in backends("secret").await {
        let b = meta.describe();
        let first = meta.secret("sticky").await.expect("make");
        assert_ne!(first, [0u8; SECRET_LEN], "{b}: not random");
        assert_eq!(meta.secret("sticky").await.expect("read"), first, "{b}");
        assert_ne!(meta.secret("other").await.expect("other"), first, "{b}");
        // Another store on the same database (another node, a restart) reads it too.
        let again = match &meta {
            MetaStore::Sqlite(_) => {
                MetaStore::Sqlite(SqliteMeta::open(&dir.join("kiln.db")).expect("reopen"))
            }
            MetaStore::Postgres(_) => {
                let url = &db.as_ref().expect("scratch database").url;
                MetaStore::Postgres(PgMeta::new(
                    crate::store::pg::connect(url).await.expect("connect"),
                ))
            }
        };
        assert_eq!(again.secret("sticky").await.expect("read"), first, "{b}");
    }
}

#[tokio::test]
async fn an_idempotency_key_runs_once_replays_its_answer_and_expires_on_every_backend() {
    use idempotency::{ABANDONED_AFTER_MS, KEEP_MS};
    for (meta, _db, _dir) in backends("idempotency").await {
        let b = meta.describe();
        let t0 = 1_000_000_000_000;
        let claim = |key: &'static str, fp: &'static str, token: &'static str, at: i64| {
            let meta = &meta;
            async move {
                meta.idempotency_claim("k1|key.create", key, fp, token, Some(at))
                    .await
                    .expect("claim")
            }
        };
        assert_eq!(claim("a", "f1", "t1", t0).await, Claim::New, "{b}");
        assert_eq!(
            claim("a", "f1", "t2", t0 + 1).await,
            Claim::InProgress,
            "{b}"
        );
        assert_eq!(claim("a", "f2", "t2", t0 + 1).await, Claim::Reused, "{b}");
        // Another caller's scope is another key space.
        assert_eq!(
            meta.idempotency_claim("k2|key.create", "a", "f9", "t9", Some(t0))
                .await
                .expect("k2"),
            Claim::New,
            "{b}"
        );
        let answer = StoredAnswer {
            status: 201,
            location: Some("/v1/keys/x".into()),
            body: b"{\"id\":\"x\"}".to_vec(),
        };
        // Only the claim's own token finishes it.
        let finish = |key: &'static str, token: &'static str, answer: &StoredAnswer| {
            let (meta, answer) = (&meta, answer.clone());
            async move {
                meta.idempotency_finish("k1|key.create", key, token, &answer)
                    .await
                    .expect("finish")
            }
        };
        assert!(!finish("a", "t2", &answer).await, "{b}: another token");
        assert_eq!(
            claim("a", "f1", "t3", t0 + 2).await,
            Claim::InProgress,
            "{b}"
        );
        assert!(finish("a", "t1", &answer).await, "{b}");
        assert!(
            !finish("a", "t1", &answer).await,
            "{b}: an answer is written once"
        );
        assert_eq!(
            claim("a", "f1", "t3", t0 + 2).await,
            Claim::Done(answer.clone()),
            "{b}"
        );
        assert_eq!(claim("a", "f2", "t3", t0 + 2).await, Claim::Reused, "{b}");
        // A failed request gives its claim up; one that never finished is taken over late.
        let release = |key: &'static str, token: &'static str| {
            let meta = &meta;
            async move {
                meta.idempotency_release("k1|key.create", key, token)
                    .await
                    .expect("release")
            }
        };
        assert_eq!(claim("b", "f1", "t4", t0).await, Claim::New, "{b}");
        assert!(!release("b", "t5").await, "{b}: another token");
        assert!(release("b", "t4").await, "{b}");
        assert_eq!(claim("b", "f1", "t6", t0 + 3).await, Claim::New, "{b}");
        assert_eq!(
            claim("b", "f2", "t7", t0 + 3 + ABANDONED_AFTER_MS + 1).await,
            Claim::New,
            "{b}: an abandoned claim is taken over"
        );
        // The request that outlived its claim can neither answer for the new one nor drop it.
        assert!(!finish("b", "t6", &answer).await, "{b}");
        assert!(!release("b", "t6").await, "{b}");
        assert_eq!(
            claim("b", "f2", "t8", t0 + 4 + ABANDONED_AFTER_MS).await,
            Claim::InProgress,
            "{b}"
        );
        // Releasing never drops a finished answer; a day later the key is free again.
        assert!(!release("a", "t1").await, "{b}");
        assert_eq!(
            claim("a", "f1", "t9", t0 + 4).await,
            Claim::Done(answer),
            "{b}"
        );
        assert_eq!(
            claim("a", "f2", "t9", t0 + KEEP_MS + 1).await,
            Claim::New,
            "{b}"
        );
        // Dated by the store's own clock (the database's, on PostgreSQL).
        for expected in [Claim::New, Claim::InProgress] {
            let got = meta
                .idempotency_claim("k3|key.create", "c", "f1", "tc", None)
                .await
                .expect("claim");
            assert_eq!(got, expected, "{b}");
        }
    }
}

#[tokio::test]
async fn monitor_buckets_merge_over_processes_and_references_replace_on_every_backend() {
    for (meta, _db, dir) in backends("monitor").await {
        let b = meta.describe();
        version(&meta, new("m")).await;
        let bucket = |at: i64, counts: &str| StoredBucket {
            model: "digits".into(),
            span_ms: 60_000,
            at,
            counts: counts.into(),
        };
        let key = ModelKey {
            function: "m",
            version: 1,
            model: "digits",
        };
        meta.publish_monitor_buckets("m", 1, "p1", &[bucket(10, "a"), bucket(11, "b")])
            .await
            .expect("publish");
        meta.publish_monitor_buckets("m", 1, "p2", &[bucket(11, "c")])
            .await
            .expect("publish");
        // A later publication of the same bucket replaces it.
        meta.publish_monitor_buckets("m", 1, "p1", &[bucket(11, "b2")])
            .await
            .expect("republish");
        let mut seen = meta
            .monitor_buckets(key, 60_000, 11, "p2")
            .await
            .expect("read");
        seen.sort();
        assert_eq!(seen, ["b2"], "{b}");
        let mut seen = meta
            .monitor_buckets(key, 60_000, 0, "p3")
            .await
            .expect("read");
        seen.sort();
        assert_eq!(seen, ["a", "b2", "c"], "{b}");
        assert!(
            meta.monitor_buckets(key, 3_600_000, 0, "p3")
                .await
                .expect("read")
                .is_empty(),
            "{b}"
        );

        assert_eq!(
            meta.monitor_reference(key).await.expect("read"),
            None,
            "{b}"
        );
        let reference = |counts: &str| StoredReference {
            counts: counts.into(),
            window_ms: 3_600_000,
            set_ms: 5,
            set_by: "k".into(),
        };
        meta.set_monitor_reference(key, &reference("r1"))
            .await
            .expect("set");
        meta.set_monitor_reference(key, &reference("r2"))
            .await
            .expect("set");
        assert_eq!(
            meta.monitor_reference(key).await.expect("read"),
            Some(reference("r2")),
            "{b}"
        );

        // The first bins stored for a model are everyone's; a later version finds them.
        assert_eq!(
            meta.agree_monitor_profile(key, "b1").await.expect("agree"),
            "b1",
            "{b}"
        );
        assert_eq!(
            meta.agree_monitor_profile(key, "b2").await.expect("agree"),
            "b1",
            "{b}"
        );
        assert_eq!(
            meta.monitor_profile(key).await.expect("read").as_deref(),
            Some("b1")
        );
        let later = ModelKey { version: 3, ..key };
        assert_eq!(
            meta.monitor_profile(later).await.expect("read"),
            None,
            "{b}"
        );
        assert_eq!(
            meta.earlier_monitor_profile(later)
                .await
                .expect("read")
                .as_deref(),
            Some("b1"),
            "{b}"
        );
        assert_eq!(
            meta.earlier_monitor_profile(key).await.expect("read"),
            None,
            "{b}"
        );

        // Old buckets are forgotten; a deleted function takes the rest with it.
        assert_eq!(
            meta.forget_monitor_buckets(0).await.expect("forget"),
            0,
            "{b}"
        );
        assert_eq!(
            meta.forget_monitor_buckets(crate::unix_ms() + 1)
                .await
                .expect("forget"),
            3,
            "{b}"
        );
        meta.publish_monitor_buckets("m", 1, "p1", &[bucket(12, "d")])
            .await
            .expect("publish");
        assert!(meta.delete_function("m").await.expect("delete"), "{b}");
        assert!(
            meta.monitor_buckets(key, 60_000, 0, "x")
                .await
                .expect("read")
                .is_empty()
        );
        assert_eq!(
            meta.monitor_reference(key).await.expect("read"),
            None,
            "{b}"
        );
        assert_eq!(meta.monitor_profile(key).await.expect("read"), None, "{b}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
