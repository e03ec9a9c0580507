//! TLS to PostgreSQL, with libpq's `sslmode` meanings, on rustls (the provider the
//! listener and the CLI already use):
//!
//! | `sslmode` | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (default) | when the server offers it | no |
//! | `require` | always | no (as `verify-ca` when a root file is given, like libpq) |
//! | `verify-ca` | always | chain to `sslrootcert` |
//! | `verify-full` | always | chain to `sslrootcert` and the host name |
//!
//! `sslrootcert=FILE` names PEM certificates to trust, `sslrootcert=system` the bundled
//! Mozilla roots (webpki-roots): managed databases (RDS, Cloud SQL, Azure) sign with
//! public or published CAs. As in libpq, `system` means `verify-full` and refuses weaker
//! modes, and a root given with `prefer` (or no mode) is refused, not silently unused. tokio-postgres knows only `disable|prefer|require`, so
//! [`parse`] takes the rest out of the URL before it reads it.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Nothing (encryption against passive eavesdroppers only).
    Nothing,
    /// Its chain to a trusted root.
    Chain,
    /// Its chain and that it names the host connected to.
    ChainAndName,
}

/// The TLS side of a database URL: what tokio-postgres connects with.
#[derive(Clone)]
pub struct PgTls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls").finish_non_exhaustive()
    }
}

/// Reads a `postgres://` URL: the client configuration tokio-postgres understands, and the
/// TLS it is to connect with.
pub fn parse(url: &str) -> anyhow::Result<(tokio_postgres::Config, PgTls)> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut kept = Vec::new();
    let mut mode = None;
    let mut root = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => mode = Some(decode(v)?),
            "sslrootcert" => root = Some(decode(v)?),
            _ => kept.push(pair),
        }
    }
    // Like libpq: the public roots vouch for any public name, so only verify-full (the
    // host name checked too) ties the certificate to this database; it is their default.
    let system = root.as_deref() == Some("system");
    if system && mode.is_none() {
        mode = Some("verify-full".into());
    }
    let (libpq_mode, check) = match (mode.as_deref(), root.is_some()) {
        (Some(m), true) if system && m != "verify-full" => bail!(
            "invalid database URL: sslrootcert=system needs sslmode=verify-full (any public certificate chains to the public roots: only the host name check ties one to your database)"
        ),
        (None | Some("prefer" | "disable"), true) => bail!(
            "invalid database URL: sslrootcert is used only with sslmode=require, verify-ca or verify-full; name one (verify-full also checks the host name)"
        ),
        (None | Some("prefer"), false) => ("prefer", Check::Nothing),
        (Some("disable"), _) => ("disable", Check::Nothing),
        (Some("require"), false) => ("require", Check::Nothing),
        (Some("require" | "verify-ca"), true) => ("require", Check::Chain),
        (Some("verify-full"), true) => ("require", Check::ChainAndName),
        (Some(m @ ("verify-ca" | "verify-full")), false) => bail!(
            "invalid database URL: sslmode={m} needs sslrootcert=FILE (PEM certificates of the CA that signed the server's) or sslrootcert=system"
        ),
        (Some(other), _) => bail!(
            "invalid database URL: sslmode={other:?}; use disable, prefer, require, verify-ca or verify-full"
        ),
    };
    kept.push(match libpq_mode {
        "disable" => "sslmode=disable",
        "require" => "sslmode=require",
        _ => "sslmode=prefer",
    });
    let rest = format!("{base}?{}", kept.join("&"));
    let config = tokio_postgres::Config::from_str(&rest)
        .map_err(|e| anyhow::anyhow!("invalid database URL: {e}"))?;
    let roots = match (check, root.as_deref()) {
        (Check::Nothing, _) | (_, None) => None,
        (_, Some("system")) => Some(RootCertStore::from_iter(
            webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
        )),
        (_, Some(path)) => Some(read_roots(path)?),
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(Verifier {
        check,
        roots: roots.map(Arc::new),
        algorithms: provider.signature_verification_algorithms,
    });
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS to the database")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok((
        config,
        PgTls {
            config: Arc::new(tls),
        },
    ))
}

