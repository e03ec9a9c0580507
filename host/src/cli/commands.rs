//! The function commands: build, deploy, invoke, list, delete; and the tables they print.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::process::Command as Process;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{Client, Output};
use crate::api::functions::ModelDecl;
use crate::auth::signing;
use crate::common::Digest;
use crate::common::LimitsSpec;
use crate::manifest::Manifest;
use crate::nn::embed::{self, EmbeddedModel};

/// Uploads over this size show a progress bar (when stderr is a terminal).
const PROGRESS_THRESHOLD: u64 = 4 << 20;

/// `kiln build [DIR] [--embed-models]`.
pub fn build(dir: &Path, embed_models: bool, output: Output) -> anyhow::Result<()> {
    let m = Manifest::load(dir)?;
    let Some(cmd) = m.build_command() else {
        bail!(
            "{} has no [build] command and is not a Rust crate; build {} yourself",
            dir.display(),
            m.component.display()
        );
    };
    eprintln!("building {} in {}: {cmd}", m.name, m.dir.display());
    let status = Process::new("sh")
        .arg("-c")
        .arg(&cmd)
        .current_dir(&m.dir)
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("build command {cmd:?} failed ({status})");
    }
    let out = m.component_path();
    if !out.is_file() {
        bail!(
            "the build succeeded but {} does not exist; check `component` in kiln.toml",
            out.display()
        );
    }
    if embed_models {
        embed_models_into(&m, &out)?;
    }
    let size = std::fs::metadata(&out)?.len();
    let v = json!({"function": m.name, "component": out, "size": size});
    output.show(&v, || {
        println!("{}", out.display());
        Ok(())
    })
}

/// Rewrites the built component with the manifest's models in custom sections.
fn embed_models_into(m: &Manifest, component: &Path) -> anyhow::Result<()> {
    let mut models = Vec::new();
    for (name, spec) in &m.models {
        let path = m.model_path(spec);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("reading model {name:?} at {}", path.display()))?;
        models.push((
            EmbeddedModel {
                name: name.clone(),
                encoding: spec.encoding,
                target: spec.target,
                backend: spec.backend,
                batch: spec.batch,
            },
            bytes,
        ));
    }
    let original = std::fs::read(component)?;
    let embedded = embed::embed(&original, &models)
        .with_context(|| format!("embedding models into {}", component.display()))?;
    let tmp = component.with_extension("wasm.tmp");
    std::fs::write(&tmp, &embedded)?;
    std::fs::rename(&tmp, component)?;
    eprintln!(
        "embedded {} model(s) into {} ({} bytes)",
        models.len(),
        component.display(),
        embedded.len()
    );
    Ok(())
}

/// The options of `kiln deploy`.
pub struct DeployArgs<'a> {
    pub name: Option<String>,
    pub sign: Option<&'a Path>,
    pub dry_run: bool,
}

