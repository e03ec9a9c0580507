//! The metadata store's rules, checked on both backends (PostgreSQL when one answers).

use super::*;
use crate::store::pg::scratch::{self, ScratchDb};

/// The store on each backend: SQLite in a temp dir, and PostgreSQL in a database of
/// its own when one answers.
async fn backends(test: &str) -> Vec<(MetaStore, Option<ScratchDb>, std::path::PathBuf)> {
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

fn new(function: &str) -> NewVersion {
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
        };
        let p1 = r#"{"weights":{"1":100}}"#;
        let p2 = r#"{"weights":{"1":50,"2":50}}"#;
        assert_eq!(
            meta.set_traffic("f", None, &change(p1, "traffic"))
                .await
                .expect("1"),
            1
        );
        assert_eq!(
            meta.set_traffic("f", None, &change(p2, "traffic"))
                .await
                .expect("2"),
            2
        );
        assert_eq!(
            meta.set_traffic("f", Some("staging"), &change(p1, "traffic"))
                .await
                .expect("a"),
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
        let history = meta.history("f", 10, None).await.expect("history");
        assert_eq!(history.len(), 3, "{b}");
        assert_eq!(history[0]["detail"]["alias"], "staging", "{b}");
        assert_eq!(history[1]["detail"]["revision"], 2, "{b}");
        assert_eq!(history[2]["actor"], "key1", "{b}");
        assert_eq!(
            meta.history("f", 10, Some("t")).await.expect("t").len(),
            3,
            "{b}"
        );
        assert!(
            meta.history("f", 10, Some("u"))
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
