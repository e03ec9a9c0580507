//! The traffic commands: `kiln traffic`, `kiln promote`, `kiln rollout`, `kiln rollback`
//! and `kiln history`.

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::commands::print_table;
use super::{Client, Output};

/// The optional parts of a traffic policy the CLI sets with its weights.
#[derive(Debug, Default)]
pub struct Extras {
    /// `header:NAME`.
    pub sticky: Option<String>,
    /// `VERSION:PERCENT`.
    pub shadow: Option<String>,
    /// The alias whose policy this is (none: the main policy).
    pub alias: Option<String>,
}

/// `kiln traffic NAME [V=W...] [--sticky header:NAME] [--shadow V:P]`: sets the policy
/// when weights are given; prints the policy.
pub fn traffic(
    client: &Client,
    name: &str,
    weights: &[String],
    extras: Extras,
    output: Output,
) -> anyhow::Result<()> {
    let path = match &extras.alias {
        Some(a) => format!("/v1/functions/{name}/aliases/{a}"),
        None => format!("/v1/functions/{name}/traffic"),
    };
    let v = if weights.is_empty() {
        if extras.sticky.is_some() || extras.shadow.is_some() {
            bail!(
                "--sticky and --shadow go with weights: kiln traffic {name} 1=100 --shadow 2:100"
            );
        }
        client.get_json(&path)?
    } else {
        let mut map = serde_json::Map::new();
        for w in weights {
            let (version, percent) = w
                .split_once('=')
                .with_context(|| format!("{w:?}: write VERSION=PERCENT, e.g. 3=90"))?;
            let percent: u8 = percent
                .parse()
                .with_context(|| format!("{w:?}: the percent is not 0-100"))?;
            map.insert(version.trim().to_string(), percent.into());
        }
        let mut body = json!({"weights": map});
        if let Some(s) = extras.sticky {
            body["sticky"] = s.into();
        }
        if let Some(s) = extras.shadow {
            let shadow: crate::deploy::Shadow = s.parse().map_err(anyhow::Error::msg)?;
            body["shadow"] = serde_json::to_value(shadow)?;
        }
        client.put_json(&path, &body)?
    };
    output.show(&v, || {
        print_policy(name, &v);
        Ok(())
    })
}

/// `NAME[:ALIAS] (revision N): 3=90 4=10 ...`, then each alias of the main policy.
fn print_policy(name: &str, v: &Value) {
    let target = match v["alias"].as_str() {
        Some(a) => format!("{name}:{a}"),
        None => name.to_string(),
    };
    match v["policy"].as_object() {
        None if v["alias"].is_string() => println!("{target}: no such alias"),
        None => println!(
            "{target}: no traffic policy; the newest version ({}) serves everything",
            v["latest_version"]
        ),
        Some(_) => println!(
            "{target} (revision {}): {}",
            v["revision"],
            describe_policy(&v["policy"])
        ),
    }
    for (alias, a) in v["aliases"].as_object().into_iter().flatten() {
        println!(
            "{name}:{alias} (revision {}): {}",
            a["revision"],
            describe_policy(&a["policy"])
        );
    }
}

/// `kiln promote NAME --from A --to B [--reason R]`: prints the promoted alias.
pub fn promote(
    client: &Client,
    name: &str,
    from: &str,
    to: &str,
    reason: Option<String>,
    output: Output,
) -> anyhow::Result<()> {
    let mut body = json!({"from": from, "to": to});
    if let Some(r) = reason {
        body["reason"] = r.into();
    }
    let v = client.post_json(&format!("/v1/functions/{name}/promote"), &body)?;
    output.show(&v, || {
        print_policy(name, &v);
        Ok(())
    })
}

