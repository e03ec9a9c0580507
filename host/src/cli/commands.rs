//! The client commands: build, deploy, invoke, list, delete, usage, keys, audit, keygen.

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
pub fn build(dir: &Path, embed_models: bool) -> anyhow::Result<()> {
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
    println!("{}", out.display());
    Ok(())
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

/// `kiln deploy [DIR | FILE.wasm] [--sign KEYFILE]`.
pub fn deploy(
    client: &Client,
    path: &Path,
    name: Option<String>,
    sign: Option<&Path>,
) -> anyhow::Result<()> {
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
    let answer = client.post_waiting(
        &format!("/v1/functions/{name}/versions"),
        manifest.as_bytes(),
        &headers,
    )?;
    println!(
        "deployed {} version {} ({})",
        answer["function"].as_str().unwrap_or(&name),
        answer["version"],
        answer["digest"].as_str().unwrap_or_default()
    );
    println!("{}", answer["url"].as_str().unwrap_or_default());
    Ok(())
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
        if embedded.contains(&(name.clone(), digest)) {
            continue;
        }
        upload_bytes(client, bytes, digest)?;
        decls.insert(
            name.clone(),
            serde_json::to_value(ModelDecl {
                digest,
                encoding: spec.encoding,
                target: spec.target,
                backend: spec.backend,
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
pub fn invoke(client: &Client, args: &InvokeArgs) -> anyhow::Result<()> {
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
    if args.include {
        eprintln!("HTTP {status}");
        for (k, v) in resp.headers() {
            eprintln!("{k}: {}", v.to_str().unwrap_or("<binary>"));
        }
        eprintln!();
    }
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()
        .context("reading the response")?;
    std::io::stdout().write_all(&bytes)?;
    if !status.is_success() {
        bail!("the function answered HTTP {}", status.as_u16());
    }
    Ok(())
}

/// `kiln functions`.
pub fn functions(client: &Client, output: Output) -> anyhow::Result<()> {
    let v = client.get_json("/v1/functions")?;
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
    let v = client.get_json(&format!("/v1/functions/{name}/versions"))?;
    print_table(
        &v,
        output,
        "versions",
        &["version", "digest", "size", "created_at"],
    )
}

/// `kiln delete NAME`.
pub fn delete(client: &Client, name: &str, yes: bool) -> anyhow::Result<()> {
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
    client.delete(&format!("/v1/functions/{name}"))?;
    println!("deleted {name}");
    Ok(())
}

/// `kiln usage`: totals (per group) as a table, the JSON answer, or the records as CSV.
pub fn usage(
    client: &Client,
    filters: &[(&str, Option<String>)],
    output: super::UsageOutput,
) -> anyhow::Result<()> {
    let mut query: Vec<String> = filters
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", percent_encode(v))))
        .collect();
    if let super::UsageOutput::Csv = output {
        query.push("format=csv".into());
        print!(
            "{}",
            client.get_text(&format!("/v1/usage?{}", query.join("&")))?
        );
        return Ok(());
    }
    let v = client.get_json(&format!("/v1/usage?{}", query.join("&")))?;
    if let super::UsageOutput::Json = output {
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
fn percent_encode(s: &str) -> String {
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
) -> anyhow::Result<()> {
    let mut body = json!({"tenant": tenant, "scopes": scopes});
    if let Some(r) = rate {
        body["rate"] = r.into();
    }
    let v = client.post_json("/v1/keys", &body)?;
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
    let mut v = client.get_json("/v1/keys")?;
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
pub fn keys_revoke(client: &Client, id: &str) -> anyhow::Result<()> {
    client.delete(&format!("/v1/keys/{}", percent_encode(id)))?;
    println!("revoked {id}");
    Ok(())
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
    let v = client.get_json(&format!("/v1/audit?{}", query.join("&")))?;
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
pub fn keygen(out: &Path) -> anyhow::Result<()> {
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
    eprintln!(
        "wrote the secret key to {}; trust the public key on servers with\n  [auth] trusted_publishers = [\"{public}\"]",
        out.display()
    );
    println!("{public}");
    Ok(())
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
