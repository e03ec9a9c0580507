//! `kiln new` end to end: each template makes a directory outside this repository that
//! `kiln build` builds (its copied SDK and WIT included), whose kiln.toml the parser and
//! the schema take, and that `kiln deploy` deploys after its own tests/cases.jsonl pass;
//! the deployed functions answer (the http one reads its variable and logs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_tests::{TestServer, root, temp_dir};

/// `kiln new NAME --template T --dir OUT`.
fn kiln_new(name: &str, template: &str, out: &Path) {
    let made = Command::new(kiln_tests::kiln_bin())
        .args(["new", name, "--template", template, "--dir"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

/// `kiln new NAME --template T --dir DIR/NAME`, its target dir shared with the other
/// templates' (one build of the common dependencies), then `kiln build`.
fn make(dir: &Path, name: &str, template: &str) -> PathBuf {
    let out = dir.join(name);
    kiln_new(name, template, &out);
    std::fs::create_dir_all(dir.join("target")).unwrap();
    std::os::unix::fs::symlink(dir.join("target"), out.join("target")).unwrap();
    // Not a path into this repository: the copied SDK is what it builds with.
    let cargo = std::fs::read_to_string(out.join("Cargo.toml")).unwrap();
    assert!(
        cargo.contains("kiln-guest = { path = \"kiln-guest\" }"),
        "{cargo}"
    );
    let built = Command::new(kiln_tests::kiln_bin())
        .arg("build")
        .arg(&out)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "kiln build of the {template} template: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let checked = Command::new(kiln_tests::kiln_bin())
        .args(["schema", "manifest", "--check"])
        .arg(out.join("kiln.toml"))
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stdout)
    );
    out
}

fn deploy(server: &TestServer, dir: &Path) -> String {
    let out = server.cli(&["deploy", dir.to_str().unwrap()]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kiln deploy {}: {said}",
        dir.display()
    );
    said
}

#[test]
fn every_template_builds_outside_the_repository_passes_its_tests_and_serves() {
    let dir = temp_dir("templates");
    assert!(!dir.starts_with(root()), "{}", dir.display());
    let server = TestServer::start();

    let greeter = make(&dir, "greeter", "http");
    deploy(&server, &greeter);
    let a = server.request("GET", "/fn/greeter/?name=kiln", &[], b"");
    assert_eq!((a.status, a.text()), (200, "Hello, kiln!\n".to_string()));
    server.cli_ok(&["vars", "set", "greeter", "greeting=Hi"]);
    let a = server.request("GET", "/fn/greeter/?name=kiln", &[], b"");
    assert_eq!(a.text(), "Hi, kiln!\n");
    let logs = server.cli_ok(&["logs", "greeter"]);
    assert!(logs.contains("greeted kiln"), "{logs}");

    let digits = make(&dir, "digits-new", "classifier");
    deploy(&server, &digits);
    let version = server.get("/v1/functions/digits-new/versions/1").json();
    assert_eq!(version["validation"]["result"]["passed"], true, "{version}");
    let pixels: Vec<u32> = vec![
        0, 0, 7, 16, 14, 3, 0, 0, 0, 0, 9, 14, 11, 15, 0, 0, 0, 0, 1, 5, 0, 15, 5, 0, 0, 0, 0, 0,
        0, 16, 5, 0, 0, 0, 0, 0, 3, 16, 4, 0, 0, 0, 0, 1, 12, 14, 1, 0, 0, 0, 5, 12, 16, 16, 14, 1,
        0, 0, 8, 16, 14, 10, 13, 3,
    ];
    let body = serde_json::json!({"pixels": pixels}).to_string();
    let a = server.request("POST", "/fn/digits-new/", &[], body.as_bytes());
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["digit"], 2, "{}", a.text());

    // The embedding template needs the exported model (scripts/test fetches it for the
    // example; the template's is the same file).
    let embed = make(&dir, "embedder", "embed");
    let model = root().join("examples/embed/model/minilm.onnx");
    if model.is_file() {
        std::fs::copy(&model, embed.join("model/minilm.onnx")).unwrap();
        deploy(&server, &embed);
        let a = server.request(
            "POST",
            "/fn/embedder/embed",
            &[("content-type", "application/json")],
            br#"{"text": "A man is eating food."}"#,
        );
        assert_eq!(a.status, 200, "{}", a.text());
    } else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but examples/embed/model/minilm.onnx is missing"
        );
        kiln_tests::skip(
            "templates (embed deploy)",
            "examples/embed/model/minilm.onnx not fetched",
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Lines a child prints, as they come.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The first line `rx` gives that `pred` takes, within a few minutes (a first build
/// compiles the SDK's dependencies); every line seen goes into `seen`.
fn wait_for(
    rx: &std::sync::mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if pred(&line) {
                    return line;
                }
            }
            Err(_) => panic!(
                "kiln dev never printed the line; it printed:\n{}",
                seen.join("\n")
            ),
        }
    }
}

#[test]
fn kiln_dev_serves_redeploys_on_a_change_and_streams_logs() {
    let dir = temp_dir("dev");
    let fdir = dir.join("devloop");
    kiln_new("devloop", "http", &fdir);
    // No KILN_SERVER: kiln dev starts a server of its own.
    let mut dev = Command::new(kiln_tests::kiln_bin())
        .arg("dev")
        .arg(&fdir)
        .env_remove("KILN_SERVER")
        .env_remove("KILN_API_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut dev);
    let mut seen = Vec::new();
    let serving = wait_for(&rx, &mut seen, |l| l.starts_with("kiln dev: serving"));
    let url = serving
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let key_line = wait_for(&rx, &mut seen, |l| l.contains("export KILN_API_KEY="));
    let key = key_line.rsplit('=').next().unwrap().to_string();
    wait_for(&rx, &mut seen, |l| l.starts_with("kiln dev: deployed"));
    // Its server keeps keys like any other: without one, nothing.
    let anonymous = kiln_tests::agent().get(&url).call().unwrap();
    assert_eq!(anonymous.status(), 401);
    let get = |who: &str| {
        let resp = kiln_tests::agent()
            .get(format!("{url}?name={who}"))
            .header("authorization", format!("Bearer {key}"))
            .call()
            .unwrap();
        resp.into_body().read_to_string().unwrap()
    };
    assert_eq!(get("a"), "Hello, a!\n");
    wait_for(&rx, &mut seen, |l| l.ends_with("stdout: greeted a"));

    // A change to a source file: built and deployed again, and served at once.
    let src = fdir.join("src/lib.rs");
    let text = std::fs::read_to_string(&src).unwrap();
    std::fs::write(
        &src,
        text.replace("{greeting}, {who}!", "{greeting} again, {who}!"),
    )
    .unwrap();
    wait_for(&rx, &mut seen, |l| l.contains("deployed devloop version 2"));
    wait_for(&rx, &mut seen, |l| l.starts_with("kiln dev: deployed"));
    assert_eq!(get("b"), "Hello again, b!\n");
    wait_for(&rx, &mut seen, |l| l.contains(" v2 stdout: greeted b"));

    // A broken change is reported; the last good version keeps serving.
    std::fs::write(&src, "this is not rust").unwrap();
    wait_for(&rx, &mut seen, |l| l == "kiln dev: waiting for a change");
    assert_eq!(get("c"), "Hello again, c!\n");

    // Its server goes with it.
    dev.kill().unwrap();
    dev.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // Any answer, even a 401, means it still serves.
    while kiln_tests::agent().get(&url).call().is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the dev server outlived kiln dev"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
