//! Test support: builds the `kiln` binary and the example components once, runs a real
//! server on `127.0.0.1:0` with its own data dir, and talks to it over HTTP.
//!
//! A server's log (guest output included) is printed when a test panics, so a failure
//! shows what the server saw.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use serde_json::{Value, json};

mod fixtures;
pub use fixtures::{digest, example, kiln_bin, onnxruntime_library, root, skip, temp_dir};
pub mod cluster;
pub mod onnx;
pub mod pg;
pub mod proxy;
pub mod s3;
mod usage;
pub mod webhook;
pub use usage::{Record, USAGE_COLUMNS, parse_csv, usage, usage_csv};

/// The admin key every [`TestServer`] is started with (`KILN_ADMIN_KEY`).
pub const ADMIN_KEY: &str = "kiln-test-admin-key-0123456789abcdef";
/// `authorization` header value of [`ADMIN_KEY`].
pub const ADMIN_BEARER: &str = "Bearer kiln-test-admin-key-0123456789abcdef";

/// The secrets key of the servers the suite puts on PostgreSQL (64 hex digits).
pub const SUITE_SECRETS_KEY: &str =
    "6b696c6e2d746573742d73756974652d736563726574732d6b65792d30303031";

/// How a [`TestServer`] is started.
#[derive(Debug, Clone)]
pub struct Launch {
    /// `KILN_ADMIN_KEY`; `None` starts without one.
    pub admin_key: Option<String>,
    /// Extra `kiln serve` arguments (`--listen` is `127.0.0.1:0` unless given here).
    pub args: Vec<String>,
    /// Extra environment variables (`TOKIO_WORKER_THREADS`, say).
    pub env: Vec<(String, String)>,
}

impl Default for Launch {
    fn default() -> Self {
        Launch {
            admin_key: Some(ADMIN_KEY.into()),
            args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// Starts `kiln serve`; returns the process, its URL and what it printed before serving
/// (the bootstrap admin key, when it made one), or the log when it exited before serving.
fn try_spawn(
    data_dir: &Path,
    config: Option<&Path>,
    log: &Path,
    launch: &Launch,
) -> Result<(Child, String, Vec<String>), String> {
    let mut cmd = Command::new(kiln_bin());
    cmd.arg("serve");
    if !launch.args.iter().any(|a| a == "--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    // The suite's shared-blobs run: this server's blobs in the bucket, under a prefix of
    // its own (unless the test chose its blob store itself).
    if !launch.args.iter().any(|a| a == "--blobs")
        && let Some(url) = s3::suite_blobs_url(data_dir)
    {
        cmd.args(["--blobs", &url]);
    }
    // ...and its metadata, keys and audit log in a PostgreSQL database of its own.
    // A node on a shared database keeps secrets only with a key it is given.
    cmd.env_remove("KILN_SECRETS_KEY");
    if !launch.args.iter().any(|a| a == "--database")
        && let Some(url) = pg::suite_database_url(data_dir)
    {
        cmd.args(["--database", &url]);
        cmd.env("KILN_SECRETS_KEY", SUITE_SECRETS_KEY);
    }
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY),
    ] {
        if std::env::var_os(k).is_none() {
            cmd.env(k, v);
        }
    }
    cmd.envs(launch.env.iter().map(|(k, v)| (k, v)));
    cmd.args(&launch.args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("KILN_LOG", "info")
        .env_remove("KILN_LISTEN")
        .env_remove("KILN_DATA_DIR")
        .env_remove("KILN_ADMIN_KEY")
        .env_remove("KILN_BLOBS_URL")
        .env_remove("KILN_DATABASE_URL")
        .env_remove("KILN_NODE_ID")
        .env_remove("KILN_TLS_CERT")
        .env_remove("KILN_TLS_KEY")
        // ONNX Runtime only where a test configures it, so backends are chosen on purpose.
        .env_remove("ORT_DYLIB_PATH")
        .stdout(Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        );
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    if let Some(k) = &launch.admin_key {
        cmd.env("KILN_ADMIN_KEY", k);
    }
    let mut child = cmd.spawn().expect("starting kiln serve");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = Vec::new();
    let url = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(url) = line.strip_prefix("kiln serving on ") {
                    break url.trim().to_string();
                }
                banner.push(line);
            }
            _ => {
                let _ = child.wait();
                return Err(std::fs::read_to_string(log).unwrap_or_default());
            }
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((child, url, banner))
}

fn spawn(data_dir: &Path, config: Option<&Path>, log: &Path, launch: &Launch) -> (Child, String) {
    match try_spawn(data_dir, config, log, launch) {
        Ok((child, url, _)) => (child, url),
        Err(log) => panic!("kiln serve exited before serving:\n{log}"),
    }
}

/// An HTTP client that returns every status as an answer (never as an error).
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .max_idle_connections_per_host(64)
        .build()
        .into()
}

/// GETs `url` with the admin key on a new thread (for requests that must be in flight
/// while the test goes on); the handle yields the status and the body.
pub fn spawn_get(url: String) -> std::thread::JoinHandle<(u16, String)> {
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let mut r = agent
            .get(url)
            .header("authorization", ADMIN_BEARER)
            .call()
            .expect("request failed at the transport level");
        (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        )
    })
}

