//! TLS on both ends: `kiln serve --tls-cert --tls-key` answers HTTP/2 and HTTP/1.1 by
//! ALPN, reloads its certificate on SIGHUP while connections stay open, names a bad file;
//! the CLI trusts a private CA with `--ca-cert`, gives up on a server that stops
//! answering, and keeps API keys off plain http beyond loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln_tests::{Launch, TestServer, example, temp_dir};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName};

/// A private CA and the files of certificates it signed.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let dir = temp_dir("tls");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A new certificate for localhost and 127.0.0.1 written (atomically) to `cert.pem`
    /// and `key.pem`; returns its DER.
    fn issue(&self) -> CertificateDer<'static> {
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        replace(&self.dir.join("key.pem"), key.serialize_pem().as_bytes());
        replace(&self.dir.join("cert.pem"), cert.pem().as_bytes());
        cert.der().clone()
    }

    fn serve_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.dir.join("cert.pem").display().to_string(),
            "--tls-key".into(),
            self.dir.join("key.pem").display().to_string(),
        ]
    }
}

fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

fn start_tls(pki: &Pki) -> TestServer {
    let launch = Launch {
        args: pki.serve_args(),
        ..Launch::default()
    };
    TestServer::launch(temp_dir("data"), None, launch)
        .unwrap_or_else(|log| panic!("kiln serve exited before serving:\n{log}"))
}

fn addr(s: &TestServer) -> String {
    s.url.trim_start_matches("https://").to_string()
}

