//! TLS on the listener: the certificate and key from PEM files (`--tls-cert`,
//! `--tls-key`), HTTP/2 and HTTP/1.1 offered by ALPN, and the pair read again on SIGHUP.
//!
//! A reload only changes what new handshakes present: connections already open keep
//! the session they negotiated, so renewing a certificate drops nobody. A reload that
//! fails (a half-written file, a key that does not match) keeps the pair in use and
//! logs why.

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::config::TlsFiles;

/// The pair the listener presents, replaced as a whole by [`Certificates::reload`].
pub struct Certificates {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Certificates {
    /// Reads the pair; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<Self>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let pair = read_pair(&files, &provider)?;
        tracing::info!(
            cert = %files.cert.display(),
            fingerprint = %fingerprint(&pair),
            "TLS certificate loaded"
        );
        Ok(Arc::new(Certificates {
            files,
            provider,
            current: RwLock::new(Arc::new(pair)),
        }))
    }

    /// Reads the files again and presents the new pair from the next handshake on; on
    /// an error the pair in use stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let pair = read_pair(&self.files, &self.provider)?;
        let fingerprint = fingerprint(&pair);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(pair);
        tracing::info!(cert = %self.files.cert.display(), %fingerprint, "TLS certificate reloaded");
        Ok(())
    }

    /// The rustls configuration of the listener: this pair, h2 then HTTP/1.1 by ALPN.
    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Handles every SIGHUP for as long as the process runs: reloads `certs`, or, without
/// TLS, logs that there is nothing to reload.
pub fn on_sighup(certs: Option<Arc<Certificates>>) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match &certs {
                    Some(certs) => {
                        if let Err(e) = certs.reload() {
                            tracing::error!(
                                "TLS certificate not reloaded, the previous one stays in use: {e:#}"
                            );
                        }
                    }
                    None => tracing::info!("SIGHUP: no TLS certificate to reload"),
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = certs;
    Ok(())
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn read_pair(files: &TlsFiles, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let chain = read_chain(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        anyhow::anyhow!(
            "TLS key {}: {} (want a PEM private key)",
            files.key.display(),
            pem_error(&e)
        )
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        anyhow::anyhow!(
            "TLS key {} does not fit certificate {}: {e}",
            files.key.display(),
            files.cert.display()
        )
    })
}

/// A PEM certificate chain, at least one certificate long.
pub fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("TLS certificate {}: {}", path.display(), pem_error(&e)))?;
    if chain.is_empty() {
        anyhow::bail!(
            "TLS certificate {}: no PEM certificate in the file",
            path.display()
        );
    }
    Ok(chain)
}

fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM item of that kind in the file".into(),
        other => format!("{other:?}"),
    }
}

/// SHA-256 of the leaf certificate's DER, in lowercase hex (what `openssl x509
/// -fingerprint -sha256` shows, without its colons and upper case).
fn fingerprint(pair: &CertifiedKey) -> String {
    pair.cert
        .first()
        .map(|c| hex::encode(Sha256::digest(c.as_ref())))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_file_is_named() {
        let dir = std::env::temp_dir().join(format!("kiln-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let files = TlsFiles {
            cert: empty.clone(),
            key: dir.join("absent.pem"),
        };
        let err = format!("{:#}", Certificates::load(files).unwrap_err());
        assert!(err.contains("empty.pem") && err.contains("no PEM"), "{err}");
        let files = TlsFiles {
            cert: dir.join("absent.pem"),
            key: empty,
        };
        let err = format!("{:#}", Certificates::load(files).unwrap_err());
        assert!(err.contains("absent.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
