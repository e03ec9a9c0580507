//! `kiln serve`: load the configuration, open the data dir, listen, print the URL, and shut
//! down gracefully on SIGTERM or ctrl-c.

use std::path::PathBuf;

use anyhow::Context;

use crate::app::App;
use crate::config::{ConfigFile, Overrides, ServerConfig};

pub fn run(
    flags: Overrides,
    config: Option<PathBuf>,
    insecure: bool,
    access_log: bool,
) -> anyhow::Result<()> {
    let file = match &config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let mut config = ServerConfig::resolve(file, flags)?;
    config.auth.admin_key = std::env::var("KILN_ADMIN_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    config.auth.insecure = insecure;
    config.server.access_log |= access_log;
    raise_open_files_limit(config.server.max_connections);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln-worker")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        // Read before binding: a wrong file stops the start with the file named.
        let certs = match &config.tls {
            Some(files) => Some(crate::server::tls::Certificates::load(files.clone())?),
            None => None,
        };
        // SIGHUP reloads the certificate; without TLS it is logged, never fatal (its
        // default action would end the process without draining or flushing usage).
        crate::server::tls::on_sighup(certs.clone())?;
        let tls = certs.map(|c| c.server_config()).transpose()?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        // The address bound (port 0 names one), as the node reports itself.
        config.listen = addr;
        let (app, admin_key) = App::open(config).await?;
        if let Some(key) = admin_key {
            println!("kiln admin key (shown once; keep it, then `export KILN_API_KEY=...`):\n{key}");
        }
        tracing::info!(node = %app.node_id, data_dir = %app.config.data_dir.display(), blobs = %app.blobs.describe(), functions = app.registry.functions().len(), auth = !app.auth.is_open(), "kiln ready");
        if tls.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "serving plain HTTP beyond loopback: API keys are bearer tokens and travel in clear text, so anyone on the path can read and reuse them; serve with --tls-cert and --tls-key (or put a TLS proxy in front)"
            );
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        println!("kiln serving on {scheme}://{addr}");
        let stopping = app.clone();
        let signal = async move {
            shutdown_signal().await;
            // Another node drives this node's rollouts from its next heartbeat, while
            // this one drains its requests.
            stopping.release_leases().await;
            // Followed logs end, or their streams would hold the drain open.
            stopping.logs.close();
        };
        let served = crate::server::serve(app.clone(), listener, tls, signal).await;
        // What the monitors saw since their last publication outlives the process.
        app.publish_monitors().await;
        // Every drained request has submitted its usage record: commit them all.
        let closing = app.clone();
        tokio::task::spawn_blocking(move || closing.close())
            .await
            .context("flushing the usage ledger")?;
        tracing::info!("usage ledger flushed");
        served
    })
}

/// Raises this process's soft limit of open files to its hard limit (as servers that hold
/// many connections do), and warns when even that is below what `max_connections` needs:
/// connections past it would fail at accept instead of getting a clear 503.
fn raise_open_files_limit(max_connections: usize) {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed.
        #[allow(unsafe_code)]
        let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
        if !got {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            #[allow(unsafe_code)]
            let ok = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0;
            if ok {
                lim = raised;
            }
        }
        // Files, the database pool and the listener need some descriptors besides.
        let needed = max_connections as u64 + 256;
        if lim.rlim_cur < needed {
            tracing::warn!(
                open_files = lim.rlim_cur,
                needed,
                "the open-files limit is below [server] max_connections plus headroom: lower max_connections or raise the limit"
            );
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
