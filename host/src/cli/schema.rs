//! `kiln schema manifest`: the JSON Schema of `kiln.toml`, made from the manifest types
//! themselves, for editors to complete and check (`#:schema` in the file, or a setting);
//! `--check PATH...` reads manifests with Kiln's own parser, which also checks what a
//! schema cannot say (durations, header names, outbound host patterns).

use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;
use serde_json::json;

use super::Output;
use crate::manifest::Manifest;

/// `kiln schema ...`.
#[derive(Debug, Subcommand)]
pub enum SchemaCommand {
    /// Print the JSON Schema of kiln.toml (or, with --check, check manifests).
    Manifest {
        /// Check these kiln.toml files (or function directories) instead, with Kiln's parser.
        #[arg(long, value_name = "PATH", num_args = 1..)]
        check: Vec<PathBuf>,
    },
}

/// The JSON Schema of `kiln.toml`.
pub fn manifest_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Manifest)).unwrap_or_default();
    schema["$id"] = "https://kiln.dev/schemas/kiln.schema.json".into();
    schema
}

/// Runs one `kiln schema` command.
pub fn run(command: SchemaCommand, output: Output) -> anyhow::Result<()> {
    let SchemaCommand::Manifest { check } = command;
    if check.is_empty() {
        use std::io::Write as _;
        // Piped into `head` or an editor's reader that stops early: not an error.
        return match writeln!(std::io::stdout().lock(), "{:#}", manifest_schema()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            written => Ok(written?),
        };
    }
    let results: Vec<serde_json::Value> = check
        .iter()
        .map(|path| match Manifest::load(path) {
            Ok(_) => json!({"path": path, "ok": true}),
            Err(e) => json!({"path": path, "ok": false, "error": format!("{e:#}")}),
        })
        .collect();
    let failed = results.iter().filter(|r| r["ok"] == false).count();
    output.show(&json!({"checked": results}), || {
        for r in &results {
            match r["error"].as_str() {
                None => println!("{}: ok", r["path"].as_str().unwrap_or_default()),
                Some(e) => println!("{}: {e}", r["path"].as_str().unwrap_or_default()),
            }
        }
        Ok(())
    })?;
    if failed > 0 {
        bail!("{failed} of {} manifests are invalid", results.len());
    }
    Ok(())
}
