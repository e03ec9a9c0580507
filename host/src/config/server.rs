//! The `[server]` table: what bounds the HTTP front door's memory and connections, so a
//! flood (many connections, many HTTP/2 streams, large bodies) is answered with fast
//! refusals instead of growth.

use std::path::PathBuf;

use serde::Deserialize;

/// Default cap on open client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default cap on concurrent HTTP/2 streams per connection.
pub const DEFAULT_H2_MAX_STREAMS: u32 = 128;
/// Default time a connection may stay without a request before it is closed.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Default interval of HTTP/2 keep-alive pings (a peer that does not answer one within
/// the same time is gone).
pub const DEFAULT_H2_KEEPALIVE_MS: u64 = 20_000;
/// Default HTTP/2 receive window of a connection, over its streams, in KiB.
pub const DEFAULT_H2_WINDOW_KB: u32 = 1024;
/// Default budget of request body bytes held in memory at once, over all requests.
pub const DEFAULT_BODY_BUFFER_MB: u64 = 256;
/// Default part of the body budget one tenant's requests may hold, in percent.
pub const DEFAULT_BODY_BUFFER_TENANT_PERCENT: u64 = 50;
/// Default floor under the rate a client sends a request body at, in bytes per second.
pub const DEFAULT_MIN_BODY_BYTES_PER_S: u64 = 1024;
/// Default waiting a request body is allowed before that floor applies.
pub const DEFAULT_MIN_BODY_RATE_GRACE_MS: u64 = 10_000;

/// Front-door limits (`[server]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimits {
    /// Open client connections at most; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams a connection may open; more are refused by the
    /// protocol (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub h2_max_streams: u32,
    /// A connection with no request in progress for this long is closed gracefully
    /// (HTTP/1 keep-alive and HTTP/2 alike), in milliseconds.
    pub idle_timeout_ms: u64,
    /// HTTP/2 keep-alive ping interval and timeout, in milliseconds.
    pub h2_keepalive_ms: u64,
    /// HTTP/2 receive window of a connection, in KiB: the unread request bytes one
    /// connection's streams may hold at once (each stream at most 64 KiB of it). Streams
    /// waiting for admission hold theirs, so a connection with more uploads queued than
    /// fit stalls until they are admitted.
    pub h2_window_kb: u32,
    /// Request body bytes buffered whole at once (the response-cache key, shadow copies),
    /// over all requests, in MiB; a request that would exceed it is answered 503
    /// `server.busy` at once. Streamed bodies are not buffered and not counted.
    pub body_buffer_mb: u64,
    /// The part of `body_buffer_mb` one tenant's requests may hold at once, in percent
    /// (its keys' calls, and anyone's calls to its public functions): a flood aimed at
    /// one tenant is refused within its part and leaves the rest to the others.
    pub body_buffer_tenant_percent: u64,
    /// The slowest a client may send a request body, in bytes per second on average over
    /// the time the server waited for it (0: no floor); slower is cut off with 408
    /// `request.timeout` (or a read error in the guest), so a trickled upload cannot hold
    /// a connection, a slot or buffer space for as long as it likes.
    pub min_body_bytes_per_s: u64,
    /// Waiting for a body allowed before `min_body_bytes_per_s` applies, in milliseconds.
    pub min_body_rate_grace_ms: u64,
    /// PEM certificate chain served over TLS (with `tls_key`; `--tls-cert` and
    /// `KILN_TLS_CERT` override it).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (`--tls-key`, `KILN_TLS_KEY`).
    pub tls_key: Option<PathBuf>,
    /// The URL clients reach this server at (behind a proxy or a load balancer), used in
    /// the URLs the API returns; unset: the request's `Host` with this server's scheme.
    pub public_url: Option<String>,
    /// One log line per request (target `kiln::access`): request id, tenant, function,
    /// version, status, outcome, duration... (`--access-log`, `KILN_ACCESS_LOG`).
    pub access_log: bool,
}

/// The certificate chain and private key files of the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            h2_max_streams: DEFAULT_H2_MAX_STREAMS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            h2_keepalive_ms: DEFAULT_H2_KEEPALIVE_MS,
            h2_window_kb: DEFAULT_H2_WINDOW_KB,
            body_buffer_mb: DEFAULT_BODY_BUFFER_MB,
            body_buffer_tenant_percent: DEFAULT_BODY_BUFFER_TENANT_PERCENT,
            min_body_bytes_per_s: DEFAULT_MIN_BODY_BYTES_PER_S,
            min_body_rate_grace_ms: DEFAULT_MIN_BODY_RATE_GRACE_MS,
            tls_cert: None,
            tls_key: None,
            public_url: None,
            access_log: false,
        }
    }
}

