//! A real S3-compatible server for the tests: `moto_server` (PyPI `moto[server]`) on a
//! loopback port, with buckets made over its HTTP API.
//!
//! Two uses: the whole suite runs with its blobs in a bucket when `KILN_TEST_BLOBS` names
//! one (`scripts/test` starts a moto for that run), and the cluster-storage tests start
//! moto servers of their own, which they may stop and start again to cut the bucket off.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Credentials the servers under test present to moto (moto accepts any).
pub const ACCESS_KEY: &str = "kiln-test";
pub const SECRET_KEY: &str = "kiln-test-secret";

/// What the test helpers send as `authorization`: moto checks no signature but keeps
/// objects private to the access key that wrote them, so the helpers name the servers' key.
const AUTHORIZATION: &str = "AWS4-HMAC-SHA256 Credential=kiln-test/20261202/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";

/// A `moto_server` process on `127.0.0.1:<port>`.
pub struct Moto {
    child: Option<Child>,
    pub port: u16,
}

impl Moto {
    /// Starts moto on a free loopback port; `None` (after recording a skip) when
    /// `moto_server` is not installed — under `CI=true` that is a failure instead.
    pub fn start(test: &str) -> Option<Moto> {
        if Command::new("moto_server")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but moto_server is missing: pip install 'moto[server]'"
            );
            crate::skip(
                test,
                "moto_server not installed (pip install 'moto[server]')",
            );
            return None;
        }
        // A port found free may be taken by another test's server before moto binds it
        // (moto then exits and the other server answers): try another port.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free port");
            let mut moto = Moto { child: None, port };
            if moto.run() {
                return Some(moto);
            }
        }
        panic!("moto_server did not start on any of five free ports");
    }

    /// Starts moto on `self.port` and waits until it answers as moto (its bucket list),
    /// not some other server that holds the port; false when moto exited instead.
    fn run(&mut self) -> bool {
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
            let answer = crate::agent()
                .get(format!("{}/", self.endpoint()))
                .header("authorization", AUTHORIZATION)
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok());
            if answer.is_some_and(|body| body.contains("ListAllMyBucketsResult")) {
                // Another test's moto may hold the port and have answered: ours, failing
                // to bind, exits within moments.
                std::thread::sleep(Duration::from_millis(300));
                if child.try_wait().ok().flatten().is_some() {
                    return false;
                }
                self.child = Some(child);
                return true;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("moto_server did not start on port {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates bucket `name`.
    pub fn create_bucket(&self, name: &str) {
        let r = crate::agent()
            .put(format!("{}/{name}", self.endpoint()))
            .header("authorization", AUTHORIZATION)
            .send(&[][..])
            .expect("creating a bucket");
        assert!(
            r.status().is_success(),
            "creating bucket {name}: {}",
            r.status()
        );
    }

    /// The `--blobs` URL of `prefix` in `bucket`.
    pub fn blobs_url(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint={}&region=us-east-1",
            self.endpoint()
        )
    }

    /// The object at `key` of `bucket`, or `None`.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let mut r = crate::agent()
            .get(format!("{}/{bucket}/{key}", self.endpoint()))
            .header("authorization", AUTHORIZATION)
            .call()
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.body_mut().with_config().limit(1 << 30).read_to_vec().ok()
    }

    /// Writes `bytes` at `key` of `bucket` (to corrupt what Kiln stored, on purpose).
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let r = crate::agent()
            .put(format!("{}/{bucket}/{key}", self.endpoint()))
            .header("authorization", AUTHORIZATION)
            .header("content-type", "application/octet-stream")
            .send(bytes)
            .expect("putting an object");
        assert!(r.status().is_success(), "put {key}: {}", r.status());
    }

    /// Keys under `prefix` in `bucket` (from a ListObjectsV2 answer).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut r = crate::agent()
            .get(format!(
                "{}/{bucket}?list-type=2&prefix={prefix}",
                self.endpoint()
            ))
            .header("authorization", AUTHORIZATION)
            .call()
            .expect("listing a bucket");
        let xml = r.body_mut().read_to_string().unwrap_or_default();
        xml.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }

    /// Stops moto (the bucket is unreachable until [`restart`](Self::restart); moto keeps
    /// its objects in memory, so they are gone after it).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts moto again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.run() {
            assert!(
                Instant::now() < deadline,
                "moto_server could not bind port {} again",
                self.port
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `KILN_TEST_BLOBS` with a prefix of its own for one server's data dir: every server of
/// the suite then keeps its blobs apart in the one bucket, and finds them again on restart.
pub fn suite_blobs_url(data_dir: &std::path::Path) -> Option<String> {
    let base = std::env::var("KILN_TEST_BLOBS")
        .ok()
        .filter(|b| !b.is_empty())?;
    let prefix = data_dir.file_name()?.to_string_lossy().into_owned();
    let (location, query) = base.split_once('?').unwrap_or((&base, ""));
    let location = location.trim_end_matches('/');
    Some(format!("{location}/{prefix}?{query}"))
}
