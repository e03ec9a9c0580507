//! `kiln drift` and `kiln quality`: what a version's monitored models saw against their
//! references, and how its predictions fared against posted feedback.

use anyhow::Context;
use serde_json::Value;

use super::Output;
use super::client::Client;

/// Features a table shows per model (the highest scores); `--output json` has all.
const TOP_FEATURES: usize = 10;

/// `kiln drift NAME [--version V] [--window W] [--set-reference R]`: the version's drift
/// report (default: the function's latest version, the last 15 minutes); with
/// `--set-reference`, what the version saw over the last R becomes its reference first.
pub fn drift(
    client: &Client,
    name: &str,
    version: Option<u32>,
    window: Option<&str>,
    set_reference: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    let version = match (version, set_reference) {
        (Some(v), _) => Some(v),
        (None, None) => None,
        (None, Some(_)) => Some(latest_version(client, name)?),
    };
    if let (Some(v), Some(r)) = (version, set_reference) {
        let made = client.post_json(
            &format!("/v1/functions/{name}/versions/{v}/reference"),
            &serde_json::json!({ "window": r }),
        )?;
        if output == Output::Table {
            for m in made["models"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                eprintln!(
                    "model {}: reference set from the last {} ({} rows, {} predictions)",
                    m["model"].as_str().unwrap_or_default(),
                    made["window"].as_str().unwrap_or_default(),
                    m["rows"],
                    m["predictions"]
                );
            }
        }
    }
    let (_, report) = version_report(client, name, version, "drift", window)?;
    output.show(&report, || {
        print_report(&report);
        Ok(())
    })
}

fn print_report(r: &Value) {
    println!(
        "{} version {}, last {}: {} rows summarised (drift needs {} per model){}",
        r["function"].as_str().unwrap_or_default(),
        r["version"],
        r["window"].as_str().unwrap_or_default(),
        r["samples"],
        r["min_samples"],
        if r["drifted"] == true {
            " - DRIFTED"
        } else {
            ""
        }
    );
    if r["partial"] == true {
        println!("(some nodes' summaries could not be read: this is part of the traffic)");
    }
    for m in r["models"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let model = m["model"].as_str().unwrap_or_default();
        if let Some(state) = m["state"].as_str() {
            println!(
                "\nmodel {model}: {state} {}",
                m["error"].as_str().unwrap_or("")
            );
            continue;
        }
        let reference = match m["reference"]["source"].as_str() {
            Some("window") => format!(
                "reference: the last {} as of {}, {} rows",
                m["reference"]["window"].as_str().unwrap_or_default(),
                jiff::Timestamp::from_millisecond(m["reference"]["set_ms"].as_i64().unwrap_or(0))
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
                m["reference_rows"]
            ),
            Some("first_rows") => format!("reference: its first {} rows", m["reference_rows"]),
            _ => format!("reference file: {} rows", m["reference_rows"]),
        };
        println!(
            "\nmodel {model}: {} rows ({reference}), largest feature score {:.3}{}",
            m["samples"],
            m["max_score"].as_f64().unwrap_or(0.0),
            if m["drifted"] == true {
                ", drifted"
            } else {
                ""
            }
        );
        if let Some(p) = m["predictions"].as_object() {
            println!(
                "  predictions ({}): L-inf {:.3} over {} rows{}",
                p["output"].as_str().unwrap_or_default(),
                p["score"].as_f64().unwrap_or(0.0),
                p["samples"],
                if p["drifted"] == true {
                    ", drifted"
                } else {
                    ""
                }
            );
        }
        let mut features: Vec<&Value> = m["inputs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .flat_map(|i| {
                i["features"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
            })
            .collect();
        features.sort_by(|a, b| {
            let s = |v: &Value| v["score"].as_f64().unwrap_or(0.0);
            s(b).total_cmp(&s(a))
        });
        println!(
            "  {:<16} {:>6} {:>6} {:>9} {:>6}  DRIFTED",
            "INPUT", "INDEX", "NAME", "PSI", "JS"
        );
        for f in features.iter().take(TOP_FEATURES) {
            println!(
                "  {:<16} {:>6} {:>6} {:>9.3} {:>6.3}  {}",
                f["input"].as_str().unwrap_or_default(),
                f["index"].as_u64().unwrap_or_default(),
                f["name"].as_str().unwrap_or("-"),
                f["score"].as_f64().unwrap_or(0.0),
                f["js"].as_f64().unwrap_or(0.0),
                if f["drifted"] == true { "yes" } else { "no" }
            );
        }
    }
}

/// `kiln quality NAME [--version V] [--window W]`: the version's predictions and their
/// accuracy against posted feedback (default: the latest version, the last 24 hours).
pub fn quality(
    client: &Client,
    name: &str,
    version: Option<u32>,
    window: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    let (version, q) = version_report(client, name, version, "quality", window)?;
    output.show(&q, || {
        let share = |v: &Value| {
            v.as_f64()
                .map_or("-".to_string(), |a| format!("{:.2}%", a * 100.0))
        };
        let number = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.4}"));
        println!(
            "{name} version {version}, last {}: {} predictions, {} labelled, accuracy {} ({} right), {} valued, mae {}, rmse {}",
            q["window"].as_str().unwrap_or_default(),
            q["predictions"],
            q["labelled"],
            share(&q["accuracy"]),
            q["correct"],
            q["valued"],
            number(&q["mae"]),
            number(&q["rmse"]),
        );
        Ok(())
    })
}

/// `GET .../versions/{v}/{report}[?window=W]` of `version`, or of the function's latest;
/// returns the version asked about and the answer.
fn version_report(
    client: &Client,
    name: &str,
    version: Option<u32>,
    report: &str,
    window: Option<&str>,
) -> anyhow::Result<(u32, Value)> {
    let version = match version {
        Some(v) => v,
        None => latest_version(client, name)?,
    };
    let mut path = format!("/v1/functions/{name}/versions/{version}/{report}");
    if let Some(w) = window {
        path.push_str(&format!("?window={}", super::accounts::percent_encode(w)));
    }
    Ok((version, client.get_json(&path)?))
}

/// The function's latest version.
fn latest_version(client: &Client, name: &str) -> anyhow::Result<u32> {
    client.get_json(&format!("/v1/functions/{name}"))?["latest_version"]
        .as_u64()
        .map(|v| v as u32)
        .with_context(|| format!("function {name} has no versions"))
}