/// `3=90 4=10 sticky header:x-user shadow 5:100`.
fn describe_policy(p: &Value) -> String {
    let mut parts: Vec<String> = p["weights"]
        .as_object()
        .map(|w| w.iter().map(|(k, v)| format!("{k}={v}")).collect())
        .unwrap_or_default();
    if let Some(s) = p.get("sticky").and_then(Value::as_str) {
        parts.push(format!("sticky {s}"));
    }
    if let Some(s) = p.get("shadow").filter(|s| !s.is_null()) {
        parts.push(format!("shadow {}:{}", s["version"], s["percent"]));
    }
    parts.join(" ")
}

/// `kiln rollout NAME --to V ...`: starts it, prints where it is.
pub fn rollout_start(
    client: &Client,
    name: &str,
    body: Value,
    output: Output,
) -> anyhow::Result<()> {
    let v = client.post_json(&format!("/v1/functions/{name}/rollout"), &body)?;
    print_rollout(&v, output)
}

/// `kiln rollout NAME --pause|--resume|--abort [--reason R]`.
pub fn rollout_control(
    client: &Client,
    name: &str,
    action: &str,
    reason: Option<String>,
    output: Output,
) -> anyhow::Result<()> {
    let body = match reason {
        Some(r) => json!({"reason": r}),
        None => json!({}),
    };
    let v = client.post_json(&format!("/v1/functions/{name}/rollout/{action}"), &body)?;
    print_rollout(&v, output)
}

/// `kiln rollout NAME`.
pub fn rollout_show(client: &Client, name: &str, output: Output) -> anyhow::Result<()> {
    let v = client.get_json(&format!("/v1/functions/{name}/rollout"))?;
    print_rollout(&v, output)
}

fn print_rollout(v: &Value, output: Output) -> anyhow::Result<()> {
    output.show(v, || {
        print_rollout_for_people(v);
        Ok(())
    })
}

fn print_rollout_for_people(v: &Value) {
    let steps: Vec<String> = v["steps"]
        .as_array()
        .map(|s| s.iter().map(|p| format!("{p}%")).collect())
        .unwrap_or_default();
    println!(
        "{}: v{} -> v{} {} at step {}/{} ({}% on v{}), steps {} every {} ms",
        v["function"].as_str().unwrap_or_default(),
        v["stable"],
        v["candidate"],
        v["state"].as_str().unwrap_or_default(),
        v["step"].as_u64().unwrap_or(0) + 1,
        steps.len(),
        v["percent"],
        v["candidate"],
        steps.join(","),
        v["interval_ms"],
    );
    if let Some(check) = v.get("last_check").filter(|c| !c.is_null()) {
        println!(
            "last check: {}: {}",
            check["verdict"].as_str().unwrap_or_default(),
            check["reason"].as_str().unwrap_or_default()
        );
    }
    if let Some(outcome) = v["outcome"].as_str() {
        println!("outcome: {outcome}");
    }
}

/// `kiln rollback NAME [--reason R] [--alias A]`: prints the policy now in force.
pub fn rollback(
    client: &Client,
    name: &str,
    reason: Option<String>,
    alias: Option<String>,
    output: Output,
) -> anyhow::Result<()> {
    let body = json!({"reason": reason, "alias": alias});
    let v = client.post_json(&format!("/v1/functions/{name}/rollback"), &body)?;
    output.show(&v, || {
        print_policy(name, &v);
        Ok(())
    })
}

/// `kiln history NAME`.
pub fn history(client: &Client, name: &str, output: Output) -> anyhow::Result<()> {
    let mut v = client.get_all(&format!("/v1/functions/{name}/history"), "history", None)?;
    if let (Output::Table, Some(entries)) = (output, v["history"].as_array_mut()) {
        for e in entries {
            let alias = e["detail"]["alias"]
                .as_str()
                .map(|a| format!(":{a} "))
                .unwrap_or_default();
            e["change"] = match e["detail"]["policy"].is_object() {
                true => format!("{alias}{}", describe_policy(&e["detail"]["policy"])).into(),
                false if !alias.is_empty() => format!("{alias}removed").into(),
                false => Value::Null,
            };
        }
    }
    print_table(
        &v,
        output,
        "history",
        &["at", "kind", "actor", "change", "reason"],
    )
}