fn decode(v: &str) -> anyhow::Result<String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .with_context(|| format!("invalid database URL: bad escape in {v:?}"))?;
                out.push(hex);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).with_context(|| format!("invalid database URL: {v:?} is not UTF-8"))
}

fn read_roots(path: &str) -> anyhow::Result<RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading sslrootcert {path}"))?
    {
        let cert = cert.with_context(|| format!("reading sslrootcert {path}"))?;
        roots.add(cert).with_context(|| {
            format!("sslrootcert {path}: a certificate is not usable as a root")
        })?;
    }
    if roots.is_empty() {
        bail!("sslrootcert {path} holds no PEM certificate");
    }
    Ok(roots)
}

/// Checks the server's certificate as far as `sslmode` asks; the handshake's signatures
/// are always checked (whoever answers holds the key of the certificate it sent).
#[derive(Debug)]
struct Verifier {
    check: Check,
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if self.check == Check::ChainAndName {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = std::convert::Infallible;

    /// A host that is no DNS name or IP address (a unix socket's directory, a `hostaddr`
    /// without a host) fails only if TLS is actually attempted on it.
    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, Self::Error> {
        Ok(PgTlsConnect {
            config: self.config.clone(),
            name: ServerName::try_from(domain.to_string()).map_err(|_| domain.to_string()),
        })
    }
}

/// One connection's TLS handshake.
pub struct PgTlsConnect {
    config: Arc<rustls::ClientConfig>,
    /// The name to check the certificate against, or the host that is not a name.
    name: Result<ServerName<'static>, String>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move {
            let name = self.name.map_err(|host| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "TLS to the database needs a host name or IP address, not {host:?} (sslmode=disable for a unix socket)"
                    ),
                )
            })?;
            connector
                .connect(name, stream)
                .await
                .map(|s| PgTlsStream(Box::new(s)))
        })
    }
}

