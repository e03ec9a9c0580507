//! The JSON Schema of kiln.toml: `kiln schema manifest` prints the one published at
//! `schemas/kiln.schema.json`; every example's manifest passes both the schema and Kiln's
//! parser (`kiln schema manifest --check`); and what the parser refuses, the schema
//! refuses too (so an editor flags it before a deploy would).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_tests::{Value, kiln_bin, root, temp_dir};

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(kiln_bin())
        .args(args)
        .current_dir(root())
        .output()
        .expect("running kiln")
}

fn schema() -> Value {
    let out = kiln(&["schema", "manifest"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the schema is JSON")
}

/// What the schema says of `text` (a kiln.toml): its errors, none when valid.
fn schema_errors(validator: &jsonschema::Validator, text: &str) -> Vec<String> {
    let toml: toml::Value = toml::from_str(text).expect("TOML");
    let json = serde_json::to_value(toml).expect("as JSON");
    validator
        .iter_errors(&json)
        .map(|e| e.to_string())
        .collect()
}

/// Whether Kiln's parser takes `path`.
fn parser_takes(path: &Path) -> (bool, String) {
    let out = kiln(&["schema", "manifest", "--check", path.to_str().unwrap()]);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn examples() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path().join("kiln.toml"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found
}

#[test]
fn the_published_schema_is_the_one_kiln_prints_and_the_examples_point_at_it() {
    let published: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("schemas/kiln.schema.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        published,
        schema(),
        "schemas/kiln.schema.json is stale: run `kiln schema manifest > schemas/kiln.schema.json`"
    );
    for path in examples() {
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("#:schema ../../schemas/kiln.schema.json\n"),
            "{} does not name the schema on its first line (editors complete from it)",
            path.display()
        );
    }
}

#[test]
fn every_example_validates_and_the_schema_refuses_what_the_parser_refuses() {
    let validator = jsonschema::validator_for(&schema()).expect("a valid JSON Schema");
    let examples = examples();
    assert!(examples.len() >= 5, "{examples:?}");
    for path in &examples {
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            schema_errors(&validator, &text),
            Vec::<String>::new(),
            "{}",
            path.display()
        );
        let (ok, said) = parser_takes(path);
        assert!(ok, "{}: {said}", path.display());
    }

    let head = "name = \"f\"\ncomponent = \"f.wasm\"\n";
    // Everything a manifest may say, at once: both take it.
    let full = format!(
        "{head}public = true\nallowed_outbound_hosts = [\"https://api.example.com\"]\n\
         [build]\ncommand = \"make\"\n\
         [limits]\ntimeout_ms = 2000\nmemory_mb = 64\nmax_concurrency = 8\nrate = \"100/s\"\n\
         [nn]\nguest_load_max_mb = 16\n\
         [cache]\ninference = false\nresponses = {{ ttl = \"60s\", max_entries = 10, vary = [\"accept\"] }}\n\
         [models.digits]\npath = \"m.onnx\"\nencoding = \"onnx\"\ntarget = \"auto\"\nbackend = \"tract\"\n\
         batch = {{ max_rows = 16, max_wait_us = 500 }}\n\
         [models.digits.monitor]\nreference = \"r.npy\"\nsample_percent = 50\nmax_features = 32\ndrift_threshold = 0.3\n\
         [models.other]\npath = \"o.onnx\"\nbatch = \"auto\"\n\
         [validate]\ncases = \"cases.jsonl\"\nmin_accuracy = 0.9\nmax_p99_ms = 50\n\
         [variables]\ngreeting = {{ default = \"hi\" }}\napi_key = {{ secret = true }}\nregion = {{}}\n"
    );
    let refused = [
        ("an unknown key", format!("{head}colour = \"red\"\n")),
        ("no component", "name = \"f\"\n".to_string()),
        (
            "a bad name",
            "name = \"Bad Name\"\ncomponent = \"f.wasm\"\n".into(),
        ),
        (
            "a wrong type",
            format!("{head}[limits]\ntimeout_ms = \"fast\"\n"),
        ),
        ("an unknown limit", format!("{head}[limits]\ncpus = 2\n")),
        ("a bad rate", format!("{head}[limits]\nrate = \"fast\"\n")),
        (
            "a bad target",
            format!("{head}[models.m]\npath = \"m.onnx\"\ntarget = \"tpu\"\n"),
        ),
        (
            "a bad backend",
            format!("{head}[models.m]\npath = \"m.onnx\"\nbackend = \"torch\"\n"),
        ),
        (
            "a bad batch mode",
            format!("{head}[models.m]\npath = \"m.onnx\"\nbatch = \"always\"\n"),
        ),
        (
            "too many rows in a batch",
            format!("{head}[models.m]\npath = \"m.onnx\"\nbatch = {{ max_rows = 5000 }}\n"),
        ),
        (
            "a model without a path",
            format!("{head}[models.m]\ntarget = \"cpu\"\n"),
        ),
        (
            "a sample share over 100",
            format!(
                "{head}[models.m]\npath = \"m.onnx\"\n[models.m.monitor]\nsample_percent = 150\n"
            ),
        ),
        (
            "an accuracy over 1",
            format!("{head}[validate]\ncases = \"c\"\nmin_accuracy = 2.0\n"),
        ),
        (
            "a response cache without a ttl",
            format!("{head}[cache]\nresponses = {{ max_entries = 5 }}\n"),
        ),
        (
            "a bad variable name",
            format!("{head}[variables]\n\"Api-Key\" = {{}}\n"),
        ),
        (
            "a secret with a default",
            format!("{head}[variables]\nk = {{ secret = true, default = \"x\" }}\n"),
        ),
        (
            "an unknown variable option",
            format!("{head}[variables]\nk = {{ required = true }}\n"),
        ),
        (
            "a variable that is not a table",
            format!("{head}[variables]\nk = \"x\"\n"),
        ),
    ];
    let dir = temp_dir("schema");
    let write = |i: usize, text: &str| {
        let path = dir.join(format!("m{i}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    };
    // ...and the edges of what the parser takes, which the schema must take too.
    let edges = [
        full.clone(),
        format!("{head}[limits]\nrate = \"+5/s\"\n"),
        format!("{head}[limits]\nrate = \" 600 / minute \"\n"),
        format!("{head}[cache]\nresponses = {{ ttl = \"1.5s\" }}\n"),
        format!("{head}[cache]\nresponses = {{ ttl = \"1h 30m\" }}\n"),
        format!("{head}[models.m]\npath = \"m.onnx\"\n[models.m.monitor]\n"),
        format!("{head}[variables]\nk = {{ secret = false, default = \"\" }}\n"),
    ];
    for (i, text) in edges.iter().enumerate() {
        let path = write(100 + i, text);
        assert_eq!(
            schema_errors(&validator, text),
            Vec::<String>::new(),
            "{text}"
        );
        let (ok, said) = parser_takes(&path);
        assert!(ok, "{text}\n{said}");
    }
    for (i, (what, text)) in refused.iter().enumerate() {
        let path = write(i + 1, text);
        let (ok, said) = parser_takes(&path);
        assert!(!ok, "the parser took {what}:\n{text}");
        assert!(
            !schema_errors(&validator, text).is_empty(),
            "the schema took {what} (the parser said: {said}):\n{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
