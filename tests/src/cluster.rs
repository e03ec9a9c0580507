//! Clusters for the tests: `n` real `kiln serve` nodes on one fresh PostgreSQL database and
//! one moto bucket, dropped (nodes first, then the database) with the [`Cluster`].

use crate::pg::SharedDb;
use crate::s3::Moto;
use crate::{Launch, TestServer, temp_dir};

/// Nodes sharing a database and a bucket.
pub struct Cluster {
    /// The nodes, `node-1`... when started with ids.
    pub nodes: Vec<TestServer>,
    pub db: SharedDb,
    pub moto: Moto,
}

impl Cluster {
    /// `n` nodes for `test` (named `node-1`... with `ids`); `None`, the test skipped,
    /// without PostgreSQL or moto.
    pub fn start(test: &str, n: usize, ids: bool) -> Option<Cluster> {
        let db = crate::pg::shared_database(test)?;
        let moto = Moto::start(test)?;
        moto.create_bucket("kiln");
        let blobs = moto.blobs_url("kiln", "cluster");
        let nodes = (1..=n)
            .map(|i| node(&db.url, &blobs, ids.then(|| format!("node-{i}")).as_deref()))
            .collect();
        Some(Cluster { nodes, db, moto })
    }
}

/// A node on database `db` and bucket `blobs`, with node id `id` if given.
pub fn node(db: &str, blobs: &str, id: Option<&str>) -> TestServer {
    let mut args = vec![
        "--database".to_string(),
        db.to_string(),
        "--blobs".to_string(),
        blobs.to_string(),
    ];
    if let Some(id) = id {
        args.extend(["--node-id".to_string(), id.to_string()]);
    }
    TestServer::launch(
        temp_dir("cluster-node"),
        None,
        Launch {
            args,
            // Every node of a cluster shares one secrets key.
            env: vec![(
                "KILN_SECRETS_KEY".to_string(),
                crate::SUITE_SECRETS_KEY.to_string(),
            )],
            ..Launch::default()
        },
    )
    .unwrap_or_else(|log| panic!("kiln serve exited before serving:\n{log}"))
}
