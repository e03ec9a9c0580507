//! Times a server from process start to its first successful HTTP response.
//!
//! `first-response RUNS URL -- COMMAND ARGS...` starts COMMAND, polls URL (plain HTTP/1.1
//! GET over a fresh TCP connection) until it answers 200, kills the server, and repeats.
//! Prints each run and the median, in milliseconds. `KILN_API_KEY`, when set, is sent as
//! `authorization: Bearer` (other servers ignore it).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (runs, url, cmd) = match args.iter().position(|a| a == "--") {
        Some(2) => (args[0].parse::<usize>()?, &args[1], &args[3..]),
        _ => bail!("usage: first-response RUNS URL -- COMMAND ARGS..."),
    };
    let rest = url.strip_prefix("http://").context("URL must be http://")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let auth = std::env::var("KILN_API_KEY")
        .map(|k| format!("authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n{auth}connection: close\r\n\r\n");

    let mut times = Vec::new();
    for run in 0..runs {
        let started = Instant::now();
        let mut child = Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", cmd[0]))?;
        let elapsed = loop {
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                bail!("no answer within 30 s");
            }
            if let Ok(mut s) = TcpStream::connect(host) {
                let _ = s.write_all(request.as_bytes());
                let mut buf = [0u8; 16];
                if s.read(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200") {
                    break started.elapsed();
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let _ = child.kill();
        let _ = child.wait();
        println!("run {run}: {:.2} ms", elapsed.as_secs_f64() * 1e3);
        times.push(elapsed);
        std::thread::sleep(Duration::from_millis(100));
    }
    times.sort();
    println!(
        "median: {:.2} ms",
        times[times.len() / 2].as_secs_f64() * 1e3
    );
    Ok(())
}
