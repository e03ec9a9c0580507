//! `kiln nodes`: the live nodes of the cluster the server belongs to (one, on a single
//! node), as `GET /v1/cluster` reports them.

use serde_json::Value;

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