/// A TLS connection offering `alpn`, trusting only `ca`.
async fn connect(
    addr: &str,
    ca: CertificateDer<'static>,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// The certificate the server presented on `tls`.
fn presented(tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn get(path: &str) -> http::Request<Empty<bytes::Bytes>> {
    http::Request::get(format!("https://localhost{path}"))
        .header("authorization", kiln_tests::ADMIN_BEARER)
        .body(Empty::new())
        .unwrap()
}

/// An HTTP/2 connection over TLS: its request sender and the certificate it saw.
async fn h2(
    addr: &str,
    ca: CertificateDer<'static>,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>,
    Vec<u8>,
) {
    let tls = connect(addr, ca, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let cert = presented(&tls);
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    (sender, cert)
}

async fn status_h2(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>,
    path: &str,
) -> (u16, String) {
    let resp = sender.send_request(get(path)).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn https_speaks_h2_and_http1_by_alpn_and_the_cli_trusts_a_private_ca() {
    let pki = Pki::new();
    pki.issue();
    let server = start_tls(&pki);
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    let ca = pki.ca_file().display().to_string();
    let hello = example("hello").display().to_string();

    // The CLI over https, trusting the private CA by flag and by variable.
    let out = server.cli_ok(&["deploy", &hello, "--name", "hello", "--ca-cert", &ca]);
    assert!(out.contains("deployed hello version 1"), "{out}");
    let mut cmd = std::process::Command::new(kiln_tests::kiln_bin());
    let out = cmd
        .args(["invoke", "hello", "--server", &server.url])
        .env("KILN_CA_CERT", &ca)
        .env("KILN_API_KEY", kiln_tests::ADMIN_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());
    // Without the CA the public roots do not vouch for the server: no request is sent.
    let out = server.cli(&["functions"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("certificate") || err.contains("issuer"),
        "{err}"
    );

    let addr = addr(&server);
    runtime().block_on(async {
        // HTTP/2 when the client offers it...
        let (mut sender, _) = h2(&addr, pki.ca_der()).await;
        let (status, body) = status_h2(&mut sender, "/fn/hello/").await;
        assert_eq!(status, 200, "{body}");
        // URLs in answers name the authority the client used, with https.
        let (status, body) = status_h2(&mut sender, "/v1/functions/hello").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["url"], "https://localhost/fn/hello/", "{v}");
        // ...HTTP/1.1 when it offers only that.
        let tls = connect(&addr, pki.ca_der(), &[b"http/1.1"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = sender.send_request(get("/healthz")).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_11);
    });
}

#[test]
fn sighup_reloads_the_certificate_and_open_connections_keep_working() {
    let pki = Pki::new();
    let first = pki.issue();
    let server = start_tls(&pki);
    let addr = addr(&server);
    runtime().block_on(async {
        let (mut open, seen) = h2(&addr, pki.ca_der()).await;
        assert_eq!(seen, first.to_vec());
        assert_eq!(status_h2(&mut open, "/healthz").await.0, 200);

        let second = pki.issue();
        server.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, seen) = h2(&addr, pki.ca_der()).await;
            if seen == second.to_vec() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the new certificate was never presented:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The connection opened before the reload still serves.
        assert_eq!(status_h2(&mut open, "/healthz").await.0, 200);

        // A broken file is not taken: the reload is refused and the pair in use stays.
        std::fs::write(
            pki.dir.join("cert.pem"),
            "-----BEGIN CERTIFICATE-----\nnope\n",
        )
        .unwrap();
        server.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.log().contains("TLS certificate not reloaded") {
            assert!(
                Instant::now() < deadline,
                "no refusal logged:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (mut fresh, seen) = h2(&addr, pki.ca_der()).await;
        assert_eq!(seen, second.to_vec());
        assert_eq!(status_h2(&mut fresh, "/healthz").await.0, 200);
        assert_eq!(status_h2(&mut open, "/healthz").await.0, 200);
    });
    let log = server.log();
    assert!(
        log.contains("cert.pem"),
        "the refusal names the file:\n{log}"
    );
}

#[test]
fn a_bad_certificate_or_key_stops_the_start_with_the_file_named() {
    let pki = Pki::new();
    pki.issue();
    // A key that belongs to another certificate.
    let other = KeyPair::generate().unwrap();
    let wrong_key = pki.dir.join("other-key.pem");
    std::fs::write(&wrong_key, other.serialize_pem()).unwrap();
    let args = vec![
        "--tls-cert".to_string(),
        pki.dir.join("cert.pem").display().to_string(),
        "--tls-key".to_string(),
        wrong_key.display().to_string(),
    ];
    let launch = Launch {
        args,
        ..Launch::default()
    };
    let log = TestServer::launch(temp_dir("data"), None, launch)
        .err()
        .expect("a mismatched key must not start");
    assert!(
        log.contains("other-key.pem") && log.contains("does not fit"),
        "{log}"
    );

    // A certificate file that does not exist, given through the config file.
    let dir = temp_dir("data");
    let config = dir.join("kiln.toml");
    let missing = pki.dir.join("missing.pem");
    std::fs::write(
        &config,
        format!(
            "[server]\ntls_cert = {:?}\ntls_key = {:?}\n",
            missing.display().to_string(),
            pki.dir.join("key.pem").display().to_string()
        ),
    )
    .unwrap();
    let log = TestServer::launch(dir, Some(config), Launch::default())
        .err()
        .expect("a missing certificate must not start");
    assert!(log.contains("missing.pem"), "{log}");
}

#[test]
fn plain_http_beyond_loopback_is_served_with_a_warning() {
    let launch = Launch {
        args: vec!["--listen".into(), "0.0.0.0:0".into()],
        ..Launch::default()
    };
    let server = TestServer::launch(temp_dir("data"), None, launch).unwrap();
    assert_eq!(server.get("/healthz").status, 200);
    let log = server.log();
    assert!(
        log.contains("WARN") && log.contains("clear text") && log.contains("--tls-cert"),
        "{log}"
    );
    // On loopback, plain http warns of nothing; SIGHUP without TLS is logged, not fatal.
    let local = TestServer::start();
    local.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !local.log().contains("no TLS certificate to reload") {
        assert!(Instant::now() < deadline, "{}", local.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(local.get("/healthz").status, 200);
    assert!(!local.log().contains("clear text"), "{}", local.log());
}

#[test]
fn the_cli_keeps_keys_off_plain_http_and_gives_up_on_a_silent_server() {
    // A key to a host beyond loopback over http: refused before anything is sent.
    let out = std::process::Command::new(kiln_tests::kiln_bin())
        .args(["functions", "--server", "http://192.0.2.1:8080"])
        .env("KILN_API_KEY", "kiln-secret")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--allow-http") && err.contains("192.0.2.1"),
        "{err}"
    );

    // A server that accepts and never answers: the CLI stops at --timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let (conn, _) = silent.accept().unwrap();
        std::thread::sleep(Duration::from_secs(30));
        drop(conn);
    });
    let out = std::process::Command::new(kiln_tests::kiln_bin())
        .args(["functions", "--server", &url, "--timeout", "1s"])
        .env("KILN_API_KEY", "kiln-secret")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("timeout") || err.contains("timed out"),
        "{err}"
    );
    drop(held);
}
