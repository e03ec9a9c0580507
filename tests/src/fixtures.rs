//! Fixtures: the workspace root, the `kiln` binary and the example components (built once),
//! ONNX Runtime when installed, digests, temp dirs, and the skip record `scripts/test`
//! counts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Records that `test` skipped a part for want of something optional (`why`): said on
/// stderr, and appended to `$KILN_TEST_SKIPS` so `scripts/test` counts it in its closing
/// line. Callers assert first that `CI=true` is not set, where a missing part fails.
pub fn skip(test: &str, why: &str) {
    eprintln!("skipped: {test}: {why}");
    if let Some(path) = std::env::var_os("KILN_TEST_SKIPS") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn profile_dir() -> PathBuf {
    // target/<profile>/deps/<test binary>
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for var in [
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Path of the `kiln` binary. `cargo test` builds it (kiln-host has an integration test, so
/// its binary is built with the same features as everything else); when only this crate's
/// tests are run and it is missing, it is built here.
pub fn kiln_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = profile_dir();
        let bin = dir.join("kiln");
        if !bin.exists() {
            let mut cmd = cargo();
            cmd.args(["build", "-q", "-p", "kiln-host", "--bin", "kiln"]);
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let status = cmd
                .env("CARGO_TARGET_DIR", dir.parent().unwrap())
                .current_dir(root())
                .status()
                .expect("running cargo build for the kiln binary");
            assert!(status.success(), "building the kiln binary failed");
        }
        bin
    })
}

/// Path of an example component (`hello`, `echo`, `hostile`), building the examples once.
pub fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = cargo()
            .args(["build", "-q", "--release", "--target", "wasm32-wasip2"])
            .current_dir(root().join("examples"))
            .status()
            .expect("running cargo build for examples/");
        assert!(
            status.success(),
            "building the examples failed (is the wasm32-wasip2 target installed?)"
        );
    });
    root()
        .join("examples/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"))
}

/// `libonnxruntime.so` for the onnxruntime backend: `ORT_DYLIB_PATH`, else the library inside
/// the `onnxruntime` Python package. `None` when neither exists; under `CI=true` that is a
/// failure (CI installs the package), elsewhere the caller skips the ONNX Runtime part.
pub fn onnxruntime_library() -> Option<PathBuf> {
    static LIB: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = LIB.get_or_init(|| {
        if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
        let out = Command::new("python3")
            .args([
                "-c",
                "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
            ])
            .output()
            .ok()?;
        let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim()).join("capi");
        let mut libs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
            .collect();
        libs.sort();
        libs.pop()
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but no ONNX Runtime library: pip install onnxruntime, or set ORT_DYLIB_PATH"
        );
        skip(
            "onnxruntime",
            "ONNX Runtime not found (pip install onnxruntime): skipping its part",
        );
    }
    found.clone()
}

/// `sha256:<hex>` of `bytes`, as the blob API names them.
pub fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// A fresh, empty temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kiln-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
