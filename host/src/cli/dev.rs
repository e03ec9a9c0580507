//! `kiln dev [DIR]`: the inner loop. Uses the server `KILN_SERVER` names, or starts one of
//! its own (loopback, no keys, data in `DIR/.kiln-dev`, stopped with `kiln dev`); builds and
//! deploys the function, prints its URL, streams what its guests print, and builds and
//! deploys again whenever a source file changes. A failed build or deploy is printed and
//! the loop waits for the next change.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};

use super::client::{Client, Connect};
use super::{Output, commands, logs};
use crate::manifest::Manifest;

/// How often the sources are looked at.
const POLL: Duration = Duration::from_millis(400);

/// What `kiln dev` was asked.
pub struct DevArgs {
    pub dir: PathBuf,
    /// The server to use; `None`: start one.
    pub server: Option<String>,
    pub api_key: Option<String>,
    /// Where a server of its own listens.
    pub listen: String,
}

/// A server `kiln dev` started: stopped when `kiln dev` ends, however it ends.
struct LocalServer(Child);

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the loop until interrupted (or until its own server dies).
pub fn dev(a: DevArgs) -> anyhow::Result<()> {
    let manifest = Manifest::load(&a.dir)?;
    let name = manifest.name.clone();
    let (base, key, mut local) = match a.server {
        Some(url) => (url, a.api_key, None),
        None => {
            let (child, url) = start_server(&manifest.dir, &a.listen)?;
            (url, None, Some(child))
        }
    };
    let connect = Connect {
        ca_cert: None,
        allow_http: false,
        timeout: Some(Duration::from_secs(30)),
    };
    let client = Client::new(&base, key.as_deref(), &connect)?;
    println!("kiln dev: serving {name} at {base}/fn/{name}/ (ctrl-c to stop)");
    follow_logs(Client::new(&base, key.as_deref(), &connect)?, name.clone());
    let mut seen = None;
    loop {
        if let Some(LocalServer(child)) = &mut local
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "the server kiln dev started exited ({status}); its log is in {}",
                manifest.dir.join(".kiln-dev/server.log").display()
            );
        }
        let now = sources(&manifest.dir);
        if seen.as_ref() != Some(&now) {
            seen = Some(now);
            match commands::build(&manifest.dir, false, Output::Table).and_then(|()| {
                commands::deploy(
                    &client,
                    &manifest.dir,
                    commands::DeployArgs {
                        name: None,
                        sign: None,
                        dry_run: false,
                    },
                    Output::Table,
                )
            }) {
                Ok(()) => println!(
                    "kiln dev: deployed {name}; watching {} for changes",
                    manifest.dir.display()
                ),
                // On stdout with the rest of the loop's story (the build's own output
                // is on stderr).
                Err(e) => println!("kiln dev: {e:#}\nkiln dev: waiting for a change"),
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Every source file under `dir` with its size and time of change: what a rebuild is
/// decided on. Build output, the dev server's data, version control and the lock file
/// (which the build itself writes) are not sources.
fn sources(dir: &Path) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let file = e.file_name();
            let file = file.to_string_lossy();
            if file.starts_with('.') || file == "target" || file == "Cargo.lock" {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else {
                out.insert(path, (meta.len(), meta.modified().ok()));
            }
        }
    }
    out
}

/// Streams the function's new log lines from now on, in the background; waits and tries
/// again while the function is not deployed yet, or the stream ends.
fn follow_logs(client: Client, name: String) {
    let since = jiff::Timestamp::now().to_string();
    std::thread::spawn(move || {
        loop {
            let args = logs::LogsArgs {
                version: None,
                since: Some(&since),
                request_id: None,
                follow: true,
            };
            let _ = logs::logs(&client, &name, &args, Output::Table);
            std::thread::sleep(Duration::from_secs(1));
        }
    });
}

/// Starts `kiln serve` on `listen` with its data in `dir/.kiln-dev`, open without keys
/// (loopback only); returns it and its URL once it serves.
fn start_server(dir: &Path, listen: &str) -> anyhow::Result<(LocalServer, String)> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen:?} is not an address"))?;
    if !addr.ip().is_loopback() {
        bail!("kiln dev serves without keys, so only on a loopback address, not {addr}");
    }
    let data = dir.join(".kiln-dev");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let log = std::fs::File::create(data.join("server.log"))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["serve", "--insecure", "--listen", listen, "--data-dir"])
        .arg(&data)
        .env_remove("KILN_ADMIN_KEY")
        .env_remove("KILN_DATABASE_URL")
        .env_remove("KILN_BLOBS_URL")
        .env_remove("KILN_DATA_DIR")
        .env_remove("KILN_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    stop_with_parent(&mut cmd);
    let mut child = LocalServer(cmd.spawn().context("starting kiln serve")?);
    let stdout = child.0.stdout.take().context("the server's output")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let url = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(url) = line.strip_prefix("kiln serving on ") {
                    break url.trim().to_string();
                }
            }
            _ => bail!(
                "the server did not start; its log is in {}",
                data.join("server.log").display()
            ),
        }
    };
    // Keep reading so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((child, url))
}

/// The child gets SIGTERM when this process dies, even by a signal that runs no `Drop`.
fn stop_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe, touches only the calling (child) process, and
    // allocates nothing between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}