/// A TLS connection to the database.
pub struct PgTlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    /// No channel binding: SCRAM authenticates without its `-PLUS` variant; the
    /// certificate checks above are what bind the connection to the server.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::SslMode;

    #[test]
    fn sslmodes_read_as_libpq_reads_them() {
        let mode = |url: &str| parse(url).map(|(c, _)| c.get_ssl_mode());
        assert_eq!(mode("postgres://u@h/db").unwrap(), SslMode::Prefer);
        assert_eq!(
            mode("postgres://u@h/db?sslmode=disable").unwrap(),
            SslMode::Disable
        );
        assert_eq!(
            mode("postgres://u@h/db?sslmode=require").unwrap(),
            SslMode::Require
        );
        let (config, _) =
            parse("postgres://u@h/db?application_name=k&sslmode=verify-full&sslrootcert=system")
                .unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        assert_eq!(
            config.get_application_name(),
            Some("k"),
            "other options are kept"
        );
        for (url, says) in [
            ("postgres://u@h/db?sslmode=verify-full", "needs sslrootcert"),
            ("postgres://u@h/db?sslmode=verify-ca", "needs sslrootcert"),
            (
                "postgres://u@h/db?sslmode=allow-maybe",
                "use disable, prefer",
            ),
            (
                "postgres://u@h/db?sslmode=verify-ca&sslrootcert=%2Fno%2Fsuch.pem",
                "reading sslrootcert /no/such.pem",
            ),
            ("postgres://u@h/db?sslrootcert=%zz", "bad escape"),
            (
                "postgres://u@h/db?sslmode=require&sslrootcert=system",
                "needs sslmode=verify-full",
            ),
            (
                "postgres://u@h/db?sslmode=verify-ca&sslrootcert=system",
                "needs sslmode=verify-full",
            ),
            (
                "postgres://u@h/db?sslrootcert=%2Fetc%2Froot.pem",
                "used only with sslmode=require",
            ),
            (
                "postgres://u@h/db?sslmode=prefer&sslrootcert=%2Fetc%2Froot.pem",
                "used only with sslmode=require",
            ),
        ] {
            let e = format!("{:#}", parse(url).unwrap_err());
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    /// Whether the connection `url` opens is encrypted.
    async fn encrypted(url: &str) -> anyhow::Result<bool> {
        let (config, tls) = parse(url)?;
        let (client, conn) = config.connect(tls).await?;
        tokio::spawn(conn);
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    #[tokio::test]
    async fn connections_are_encrypted_and_checked_as_sslmode_says() {
        let test = "connections_are_encrypted_and_checked_as_sslmode_says";
        let Some(db) = crate::store::pg::scratch::database(test).await else {
            return;
        };
        let url = |query: &str| format!("{}?{query}", db.url);
        // What the server offers: its certificate file, when TLS is on.
        let (config, tls) = parse(&url("sslmode=disable")).unwrap();
        let (client, conn) = config.connect(tls).await.expect("plain connection");
        tokio::spawn(conn);
        let setting = |name: &'static str| {
            let client = &client;
            async move {
                let row = client.query_one(&format!("SHOW {name}"), &[]).await;
                row.map(|r| r.get::<_, String>(0)).unwrap_or_default()
            }
        };
        if setting("ssl").await != "on" {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but the PostgreSQL at {} has ssl off",
                db.url
            );
            crate::store::pg::scratch::skipped(test, "the PostgreSQL has ssl off");
            return;
        }
        assert!(!encrypted(&url("sslmode=disable")).await.unwrap());
        assert!(encrypted(&url("sslmode=require")).await.unwrap());
        assert!(
            encrypted(&db.url).await.unwrap(),
            "prefer takes TLS when offered"
        );

        // Checked against the server's own certificate (a self-signed one, here), then
        // against roots that never signed it.
        let cert_file = setting("ssl_cert_file").await;
        let Ok(pem) = std::fs::read(&cert_file) else {
            crate::store::pg::scratch::skipped(
                test,
                &format!("the server's certificate {cert_file} is not readable here"),
            );
            return;
        };
        let dir = std::env::temp_dir().join(format!("kiln-pg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("root.pem");
        std::fs::write(&root, &pem).unwrap();
        let root = root.display().to_string();
        let ca = url(&format!("sslmode=verify-ca&sslrootcert={root}"));
        assert!(
            encrypted(&ca)
                .await
                .expect("its own certificate as the root")
        );
        let e = encrypted(&url("sslrootcert=system"))
            .await
            .expect_err("public roots did not sign it");
        assert!(format!("{e:#}").contains("certificate"), "{e:#}");
        // verify-full also wants the host's name in the certificate: whichever of
        // 127.0.0.1 and localhost it names connect, the other is refused.
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(&pem).expect("a PEM certificate");
        let parsed = rustls::server::ParsedCertificate::try_from(&der).expect("parsed");
        let names = |host: &str| {
            let name = ServerName::try_from(host.to_string()).expect("a server name");
            rustls::client::verify_server_name(&parsed, &name).is_ok()
        };
        let full = url(&format!("sslmode=verify-full&sslrootcert={root}"));
        let hosts = match full.contains("127.0.0.1") {
            true => &["127.0.0.1", "localhost"][..],
            false => &[][..],
        };
        for host in hosts {
            let at = full.replace("127.0.0.1", host);
            match (names(host), encrypted(&at).await) {
                (true, Ok(on)) => assert!(on),
                (false, Err(e)) => assert!(format!("{e:#}").contains("certificate"), "{e:#}"),
                (true, Err(e)) => panic!("{host} is named by the certificate: {e:#}"),
                (false, Ok(_)) => panic!("{host} is not named by the certificate, yet accepted"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
