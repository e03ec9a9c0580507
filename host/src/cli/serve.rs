//! `kiln serve`: load the configuration, open the data dir, listen, print the URL, and shut
//! down gracefully on SIGTERM or ctrl-c.

use std::path::PathBuf;

use anyhow::Context;

use crate::app::App;
use crate::config::{ConfigFile, Overrides, ServerConfig};

pub fn run(flags: Overrides, config: Option<PathBuf>, insecure: bool) -> anyhow::Result<()> {
    let file = match &config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let mut config = ServerConfig::resolve(file, flags)?;
    config.auth.admin_key = std::env::var("KILN_ADMIN_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    config.auth.insecure = insecure;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln-worker")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
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
        println!("kiln serving on http://{addr}");
        let served = crate::server::serve(app.clone(), listener, shutdown_signal()).await;
        // Another node drives this node's rollouts from its next heartbeat.
        app.release_leases().await;
        // Every drained request has submitted its usage record: commit them all.
        let closing = app.clone();
        tokio::task::spawn_blocking(move || closing.close())
            .await
            .context("flushing the usage ledger")?;
        tracing::info!("usage ledger flushed");
        served
    })
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
