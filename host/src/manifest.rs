//! `kiln.toml`, the function manifest beside a function's sources. Paths are relative to the
//! manifest's directory. Unknown keys are an error that names the key and its line.
//!
//! ```toml
//! name = "hello"
//! component = "target/wasm32-wasip2/release/hello.wasm"
//! public = true                # optional: callable without an API key
//! allowed_outbound_hosts = ["https://api.example.com", "http://*.internal:8080"]  # default: none
//! [build]
//! command = "cargo build --release --target wasm32-wasip2"
//! [limits]
//! timeout_ms = 5000
//! memory_mb = 128
//! max_concurrency = 64
//! rate = "100/s"               # optional: requests per second (or /m, /h) across the function
//! [models.digits]              # guests call graph::load-by-name("digits")
//! path = "model/digits.onnx"
//! encoding = "onnx"
//! target = "cpu"               # or "gpu" (fail without one), "auto" (GPU if present)
//! backend = "tract"            # optional: "tract" or "onnxruntime"; default: the server's
//! [models.digits.monitor]      # optional: drift against a reference sample
//! reference = "model/reference.npy"
//! [nn]
//! guest_load_max_mb = 16       # optional: let guests pass model bytes to graph::load
//! [validate]                   # optional: cases every version must pass before it is published
//! cases = "validation.jsonl"   # {"body": ..., "status": 200, "label": 3} per line
//! min_accuracy = 0.95
//! [cache]
//! inference = true             # default: identical wasi:nn inputs reuse stored outputs
//! responses = { ttl = "60s", max_entries = 1000, vary = ["accept"] }   # opt-in
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use std::collections::BTreeMap;

use crate::api::functions::NnOptions;
use crate::cache::CacheSpec;
use crate::common::LimitsSpec;
use crate::nn::{BackendKind, Encoding, Target};

/// File name of the manifest inside a function directory.
pub const MANIFEST_FILE: &str = "kiln.toml";
/// Build command used when a Rust function (with a `Cargo.toml`) names none.
pub const DEFAULT_RUST_BUILD: &str = "cargo build --release --target wasm32-wasip2";

/// A parsed `kiln.toml`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "kiln.toml",
    description = "A Kiln function: its component, models, limits, caching, variables and validation. Unknown keys are an error."
)]
pub struct Manifest {
    /// Function name (what `/fn/{name}/` serves): 1-63 of a-z, 0-9, '-' and '_', starting
    /// with a letter or digit.
    #[schemars(pattern(r"^[a-z0-9][a-z0-9_-]{0,62}$"))]
    pub name: String,
    /// Path of the built component, relative to the manifest.
    pub component: PathBuf,
    /// How to build it.
    #[serde(default)]
    pub build: BuildSpec,
    /// Resource limits of every version deployed from this manifest.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Models by the name guests load them with.
    #[serde(default)]
    #[schemars(extend("propertyNames" = {"pattern": r"^[a-z0-9][a-z0-9_-]{0,62}$"}))]
    pub models: BTreeMap<String, ModelSpec>,
    /// `wasi:nn` options.
    #[serde(default)]
    pub nn: NnOptions,
    /// Response and inference caching.
    #[serde(default)]
    pub cache: CacheSpec,
    /// `true`: anyone may call the function without a key (default: only keys of its tenant).
    #[serde(default)]
    pub public: Option<bool>,
    /// Where the guest may send HTTP requests (default: nowhere).
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
    /// Cases every version must pass before it takes traffic.
    #[serde(default)]
    pub validate: Option<ValidateTable>,
    /// Settings guests read (`wasi:config/store`, and environment variables): a default, or
    /// `secret = true` for a value set with `kiln vars set --secret`.
    #[serde(default)]
    #[schemars(extend(
        "propertyNames" = {"pattern": "^[a-z][a-z0-9_]{0,63}$"},
        "maxProperties" = crate::deploy::variables::MAX_VARIABLES,
    ))]
    pub variables: crate::deploy::variables::Declared,
    /// The directory holding the manifest (not part of the file).
    #[serde(skip)]
    pub dir: PathBuf,
}