/// `kiln deploy [DIR | FILE.wasm] [--sign KEYFILE] [--dry-run]`.
pub fn deploy(
    client: &Client,
    path: &Path,
    args: DeployArgs<'_>,
    output: Output,
) -> anyhow::Result<()> {
    let DeployArgs {
        name,
        sign,
        dry_run,
    } = args;
    // Read the key first: a bad key file fails before anything is uploaded.
    let secret = sign
        .map(|p| {
            std::fs::read_to_string(p).with_context(|| format!("reading key file {}", p.display()))
        })
        .transpose()?;
    let (name, component, limits, manifest) =
        if path.is_file() && path.extension().is_some_and(|e| e == "wasm") {
            let name = match name {
                Some(n) => n,
                None => path
                    .file_stem()
                    .map(|s| s.to_string_lossy().replace('.', "-"))
                    .context("cannot derive a function name from the file; pass --name")?,
            };
            (name, path.to_path_buf(), LimitsSpec::default(), None)
        } else {
            let m = Manifest::load(path)?;
            let component = m.component_path();
            if !component.is_file() {
                bail!(
                    "component {} not found; run `kiln build {}` first",
                    component.display(),
                    path.display()
                );
            }
            (
                name.unwrap_or_else(|| m.name.clone()),
                component,
                m.limits,
                Some(m),
            )
        };
    crate::deploy::validate_name(&name).map_err(anyhow::Error::msg)?;

    let digest = upload(client, &component)?;
    let mut body = json!({"component": digest, "limits": limits});
    if let Some(m) = &manifest {
        body["models"] = model_decls(client, m, &component)?;
        body["nn"] = serde_json::to_value(&m.nn)?;
        body["cache"] = serde_json::to_value(&m.cache)?;
        if let Some(public) = m.public {
            body["public"] = public.into();
        }
        if !m.allowed_outbound_hosts.is_empty() {
            body["allowed_outbound_hosts"] = json!(m.allowed_outbound_hosts);
        }
        if !m.variables.is_empty() {
            body["variables"] = serde_json::to_value(&m.variables)?;
        }
        if let Some(v) = &m.validate {
            let path = m.dir.join(&v.cases);
            let cases = upload(client, &path).context("the [validate] cases file")?;
            body["validate"] = serde_json::to_value(v.spec(cases))?;
        }
    }
    if dry_run && manifest.is_none() {
        bail!(
            "--dry-run needs a function directory with a kiln.toml (a bare component has nothing to validate)"
        );
    }
    // The manifest names every blob by digest; signing its bytes signs the whole bundle,
    // and `signed_at` makes each signature usable once (the server keeps the newest).
    if secret.is_some() {
        body["signed_at"] = crate::unix_ms().into();
    }
    let manifest = body.to_string();
    let headers = match &secret {
        Some(secret) => {
            let (signer, sig) =
                signing::sign(secret, &name, manifest.as_bytes()).map_err(anyhow::Error::msg)?;
            eprintln!("signed by {signer}");
            vec![
                (signing::SIGNER_HEADER, signer),
                (signing::SIGNATURE_HEADER, sig),
            ]
        }
        None => Vec::new(),
    };
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let query = if dry_run { "?dry_run=true" } else { "" };
    let answer = client.post_waiting(
        &format!("/v1/functions/{name}/versions{query}"),
        manifest.as_bytes(),
        &headers,
    )?;
    if dry_run {
        return output.show(&answer, || {
            match answer["validation"].as_object() {
                Some(v) => println!(
                    "dry run: {name} would deploy; validation passed ({} cases, accuracy {}, p99 {:.1} ms)",
                    v["cases"],
                    v.get("accuracy").and_then(Value::as_f64).map_or("-".into(), |a| format!("{a:.4}")),
                    v["p99_ms"].as_f64().unwrap_or(0.0)
                ),
                None => println!("dry run: {name} would deploy (no [validate] cases)"),
            }
            Ok(())
        });
    }
    output.show(&answer, || {
        println!(
            "deployed {} version {} ({})",
            answer["function"].as_str().unwrap_or(&name),
            answer["version"],
            answer["digest"].as_str().unwrap_or_default()
        );
        println!("{}", answer["url"].as_str().unwrap_or_default());
        Ok(())
    })
}

/// Uploads the manifest's models (each only if the server lacks it) and returns the
/// manifest's `models` object. Models already embedded in the component, byte for byte,
/// travel with it and are left out.
fn model_decls(client: &Client, m: &Manifest, component: &Path) -> anyhow::Result<Value> {
    let wasm = std::fs::read(component)?;
    let embedded: Vec<(String, Digest)> = embed::extract(&wasm)
        .map(|found| {
            found
                .into_iter()
                .map(|(meta, range)| (meta.name, Digest::of(&wasm[range])))
                .collect()
        })
        .unwrap_or_default();
    let mut decls = serde_json::Map::new();
    for (name, spec) in &m.models {
        let path = m.model_path(spec);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("reading model {name:?} at {}", path.display()))?;
        let digest = Digest::of(&bytes);
        // A monitored model is declared even when embedded: its monitor travels here.
        if embedded.contains(&(name.clone(), digest)) && spec.monitor.is_none() {
            continue;
        }
        upload_bytes(client, bytes, digest)?;
        let monitor = match &spec.monitor {
            Some(t) => {
                let reference = match &t.reference {
                    Some(r) => Some(
                        upload(client, &m.dir.join(r))
                            .with_context(|| format!("the monitor reference of model {name:?}"))?,
                    ),
                    None => None,
                };
                Some(t.spec(reference))
            }
            None => None,
        };
        decls.insert(
            name.clone(),
            serde_json::to_value(ModelDecl {
                digest,
                encoding: spec.encoding,
                target: spec.target,
                backend: spec.backend,
                batch: spec.batch,
                monitor,
            })?,
        );
    }
    Ok(Value::Object(decls))
}

/// Uploads a file as a blob unless the server already has it; returns its digest.
fn upload(client: &Client, file: &Path) -> anyhow::Result<Digest> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let digest = Digest::of(&bytes);
    upload_bytes(client, bytes, digest)?;
    Ok(digest)
}

