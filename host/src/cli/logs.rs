//! `kiln logs NAME [--version V] [--since 10m] [--request-id ID] [--follow]`: what the
//! function's guests printed, one line each (time, request id, version, stream, text), or
//! JSON with `--output json` (with `--follow`, one JSON object per line as they come).

use std::io::BufRead;

use anyhow::{Context, bail};
use serde_json::Value;

use super::Output;
use super::accounts::percent_encode;
use super::client::{Client, json_or_error};

/// Which lines `kiln logs` asks for.
pub struct LogsArgs<'a> {
    pub version: Option<u32>,
    pub since: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub follow: bool,
}

pub fn logs(client: &Client, name: &str, a: &LogsArgs<'_>, output: Output) -> anyhow::Result<()> {
    let mut path = format!("/v1/functions/{}/logs?", percent_encode(name));
    if let Some(v) = a.version {
        path.push_str(&format!("version={v}&"));
    }
    if let Some(s) = a.since {
        path.push_str(&format!("since={}&", percent_encode(s)));
    }
    if let Some(r) = a.request_id {
        path.push_str(&format!("request_id={}&", percent_encode(r)));
    }
    if !a.follow {
        let answer = client.get_json(path.trim_end_matches(['&', '?']))?;
        return output.show(&answer, || {
            for l in answer["lines"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                print_line(l);
            }
            Ok(())
        });
    }
    path.push_str("follow=true");
    // Lines may be far apart: the stream's keep-alive comments come every 15 s, and no
    // read of it times out.
    let mut req = client
        .agent()
        .get(format!("{}{path}", client.base()))
        .config()
        .timeout_per_read(None)
        .build();
    if let Some(b) = client.bearer() {
        req = req.header("authorization", b);
    }
    let resp = req
        .call()
        .with_context(|| format!("connecting to {}", client.base()))?;
    if !resp.status().is_success() {
        json_or_error(resp)?;
        bail!("the server refused the request");
    }
    let reader = std::io::BufReader::new(resp.into_body().into_reader());
    let mut event = String::new();
    for line in reader.lines() {
        let line = line.context("reading the log stream")?;
        if line.is_empty() {
            event.clear();
        } else if let Some(kind) = line.strip_prefix("event: ") {
            event = kind.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(data).context("a log event")?;
            match (event.as_str(), output) {
                ("line", Output::Json) => println!("{v}"),
                ("line", _) => print_line(&v),
                ("missed", _) => {
                    eprintln!("({} lines missed: this reader fell behind)", v["lines"])
                }
                _ => {}
            }
        }
    }
    eprintln!(
        "(the server ended the stream: the function was deleted, the server stopped, or an hour passed)"
    );
    Ok(())
}

fn print_line(l: &Value) {
    let at = jiff::Timestamp::from_millisecond(l["at_ms"].as_i64().unwrap_or(0))
        .map(|t| t.to_string())
        .unwrap_or_default();
    println!(
        "{at} {} v{} {}: {}",
        l["request_id"].as_str().unwrap_or_default(),
        l["version"],
        l["stream"].as_str().unwrap_or_default(),
        printable(l["text"].as_str().unwrap_or_default())
    );
}

/// A guest's text with its control characters (but tabs) escaped: a line must not move
/// the cursor, retitle or clear the reader's terminal.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| match c {
            '\t' => vec![c],
            c if c.is_control() => c.escape_default().collect(),
            c => vec![c],
        })
        .collect()
}
