//! `kiln nodes`: the live nodes of the cluster the server belongs to (one, on a single
//! node), as `GET /v1/cluster` reports them; `kiln store copy`: a single node's state into
//! a cluster's database and bucket.

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::store::{BlobsUrl, DatabaseUrl};

use super::commands::print_table;
use super::{Client, Output};

/// `kiln nodes`.
pub fn nodes(client: &Client, output: Output) -> anyhow::Result<()> {
    let mut v = client.get_json("/v1/cluster")?;
    let this = v["node"].as_str().unwrap_or_default().to_string();
    if let (Output::Table, Some(nodes)) = (output, v["nodes"].as_array_mut()) {
        let now = crate::unix_ms();
        for n in nodes {
            let ms = |key: &str| n[key].as_i64().unwrap_or(0);
            let ago = now.saturating_sub(ms("heartbeat_ms")).max(0) as u64;
            let up = now.saturating_sub(ms("started_at_ms")).max(0) as u64 / 1000;
            let loaded: Vec<String> = n["loaded"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            let marker = if n["id"].as_str() == Some(this.as_str()) {
                " *"
            } else {
                ""
            };
            n["id"] = format!("{}{marker}", n["id"].as_str().unwrap_or("?")).into();
            n["up"] = humantime::format_duration(std::time::Duration::from_secs(up))
                .to_string()
                .into();
            n["heartbeat"] = format!("{:.1}s ago", ago as f64 / 1000.0).into();
            n["loaded"] = match loaded.len() {
                0 => "-".to_string(),
                k if k <= 3 => loaded.join(","),
                k => format!("{},... ({k})", loaded[..3].join(",")),
            }
            .into();
        }
    }
    print_table(
        &v,
        output,
        "nodes",
        &[
            "id",
            "address",
            "version",
            "up",
            "heartbeat",
            "in_flight",
            "loaded",
        ],
    )
}

/// The arguments of `kiln store copy`.
pub struct CopyArgs {
    pub from: String,
    pub to: String,
    pub data_dir: Option<PathBuf>,
    pub blobs_from: Option<String>,
    pub blobs_to: Option<String>,
}

/// `kiln store copy`: a line per table (and the blobs), or with `--output json` one
/// document `{"blobs": {"copied", "present"}, "tables": [{"table", "copied", "present"}]}`.
pub fn store_copy(args: &CopyArgs, output: Output) -> anyhow::Result<()> {
    let people = output != Output::Json;
    if args
        .from
        .parse::<DatabaseUrl>()
        .map_err(anyhow::Error::msg)?
        != DatabaseUrl::Sqlite
    {
        bail!("--from: copies start from a single node's files: --from sqlite --data-dir DIR");
    }
    let DatabaseUrl::Postgres(to) = args.to.parse::<DatabaseUrl>().map_err(anyhow::Error::msg)?
    else {
        bail!("--to names the cluster's database: postgres://user[:password]@host[:port]/dbname");
    };
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_DATA_DIR));
    let blobs_to = args
        .blobs_to
        .as_deref()
        .map(|u| u.parse::<BlobsUrl>().map_err(anyhow::Error::msg))
        .transpose()
        .context("--blobs-to")?;
    let blobs_from = match args.blobs_from.as_deref() {
        None | Some("folder") => data_dir.join("blobs").join("sha256"),
        Some(dir) => {
            let dir = PathBuf::from(dir);
            match dir.join("sha256").is_dir() {
                true => dir.join("sha256"),
                false => dir,
            }
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut report = serde_json::json!({"blobs": null, "tables": []});
    rt.block_on(async {
        // Blobs first: a version copied is then never without its component.
        if let Some(to) = &blobs_to {
            let b = crate::store::copy::copy_blobs(&blobs_from, to).await?;
            if people {
                println!("blobs: {} copied, {} already there", b.new, b.present);
            }
            report["blobs"] = serde_json::json!({"copied": b.new, "present": b.present});
        } else {
            eprintln!(
                "no --blobs-to: blobs not copied (the cluster's nodes need them in its bucket)"
            );
        }
        let mut tables = Vec::new();
        crate::store::copy::copy_database(&data_dir, &to, |c| {
            if people {
                println!("{}: {} copied, {} already there", c.table, c.new, c.present);
            }
            tables
                .push(serde_json::json!({"table": c.table, "copied": c.new, "present": c.present}));
        })
        .await?;
        report["tables"] = tables.into();
        anyhow::Ok(())
    })?;
    output.show(&report, || Ok(()))
}