/// A running `kiln serve` process.
pub struct TestServer {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub url: String,
    log: PathBuf,
    config: Option<PathBuf>,
    launch: Launch,
    agent: ureq::Agent,
    /// What the server printed before serving.
    pub banner: Vec<String>,
}

/// An HTTP answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `error.code` of a JSON error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl TestServer {
    /// Starts a server with a new data dir and default settings.
    pub fn start() -> TestServer {
        Self::start_in(temp_dir("data"), None)
    }

    /// Starts a server with extra TOML configuration.
    pub fn start_with_config(toml: &str) -> TestServer {
        let dir = temp_dir("data");
        let config = dir.join("kiln-config.toml");
        std::fs::write(&config, toml).unwrap();
        Self::start_in(dir, Some(config))
    }

    fn start_in(data_dir: PathBuf, config: Option<PathBuf>) -> TestServer {
        Self::launch(data_dir, config, Launch::default())
            .unwrap_or_else(|log| panic!("kiln serve exited before serving:\n{log}"))
    }

    /// Starts a server as `launch` says on `data_dir`; the server's log if it exits
    /// before serving.
    pub fn launch(
        data_dir: PathBuf,
        config: Option<PathBuf>,
        launch: Launch,
    ) -> Result<TestServer, String> {
        let log = data_dir.join("server.log");
        let (child, url, banner) = try_spawn(&data_dir, config.as_deref(), &log, &launch)?;
        Ok(TestServer {
            child: Some(child),
            data_dir,
            url,
            log,
            config,
            launch,
            agent: agent(),
            banner,
        })
    }

    /// Stops with SIGTERM (asserting a clean exit) and starts again on the same data dir.
    pub fn restart(&mut self) {
        let code = self.terminate();
        assert_eq!(code, Some(0), "server did not exit cleanly on SIGTERM");
        let (child, url, banner) = try_spawn(
            &self.data_dir,
            self.config.as_deref(),
            &self.log,
            &self.launch,
        )
        .unwrap_or_else(|log| panic!("kiln serve exited before serving:\n{log}"));
        self.child = Some(child);
        self.url = url;
        self.banner = banner;
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a request; `body` may be empty. It carries the admin key unless `headers`
    /// name an `authorization` of their own (an empty one: send none).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Answer {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url));
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        {
            req = req.header("authorization", ADMIN_BEARER);
        }
        for (k, v) in headers {
            if !(k.eq_ignore_ascii_case("authorization") && v.is_empty()) {
                req = req.header(*k, *v);
            }
        }
        let req = req.body(body.to_vec()).unwrap();
        let mut resp = self
            .agent
            .run(req)
            .expect("request failed at the transport level");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let mut body = Vec::new();
        resp.body_mut().as_reader().read_to_end(&mut body).unwrap();
        Answer {
            status,
            headers,
            body,
        }
    }

    pub fn get(&self, path: &str) -> Answer {
        self.request("GET", path, &[], b"")
    }

    /// Deploys a component file as a bare `application/wasm` upload.
    pub fn deploy_wasm(&self, name: &str, wasm: &[u8], query: &str) -> Answer {
        self.post_wasm(name, wasm, query, &[])
    }

    /// `POST /v1/functions/{name}/versions?{query}` with `wasm`, plus `headers`.
    fn post_wasm(&self, name: &str, wasm: &[u8], query: &str, headers: &[(&str, &str)]) -> Answer {
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        let mut all = vec![("content-type", "application/wasm")];
        all.extend_from_slice(headers);
        self.request(
            "POST",
            &format!("/v1/functions/{name}/versions{q}"),
            &all,
            wasm,
        )
    }

    /// Deploys an example, asserting success; returns the created version.
    pub fn deploy_example(&self, name: &str, example_name: &str, query: &str) -> Value {
        let wasm = std::fs::read(example(example_name)).unwrap();
        let a = self.deploy_wasm(name, &wasm, query);
        assert_eq!(a.status, 201, "deploy failed: {}", a.text());
        a.json()
    }

    /// Uploads `bytes` as a blob (201, or 200 if present); returns its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> String {
        let d = digest(bytes);
        let a = self.request("PUT", &format!("/v1/blobs/{d}"), &[], bytes);
        assert!(
            a.status == 201 || a.status == 200,
            "blob upload: {}",
            a.text()
        );
        d
    }

    /// Creates a version from a JSON manifest naming blobs.
    pub fn deploy_manifest(&self, name: &str, manifest: &Value) -> Answer {
        self.request(
            "POST",
            &format!("/v1/functions/{name}/versions"),
            &[("content-type", "application/json")],
            manifest.to_string().as_bytes(),
        )
    }

    /// Writes `kiln.toml` (`manifest`: its text after the `component = ` line, which names
    /// example `component`) into a new directory and deploys it with `kiln deploy`,
    /// asserting success.
    pub fn deploy_toml(&self, name: &str, component: &str, manifest: &str) {
        let dir = temp_dir("manifest");
        std::fs::write(
            dir.join("kiln.toml"),
            format!(
                "name = {name:?}\ncomponent = {:?}\n{manifest}",
                example(component).display().to_string()
            ),
        )
        .unwrap();
        let out = self.cli(&["deploy", dir.to_str().unwrap()]);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates an API key through the API (as admin); returns its secret and id.
    pub fn create_key(
        &self,
        tenant: &str,
        scopes: &[&str],
        rate: Option<&str>,
    ) -> (String, String) {
        let mut body = json!({"tenant": tenant, "scopes": scopes});
        if let Some(r) = rate {
            body["rate"] = r.into();
        }
        let a = self.request("POST", "/v1/keys", &[], body.to_string().as_bytes());
        assert_eq!(a.status, 201, "{}", a.text());
        let v = a.json();
        (
            v["key"].as_str().unwrap().to_string(),
            v["id"].as_str().unwrap().to_string(),
        )
    }

    /// A request with API key `key` (empty: none).
    pub fn call_as(&self, key: &str, method: &str, path: &str, body: &[u8]) -> Answer {
        let bearer = if key.is_empty() {
            String::new()
        } else {
            format!("Bearer {key}")
        };
        self.request(method, path, &[("authorization", &bearer)], body)
    }

    /// Deploys a bare example component with API key `key`.
    pub fn deploy_as(&self, key: &str, name: &str, example_name: &str, query: &str) -> Answer {
        let wasm = std::fs::read(example(example_name)).unwrap();
        let bearer = format!("Bearer {key}");
        self.post_wasm(name, &wasm, query, &[("authorization", &bearer)])
    }

    /// Runs the `kiln` CLI against this server with the admin key.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_as(ADMIN_KEY, args)
    }

    /// Runs the CLI as admin, asserting success; returns its standard output.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "kiln {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the `kiln` CLI against this server with API key `key` (empty: none).
    pub fn cli_as(&self, key: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(kiln_bin());
        cmd.args(args)
            .env("KILN_SERVER", &self.url)
            .env_remove("KILN_API_KEY")
            .env_remove("KILN_CA_CERT")
            .env_remove("KILN_TIMEOUT")
            .current_dir(root());
        if !key.is_empty() {
            cmd.env("KILN_API_KEY", key);
        }
        cmd.output().expect("running kiln")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- kiln server log ({}) -----\n{}",
                self.data_dir.display(),
                self.log()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.data_dir);
            pg::drop_suite_database(&self.data_dir);
        }
    }
}

