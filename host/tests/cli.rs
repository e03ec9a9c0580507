//! The `kiln` binary's own surface: help, version, and errors for bad invocations.
//! (Being an integration test of kiln-host, this also makes `cargo test` build the binary
//! that the end-to-end tests in `tests/` run.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("KILN_SERVER")
        .output()
        .unwrap()
}

#[test]
fn help_lists_every_command() {
    let out = kiln(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "serve",
        "build",
        "deploy",
        "invoke",
        "functions",
        "versions",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from:\n{help}");
    }
}

#[test]
fn serve_with_a_bad_config_file_fails_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nlisten_addr = 1\n").unwrap();
    let out = kiln(&[
        "serve",
        "--config",
        cfg.to_str().unwrap(),
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listen_addr") && err.contains("line 2"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn client_command_without_a_server_says_so() {
    let out = kiln(&["functions", "--server", "http://127.0.0.1:9"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connecting to http://127.0.0.1:9"), "{err}");
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, mark) in [
        ("bash", "complete -F _kiln"),
        ("zsh", "#compdef kiln"),
        ("fish", "complete -c kiln"),
    ] {
        let out = kiln(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(mark), "{shell}: {script}");
        assert!(script.contains("rollout"), "{shell} misses subcommands");
    }
    assert!(!kiln(&["completions", "tcsh"]).status.success());
}