/// One `[models.<name>]` table.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Model file, relative to the manifest.
    pub path: PathBuf,
    #[serde(default)]
    pub encoding: Encoding,
    #[serde(default)]
    pub target: Target,
    #[serde(default)]
    pub backend: Option<BackendKind>,
    /// `"off"` (default), `"auto"` (measured per model), or `{ max_rows, max_wait_us }`:
    /// whether concurrent computes on the model merge into one run.
    #[serde(default)]
    pub batch: crate::nn::BatchSpec,
    /// `[models.<name>.monitor]`: drift monitoring against a reference sample.
    #[serde(default)]
    pub monitor: Option<MonitorTable>,
}

/// One `[models.<name>.monitor]` table: the reference file (if any) and how to watch the
/// model.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MonitorTable {
    /// Reference rows in the model's input layout (`.npy`, or `.npz` with one array per
    /// input name), relative to the manifest. Without one, the bins come from the first
    /// rows the version sees, and a window can be made the reference later.
    #[serde(default)]
    pub reference: Option<PathBuf>,
    /// Share of requests whose tensors are summarised (default 100).
    #[serde(default)]
    #[schemars(range(max = 100))]
    pub sample_percent: Option<u8>,
    /// Per input: rows of up to this many values get a feature per value (default 64).
    #[serde(default)]
    #[schemars(range(min = 1, max = crate::monitor::MAX_FEATURES))]
    pub max_features: Option<u32>,
    /// Per-feature score above which a feature counts as drifted (default 0.2).
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub drift_threshold: Option<f64>,
}

impl MonitorTable {
    /// The version's monitor settings, with the reference (if any) uploaded as `reference`.
    pub fn spec(&self, reference: Option<crate::common::Digest>) -> crate::monitor::MonitorSpec {
        let defaults = crate::monitor::MonitorSpec::new(reference);
        crate::monitor::MonitorSpec {
            reference,
            sample_percent: self.sample_percent.unwrap_or(defaults.sample_percent),
            max_features: self.max_features.unwrap_or(defaults.max_features),
            drift_threshold: self.drift_threshold.unwrap_or(defaults.drift_threshold),
        }
    }
}

/// The `[validate]` table: a cases file and what a version must score on it.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateTable {
    /// One request per line (JSON): `body` (or `body_base64`), optional `method`, `path`,
    /// `headers`, expected `status` and `label`; relative to the manifest.
    pub cases: PathBuf,
    /// Share of the labelled cases that must be predicted right (default 1).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1))]
    pub min_accuracy: Option<f64>,
    /// Highest p99 latency of the cases in milliseconds (default: not judged).
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_p99_ms: Option<u64>,
}

impl ValidateTable {
    /// The version's validation settings, with the cases uploaded as `cases`.
    pub fn spec(&self, cases: crate::common::Digest) -> crate::monitor::validate::ValidateSpec {
        crate::monitor::validate::ValidateSpec {
            cases,
            min_accuracy: self.min_accuracy.unwrap_or(1.0),
            max_p99_ms: self.max_p99_ms,
        }
    }
}

/// The `[build]` table.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    /// Shell command run in the manifest's directory.
    pub command: Option<String>,
}

