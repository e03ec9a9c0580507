//! `kiln vars set|list|unset`: a function's variables, for every request or for one
//! alias's (`--alias staging`). A secret's value is never printed: the server never
//! gives it back.

use std::io::Read;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::accounts::percent_encode;
use super::client::Client;
use super::{Output, ServerArg};

/// `kiln vars ...`.
#[derive(Debug, Subcommand)]
pub enum VarsCommand {
    /// Set values (`KEY=VALUE`; a bare `KEY` reads its value from standard input, which
    /// keeps a secret out of the shell's history); new requests see them at once.
    Set {
        name: String,
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// Seal the values at rest and never show them again.
        #[arg(long)]
        secret: bool,
        /// Only for requests through this alias (default: every request).
        #[arg(long)]
        alias: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the values set (secrets by name only) and what the newest version declares.
    List {
        name: String,
        /// Only this alias's values.
        #[arg(long)]
        alias: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Remove values: requests then see the declared default, if any.
    Unset {
        name: String,
        #[arg(required = true)]
        keys: Vec<String>,
        /// This alias's values (default: the function's).
        #[arg(long)]
        alias: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
}

/// Runs one `kiln vars` command.
pub fn run(command: VarsCommand, output: Output) -> anyhow::Result<()> {
    match command {
        VarsCommand::Set {
            name,
            pairs,
            secret,
            alias,
            server,
        } => {
            let mut set = serde_json::Map::new();
            let mut stdin_used = false;
            for pair in pairs {
                let (key, value) = match pair.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None if stdin_used => {
                        bail!("only one KEY may read its value from standard input")
                    }
                    None => {
                        stdin_used = true;
                        let mut v = String::new();
                        std::io::stdin()
                            .read_to_string(&mut v)
                            .context("reading the value from standard input")?;
                        let v = v.strip_suffix('\n').unwrap_or(&v);
                        (pair, v.strip_suffix('\r').unwrap_or(v).to_string())
                    }
                };
                set.insert(key, json!({"value": value, "secret": secret}));
            }
            let body = json!({"alias": alias, "set": set});
            change(&server.client()?, &name, &body, output)
        }
        VarsCommand::Unset {
            name,
            keys,
            alias,
            server,
        } => change(
            &server.client()?,
            &name,
            &json!({"alias": alias, "unset": keys}),
            output,
        ),
        VarsCommand::List {
            name,
            alias,
            server,
        } => {
            let mut path = format!("/v1/functions/{}/variables", percent_encode(&name));
            if let Some(a) = &alias {
                path.push_str(&format!("?alias={}", percent_encode(a)));
            }
            let answer = server.client()?.get_json(&path)?;
            output.show(&answer, || {
                print_list(&answer);
                Ok(())
            })
        }
    }
}

fn change(client: &Client, name: &str, body: &Value, output: Output) -> anyhow::Result<()> {
    let path = format!("/v1/functions/{}/variables", percent_encode(name));
    let answer = client.post_json(&path, body)?;
    output.show(&answer, || {
        print_list(&answer);
        Ok(())
    })
}

/// One line per value: key, alias (`*`: every request), and the value quoted with its
/// control characters escaped (`(secret)` for a secret).
fn print_list(answer: &Value) {
    let values = answer["variables"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let declared = answer["declared"].as_object();
    if values.is_empty() {
        println!("no values set");
    }
    for v in values {
        let alias = v["alias"].as_str().unwrap_or("*");
        let shown = match (v["secret"].as_bool(), v["value"].as_str()) {
            (Some(true), _) if v["unreadable"] == true => {
                "(secret, unreadable on this node)".to_string()
            }
            (Some(true), _) => "(secret)".to_string(),
            (_, Some(text)) => format!("{text:?}"),
            _ => String::new(),
        };
        println!(
            "{:<24} {:<12} {}",
            v["key"].as_str().unwrap_or_default(),
            alias,
            shown
        );
    }
    if let Some(declared) = declared.filter(|d| !d.is_empty()) {
        println!();
        println!("declared by the newest version:");
        for (key, d) in declared {
            let what = match (d["secret"].as_bool(), d["default"].as_str()) {
                (Some(true), _) => "secret".to_string(),
                (_, Some(default)) => format!("default {default:?}"),
                _ => "no default".to_string(),
            };
            println!("  {key:<22} {what}");
        }
    }
}
