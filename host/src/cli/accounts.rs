//! The account commands: usage and cost, API keys, the audit log, signing keys.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

use super::commands::print_table;
use super::{Client, Output};
use crate::auth::signing;

/// `kiln usage`: totals (per group) as a table, the JSON answer, or the records as CSV.
pub fn usage(
    client: &Client,
    filters: &[(&str, Option<String>)],
    output: Output,
) -> anyhow::Result<()> {
    let mut query: Vec<String> = filters
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", percent_encode(v))))
        .collect();
    if let Output::Csv = output {
        query.push("format=csv".into());
        print!(
            "{}",
            client.get_text(&format!("/v1/usage?{}", query.join("&")))?
        );
        return Ok(());
    }
    let v = client.get_json(&format!("/v1/usage?{}", query.join("&")))?;
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let flat = |t: &Value, key: &str| {
        json!({
            "key": key,
            "requests": t["requests"],
            "cache_hits": t["cache_hits"],
            "errors": t["errors"],
            "cpu_ms": format!("{:.3}", t["cpu_ms"].as_f64().unwrap_or(0.0)),
            "gb_s": format!("{:.6}", t["gb_s"].as_f64().unwrap_or(0.0)),
            "inference_cpu_ms": format!("{:.3}", t["inference_ms"]["cpu"].as_f64().unwrap_or(0.0)),
            "inference_gpu_ms": format!("{:.3}", t["inference_ms"]["gpu"].as_f64().unwrap_or(0.0)),
            "bytes_in": t["bytes_in"],
            "bytes_out": t["bytes_out"],
            "cost": t["cost"],
        })
    };
    let mut rows: Vec<Value> = v["groups"]
        .as_array()
        .map(|g| {
            g.iter()
                .map(|g| flat(g, g["key"].as_str().unwrap_or("-")))
                .collect()
        })
        .unwrap_or_default();
    rows.push(flat(&v["totals"], "TOTAL"));
    print_table(
        &json!({ "rows": rows }),
        Output::Table,
        "rows",
        &[
            "key",
            "requests",
            "cache_hits",
            "errors",
            "cpu_ms",
            "gb_s",
            "inference_cpu_ms",
            "inference_gpu_ms",
            "bytes_in",
            "bytes_out",
            "cost",
        ],
    )?;
    println!(
        "cost in micro-{} ({})",
        v["currency"].as_str().unwrap_or("units"),
        match (v["since"].as_str(), v["until"].as_str()) {
            (None, None) => "all time".to_string(),
            (s, u) => format!("{} .. {}", s.unwrap_or("start"), u.unwrap_or("now")),
        }
    );
    Ok(())
}

/// Escapes a query parameter value (times carry `:` and `+`).
pub(super) fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `kiln keys create`: prints the key's details, then its secret alone on the last line.
pub fn keys_create(
    client: &Client,
    tenant: &str,
    scopes: &[String],
    rate: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    let mut body = json!({"tenant": tenant, "scopes": scopes});
    if let Some(r) = rate {
        body["rate"] = r.into();
    }
    let v = client.post_json("/v1/keys", &body)?;
    if output == Output::Json {
        return output.show(&v, || Ok(()));
    }
    let scopes: Vec<&str> = v["scopes"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    eprintln!(
        "created key {} for tenant {} ({}); it is shown only now:",
        v["id"].as_str().unwrap_or_default(),
        v["tenant"].as_str().unwrap_or_default(),
        scopes.join(" ")
    );
    println!("{}", v["key"].as_str().context("the server sent no key")?);
    Ok(())
}

/// `kiln keys list`.
pub fn keys_list(client: &Client, output: Output) -> anyhow::Result<()> {
    let mut v = client.get_all("/v1/keys", "keys", None)?;
    if let (Output::Table, Some(keys)) = (output, v["keys"].as_array_mut()) {
        for k in keys {
            let scopes: Vec<&str> = k["scopes"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            k["scopes"] = scopes.join(",").into();
            k["status"] = if k["revoked_at"].is_null() {
                "active"
            } else {
                "revoked"
            }
            .into();
        }
    }
    print_table(
        &v,
        output,
        "keys",
        &["id", "tenant", "scopes", "rate", "status", "created_at"],
    )
}

/// `kiln keys revoke ID`.
pub fn keys_revoke(client: &Client, id: &str, output: Output) -> anyhow::Result<()> {
    let v = client.delete(&format!("/v1/keys/{}", percent_encode(id)))?;
    output.show(&v, || {
        println!("revoked {id}");
        Ok(())
    })
}

/// `kiln audit`.
pub fn audit(
    client: &Client,
    filters: &[(&str, Option<String>)],
    output: Output,
) -> anyhow::Result<()> {
    let query: Vec<String> = filters
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", percent_encode(v))))
        .collect();
    // `--limit` caps the whole answer; pages are fetched until it is met.
    let max = filters
        .iter()
        .find(|(k, _)| *k == "limit")
        .and_then(|(_, v)| v.as_deref()?.parse().ok());
    let v = client.get_all(&format!("/v1/audit?{}", query.join("&")), "entries", max)?;
    print_table(
        &v,
        output,
        "entries",
        &[
            "at", "key_id", "tenant", "action", "target", "outcome", "status", "detail",
        ],
    )
}

/// `kiln keygen --out FILE`.
pub fn keygen(out: &Path, output: Output) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let (secret, public) = signing::keygen()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {} (it must not exist yet)", out.display()))?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    if output == Output::Json {
        let v = json!({"public_key": public, "secret_key_file": out});
        return output.show(&v, || Ok(()));
    }
    eprintln!(
        "wrote the secret key to {}; trust the public key on servers with\n  [auth] trusted_publishers = [\"{public}\"]",
        out.display()
    );
    println!("{public}");
    Ok(())
}

/// `kiln budgets set TENANT --monthly N [--alert-at 50,80,100] [--hard]`.
pub fn budgets_set(
    client: &Client,
    tenant: &str,
    body: Value,
    output: Output,
) -> anyhow::Result<()> {
    let v = client.put_json(&format!("/v1/budgets/{}", percent_encode(tenant)), &body)?;
    output.show(&v, || {
        println!(
            "budget of {tenant}: {} a month, alerts at {}%{}",
            v["monthly"],
            v["alert_at"]
                .as_array()
                .map(|a| a.iter().map(Value::to_string).collect::<Vec<_>>().join(","))
                .unwrap_or_default(),
            if v["hard"] == true {
                ", requests refused once spent"
            } else {
                ""
            }
        );
        Ok(())
    })
}

/// `kiln budgets list`.
pub fn budgets_list(client: &Client, output: Output) -> anyhow::Result<()> {
    let v = client.get_json("/v1/budgets")?;
    print_table(
        &v,
        output,
        "budgets",
        &["tenant", "month", "spent", "monthly", "hard", "exhausted"],
    )
}

/// `kiln budgets delete TENANT`.
pub fn budgets_delete(client: &Client, tenant: &str, output: Output) -> anyhow::Result<()> {
    let v = client.delete(&format!("/v1/budgets/{}", percent_encode(tenant)))?;
    output.show(&v, || {
        println!("budget of {tenant} removed");
        Ok(())
    })
}