impl Manifest {
    /// Reads `DIR/kiln.toml` (or the file itself when given one).
    pub fn load(path: &Path) -> anyhow::Result<Manifest> {
        let file = if path.is_dir() {
            path.join(MANIFEST_FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let mut m = Self::parse(&text).with_context(|| format!("in {}", file.display()))?;
        m.dir = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(m)
    }

    /// Parses manifest text and validates the name.
    pub fn parse(text: &str) -> anyhow::Result<Manifest> {
        let mut m: Manifest = toml::from_str(text)?;
        if let Err(e) = crate::deploy::validate_name(&m.name) {
            bail!("name: {e}");
        }
        m.cache = m.cache.validate().map_err(anyhow::Error::msg)?;
        if let Some(v) = &m.validate {
            v.spec(crate::common::Digest::of(b""))
                .check()
                .map_err(anyhow::Error::msg)?;
        }
        for (name, model) in &m.models {
            if let Some(t) = &model.monitor {
                t.spec(None)
                    .check()
                    .map_err(|e| anyhow::anyhow!("models.{name}.{e}"))?;
            }
        }
        crate::runtime::parse_patterns(&m.allowed_outbound_hosts).map_err(anyhow::Error::msg)?;
        crate::deploy::variables::validate_declared(&m.variables)
            .map_err(|e| anyhow::anyhow!("variables: {e}"))?;
        Ok(m)
    }

    /// Path of model `spec`'s file.
    pub fn model_path(&self, spec: &ModelSpec) -> PathBuf {
        self.dir.join(&spec.path)
    }

    /// Absolute (or cwd-relative) path of the component.
    pub fn component_path(&self) -> PathBuf {
        self.dir.join(&self.component)
    }

    /// The build command: the manifest's, or the Rust default when a `Cargo.toml` is present.
    pub fn build_command(&self) -> Option<String> {
        self.build.command.clone().or_else(|| {
            self.dir
                .join("Cargo.toml")
                .exists()
                .then(|| DEFAULT_RUST_BUILD.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_parses_the_documented_example() {
        let m = Manifest::parse(
            "name = \"hello\"\ncomponent = \"a.wasm\"\n[build]\ncommand = \"make\"\n[limits]\ntimeout_ms = 5000\nmemory_mb = 128\nmax_concurrency = 64\n",
        )
        .expect("parse");
        assert_eq!(m.name, "hello");
        assert_eq!(m.limits.timeout_ms, Some(5000));
        assert_eq!(m.build.command.as_deref(), Some("make"));
    }

    #[test]
    fn manifest_unknown_key_names_key_and_line() {
        let err =
            Manifest::parse("name = \"hello\"\ncomponent = \"a.wasm\"\n[limits]\nmemory = 5\n")
                .expect_err("unknown key");
        let msg = format!("{err:#}");
        assert!(msg.contains("memory"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn manifest_models_parse_with_defaults() {
        let m = Manifest::parse(
            "name = \"digits\"\ncomponent = \"a.wasm\"\n[models.digits]\npath = \"m.onnx\"\ntarget = \"auto\"\n[models.other]\npath = \"o.onnx\"\nbackend = \"onnxruntime\"\n[nn]\nguest_load_max_mb = 4\n",
        )
        .expect("parse");
        let d = &m.models["digits"];
        assert_eq!(
            (d.encoding, d.target, d.backend),
            (Encoding::Onnx, Target::Auto, None)
        );
        let o = &m.models["other"];
        assert_eq!(
            (o.target, o.backend),
            (Target::Cpu, Some(BackendKind::Onnxruntime))
        );
        assert_eq!(m.nn.guest_load_max_mb, Some(4));
        let bad = Manifest::parse(
            "name = \"d\"\ncomponent = \"a.wasm\"\n[models.d]\npath = \"m\"\ntarget = \"tpu\"\n",
        )
        .expect_err("tpu");
        assert!(format!("{bad:#}").contains("tpu"), "{bad:#}");
    }

    #[test]
    fn manifest_cache_table_parses_and_is_checked() {
        let m = Manifest::parse(
            "name = \"e\"\ncomponent = \"a.wasm\"\n[cache]\ninference = false\nresponses = { ttl = \"60s\", vary = [\"X-User\"] }\n",
        )
        .expect("parse");
        assert!(!m.cache.inference);
        let p = m.cache.responses.expect("responses");
        assert_eq!(p.ttl.0, std::time::Duration::from_secs(60));
        assert_eq!(p.vary, ["x-user"]);
        let bad = Manifest::parse(
            "name = \"e\"\ncomponent = \"a.wasm\"\n[cache]\nresponses = { ttl = \"forever\" }\n",
        )
        .expect_err("bad ttl");
        assert!(format!("{bad:#}").contains("forever"), "{bad:#}");
    }

    #[test]
    fn manifest_bad_name_is_rejected() {
        assert!(Manifest::parse("name = \"Bad Name\"\ncomponent = \"a.wasm\"\n").is_err());
    }
}