impl ServerLimits {
    /// Checks the values; the caller names the table.
    pub fn validate(&self, max_body_bytes: u64) -> anyhow::Result<()> {
        if self.max_connections == 0 || self.h2_max_streams == 0 {
            anyhow::bail!("server.max_connections and server.h2_max_streams must be at least 1");
        }
        if self.idle_timeout_ms == 0 || self.h2_keepalive_ms == 0 {
            anyhow::bail!("server.idle_timeout_ms and server.h2_keepalive_ms must be at least 1");
        }
        // HTTP/2 windows are at least 64 KiB and at most 2^31 - 1 bytes.
        if !(64..=2_097_151).contains(&self.h2_window_kb) {
            anyhow::bail!("server.h2_window_kb must be between 64 and 2097151");
        }
        if self.body_buffer_mb == 0 || self.body_buffer_mb > 1 << 20 {
            anyhow::bail!("server.body_buffer_mb must be between 1 and 1048576");
        }
        if let Some(url) = &self.public_url {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| anyhow::anyhow!("server.public_url {url:?}: {e}"))?;
            let bare = matches!(uri.path_and_query().map(|p| p.as_str()), None | Some("/"))
                && !url.ends_with('/');
            if !matches!(uri.scheme_str(), Some("http" | "https"))
                || uri.authority().is_none()
                || !bare
            {
                anyhow::bail!(
                    "server.public_url {url:?}: want scheme://host[:port] with no path, e.g. https://kiln.example.com"
                );
            }
        }
        // A grace under a second would cut off clients whose first bytes are merely slow
        // (a TLS handshake, a stalled TCP window) before the rate means anything.
        if self.min_body_bytes_per_s > 0 && self.min_body_rate_grace_ms < 1000 {
            anyhow::bail!(
                "server.min_body_rate_grace_ms must be at least 1000 while server.min_body_bytes_per_s is on (0 turns the floor off)"
            );
        }
        if !(1..=100).contains(&self.body_buffer_tenant_percent) {
            anyhow::bail!("server.body_buffer_tenant_percent must be between 1 and 100");
        }
        // Every body the server may buffer must fit in a tenant's part, or such requests
        // could never run.
        if self.body_buffer_tenant_bytes() < max_body_bytes {
            anyhow::bail!(
                "a tenant's part of server.body_buffer_mb ({} MiB x {}% = {} bytes) is smaller than max_body_bytes ({max_body_bytes})",
                self.body_buffer_mb,
                self.body_buffer_tenant_percent,
                self.body_buffer_tenant_bytes()
            );
        }
        Ok(())
    }

    /// The TLS pair, from the flags (`cert`, `key`) over the table's; both files or none.
    pub fn tls(
        &self,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> anyhow::Result<Option<TlsFiles>> {
        let cert = cert.or_else(|| self.tls_cert.clone());
        let key = key.or_else(|| self.tls_key.clone());
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
            (None, None) => Ok(None),
            (Some(_), None) => anyhow::bail!(
                "a TLS certificate needs its key: --tls-key (KILN_TLS_KEY, [server] tls_key)"
            ),
            (None, Some(_)) => anyhow::bail!(
                "a TLS key needs its certificate: --tls-cert (KILN_TLS_CERT, [server] tls_cert)"
            ),
        }
    }

    /// The body budget in bytes.
    pub fn body_buffer_bytes(&self) -> u64 {
        self.body_buffer_mb << 20
    }

    /// The part of the body budget one tenant may hold, in bytes.
    pub fn body_buffer_tenant_bytes(&self) -> u64 {
        self.body_buffer_bytes() * self.body_buffer_tenant_percent / 100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_limits_are_refused_naming_the_setting() {
        let max_body = 16 << 20;
        assert!(ServerLimits::default().validate(max_body).is_ok());
        let refused = |change: fn(&mut ServerLimits)| {
            let mut c = ServerLimits::default();
            change(&mut c);
            c.validate(max_body).map_err(|e| e.to_string()).unwrap_err()
        };
        assert!(
            refused(|c| c.min_body_rate_grace_ms = 300).contains("min_body_rate_grace_ms"),
            "a grace too short to judge a rate"
        );
        assert!(refused(|c| c.body_buffer_tenant_percent = 0).contains("tenant_percent"));
        assert!(refused(|c| c.max_connections = 0).contains("max_connections"));
        // With the floor off, the grace means nothing and any value is fine.
        let mut off = ServerLimits::default();
        (off.min_body_bytes_per_s, off.min_body_rate_grace_ms) = (0, 0);
        assert!(off.validate(max_body).is_ok());
    }
}
