//! `kiln dev [DIR]`: the inner loop. Starts a server of its own (loopback only, data in
//! `DIR/.kiln-dev` with an admin key kept there, stopped with `kiln dev`) unless `--server`
//! names one; builds and deploys the function, prints its URL, streams what its guests
//! print, and builds and deploys again whenever a source file changes. A failed build or
//! deploy is printed and the loop waits for the next change.

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
            let (child, url, key) = start_server(&manifest.dir, &a.listen)?;
            (url, Some(key), Some(child))
        }
    };
    let connect = Connect {
        ca_cert: None,
        allow_http: false,
        timeout: Some(Duration::from_secs(30)),
    };
    let client = Client::new(&base, key.as_deref(), &connect)?;
    println!("kiln dev: serving {name} at {base}/fn/{name}/ (ctrl-c to stop)");
    if local.is_some() {
        let key = key.as_deref().unwrap_or_default();
        println!("kiln dev: its API key (kept in .kiln-dev/admin.key): export KILN_API_KEY={key}");
    }
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
        let now = sources(&manifest.dir, &manifest.component_path());
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
/// decided on. What the build writes (`target/`, the lock file, the component wherever it
/// is), the dev server's data, hidden files and `node_modules` are not sources.
fn sources(dir: &Path, component: &Path) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    let component = component.canonicalize().ok();
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
            if file.starts_with('.')
                || matches!(&*file, "target" | "Cargo.lock" | "node_modules")
                || (component.is_some() && path.canonicalize().ok() == component)
            {
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
/// again while the function is not deployed yet, and when a stream ends (the server ends
/// one after an hour) follows on from then, so no line is printed twice.
fn follow_logs(client: Client, name: String) {
    std::thread::spawn(move || {
        let mut since = jiff::Timestamp::now().to_string();
        loop {
            let args = logs::LogsArgs {
                version: None,
                since: Some(&since),
                request_id: None,
                follow: true,
            };
            if logs::logs(&client, &name, &args, Output::Table).is_ok() {
                since = jiff::Timestamp::now().to_string();
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
}

/// Starts `kiln serve` on `listen` (loopback only) with its data in `dir/.kiln-dev` and the
/// admin key kept there; returns it, its URL once it serves, and the key.
fn start_server(dir: &Path, listen: &str) -> anyhow::Result<(LocalServer, String, String)> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen:?} is not an address"))?;
    if !addr.ip().is_loopback() {
        bail!("kiln dev serves without keys, so only on a loopback address, not {addr}");
    }
    let data = dir.join(".kiln-dev");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    // The server's database, secrets key and admin key: never committed by accident.
    std::fs::write(data.join(".gitignore"), "*\n")?;
    let key = admin_key(&data.join("admin.key"))?;
    let log = std::fs::File::create(data.join("server.log"))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["serve", "--listen", listen, "--data-dir"])
        .arg(&data);
    // Nothing of the shell's server settings: this one is local and on its own.
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("KILN_") && var != "KILN_LOG" {
            cmd.env_remove(var);
        }
    }
    cmd.env("KILN_ADMIN_KEY", &key)
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
    Ok((child, url, key))
}

/// The dev server's admin key: kept in `path` (mode 0600), made on first use.
fn admin_key(path: &Path) -> anyhow::Result<String> {
    if let Ok(key) = std::fs::read_to_string(path)
        && key.trim().len() >= 32
    {
        return Ok(key.trim().to_string());
    }
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("drawing a key: {e}"))?;
    let key = format!("kiln_dev_{}", hex::encode(bytes));
    crate::common::seal::write_private(path, key.as_bytes())?;
    Ok(key)
}

/// The child gets SIGTERM when this process dies, even by a signal that runs no `Drop`
/// (Linux; elsewhere only an orderly exit stops it).
#[cfg(target_os = "linux")]
fn stop_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe, touch only the calling (child)
    // process, and allocate nothing between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            // The parent died before the line above: nobody would stop this server.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("kiln dev exited"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn stop_with_parent(_: &mut Command) {}