/// Uploads `bytes` (whose digest is `digest`) unless the server already has them.
fn upload_bytes(client: &Client, bytes: Vec<u8>, digest: Digest) -> anyhow::Result<()> {
    if client.has_blob(&digest.to_string())? {
        return Ok(());
    }
    let len = bytes.len() as u64;
    let mut reader: Box<dyn Read> = Box::new(std::io::Cursor::new(bytes));
    let bar = (len > PROGRESS_THRESHOLD && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "uploading {bytes}/{total_bytes} {wide_bar} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    if let Some(bar) = &bar {
        reader = Box::new(bar.wrap_read(reader));
    }
    client.put_blob(&digest.to_string(), len, &mut reader)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

/// Arguments of `kiln invoke`.
pub struct InvokeArgs {
    pub name: String,
    pub path: String,
    pub method: Option<String>,
    pub headers: Vec<String>,
    pub data: Option<String>,
    pub include: bool,
}

/// `kiln invoke NAME`.
pub fn invoke(client: &Client, args: &InvokeArgs, output: Output) -> anyhow::Result<()> {
    let body = match args.data.as_deref() {
        Some(d) if d.starts_with('@') => {
            std::fs::read(&d[1..]).with_context(|| format!("reading {}", &d[1..]))?
        }
        Some(d) => d.as_bytes().to_vec(),
        None => Vec::new(),
    };
    let method = match &args.method {
        Some(m) => m.to_ascii_uppercase(),
        None if args.data.is_some() => "POST".into(),
        None => "GET".into(),
    };
    let path = if args.path.starts_with('/') {
        args.path.clone()
    } else {
        format!("/{}", args.path)
    };
    let mut req = http::Request::builder()
        .method(method.as_str())
        .uri(format!("{}/fn/{}{path}", client.base(), args.name));
    if let Some(bearer) = client.bearer() {
        req = req.header("authorization", bearer);
    }
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("header {h:?} is not 'name: value'"))?;
        req = req.header(k.trim(), v.trim());
    }
    let req = req.body(body).context("building the request")?;
    let mut resp = client
        .agent()
        .run(req)
        .with_context(|| format!("connecting to {}", client.base()))?;
    let status = resp.status();
    if output == Output::Json {
        return invoke_json(resp);
    }
    if args.include {
        eprintln!("HTTP {status}");
        for (k, v) in resp.headers() {
            eprintln!("{k}: {}", v.to_str().unwrap_or("<binary>"));
        }
        eprintln!();
    }
    let bytes = read_all(&mut resp)?;
    std::io::stdout().write_all(&bytes)?;
    if !status.is_success() {
        bail!("the function answered HTTP {}", status.as_u16());
    }
    Ok(())
}

/// A function's whole answer (it may be large: no limit but the client's patience).
fn read_all(resp: &mut http::Response<ureq::Body>) -> anyhow::Result<Vec<u8>> {
    resp.body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()
        .context("reading the response")
}

/// `kiln invoke --output json`: the function's answer as `{"status", "headers", "body"}`
/// (`body_base64` instead when it is not UTF-8); a 4xx or 5xx answer is still printed, and
/// fails the command.
fn invoke_json(mut resp: http::Response<ureq::Body>) -> anyhow::Result<()> {
    use base64::Engine as _;
    let status = resp.status();
    let mut headers = serde_json::Map::new();
    for (k, v) in resp.headers() {
        headers.insert(k.to_string(), v.to_str().unwrap_or("<binary>").into());
    }
    let bytes = read_all(&mut resp)?;
    let mut v = json!({"status": status.as_u16(), "headers": headers});
    match String::from_utf8(bytes) {
        Ok(text) => v["body"] = text.into(),
        Err(e) => {
            v["body_base64"] = base64::engine::general_purpose::STANDARD
                .encode(e.as_bytes())
                .into()
        }
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    if !status.is_success() {
        // Printed already; the exit status says it failed (main prints nothing more).
        return Err(super::Printed.into());
    }
    Ok(())
}

/// `kiln functions`.
pub fn functions(client: &Client, output: Output) -> anyhow::Result<()> {
    let v = client.get_all("/v1/functions", "functions", None)?;
    print_table(
        &v,
        output,
        "functions",
        &[
            "name",
            "tenant",
            "public",
            "latest_version",
            "versions",
            "url",
        ],
    )
}

/// `kiln versions NAME`.
pub fn versions(client: &Client, name: &str, output: Output) -> anyhow::Result<()> {
    let v = client.get_all(&format!("/v1/functions/{name}/versions"), "versions", None)?;
    print_table(
        &v,
        output,
        "versions",
        &["version", "digest", "size", "created_at"],
    )
}

/// `kiln delete NAME`.
pub fn delete(client: &Client, name: &str, yes: bool, output: Output) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    // Someone at a terminal confirms by typing the name; scripts (no terminal) and --yes
    // do not ask.
    if !yes && std::io::stdin().is_terminal() {
        eprint!("delete function {name} and all its versions? type its name to confirm: ");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if answer.trim() != name {
            bail!("not deleted: the answer was not {name:?}");
        }
    }
    let v = client.delete(&format!("/v1/functions/{name}"))?;
    output.show(&v, || {
        println!("deleted {name}");
        Ok(())
    })
}

pub(super) fn print_table(
    v: &Value,
    output: Output,
    key: &str,
    columns: &[&str],
) -> anyhow::Result<()> {
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&v[key])?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v[key]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|row| {
            columns
                .iter()
                .map(|c| match &row[*c] {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    other => other.to_string(),
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!(
        "{}",
        line(columns.iter().map(|c| c.to_uppercase()).collect())
    );
    for r in rows {
        println!("{}", line(r));
    }
    Ok(())
}