/// Crash and recovery, for the tests of what survives a `kill -9`.
impl TestServer {
    /// Sends SIGKILL: the process dies at once, with no drain and no flush, as in a crash.
    /// Takes `&self`, so a test can kill the server while its clients are still sending.
    pub fn kill9(&self) {
        self.signal("KILL");
    }

    /// Sends signal `name` (`KILL`, `STOP`, `CONT`...) to the server process.
    pub fn signal(&self, name: &str) {
        // Never `kill -KILL 0`: that would be the whole process group, the test included.
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{name}"))
                .arg(child.id().to_string())
                .status();
        }
    }

    /// Kills the server with SIGKILL (unless [`kill9`](Self::kill9) already did), asserts it
    /// died of it, and starts it again on the same data dir, as a supervisor would.
    pub fn restart_after_kill9(&mut self) {
        use std::os::unix::process::ExitStatusExt;
        self.kill9();
        let mut child = self.child.take().expect("the server is running");
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "the server did not die of SIGKILL: {status}"
        );
        let (child, url) = spawn(
            &self.data_dir,
            self.config.as_deref(),
            &self.log,
            &self.launch,
        );
        self.child = Some(child);
        self.url = url;
    }
}

/// The value of the `/metrics` sample line starting with `prefix` (labels included).
pub fn metric_sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{text}"))
}

impl TestServer {
    /// Deploys `examples/digits` with its model on tract as function `name`, asserting
    /// success; the keys of `extra` (e.g. `"cache"`) join the manifest. Returns the version.
    pub fn deploy_digits(&self, name: &str, extra: Value) -> Value {
        let model = self
            .put_blob(&std::fs::read(root().join("examples/digits/model/digits.onnx")).unwrap());
        let component = self.put_blob(&std::fs::read(example("digits")).unwrap());
        let mut manifest = json!({
            "component": component,
            "models": {"digits": {"digest": model, "backend": "tract"}},
        });
        if let Value::Object(extra) = extra {
            for (k, v) in extra {
                manifest[k] = v;
            }
        }
        let a = self.deploy_manifest(name, &manifest);
        assert_eq!(a.status, 201, "deploy {name}: {}", a.text());
        a.json()
    }
}
