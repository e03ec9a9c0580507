//! Outbound HTTP from guests: denied unless the version's `allowed_outbound_hosts` names
//! the address. A denied call fails in the guest before any connection is made, with an
//! error that names the address; an allowed one runs with a host-side deadline on the
//! whole exchange (connect, TLS, headers and body), so no guest can hold a socket open.
//!
//! Patterns: `[scheme://]host[:port]`. `scheme` is `http`, `https` or `*` (default: both);
//! `host` is a name or IP, or `*.example.com` for any subdomain; `port` is a number or `*`
//! (default: the scheme's, 80 or 443).

use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Scheme;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// `None`: http and https.
    https: Option<bool>,
    host: HostMatch,
    port: PortMatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Exact(String),
    /// `*.suffix`: any name ending in `.suffix`.
    Subdomain(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortMatch {
    /// The scheme's port: 80 or 443.
    Default,
    Exact(u16),
    Any,
}

impl FromStr for HostPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("allowed_outbound_hosts entry {s:?}: {why}");
        let (https, rest) = match s.split_once("://") {
            Some(("http", r)) => (Some(false), r),
            Some(("https", r)) => (Some(true), r),
            Some(("*", r)) => (None, r),
            Some((other, _)) => {
                return Err(bad(&format!("scheme {other:?} is not http, https or *")));
            }
            None => (None, s),
        };
        if rest.is_empty()
            || rest.contains(['/', '@', '?', '#'])
            || rest.contains(char::is_whitespace)
        {
            return Err(bad("expected [scheme://]host[:port], with no path or user"));
        }
        let (host, port) = match rest.strip_prefix('[').and_then(|r| r.find(']')) {
            // [IPv6]: the brackets are part of the host, as in URIs.
            Some(end) => {
                let (h, after) = rest.split_at(end + 2);
                match after {
                    "" => (h, None),
                    _ => (
                        h,
                        Some(
                            after
                                .strip_prefix(':')
                                .ok_or_else(|| bad("after ']' comes :port"))?,
                        ),
                    ),
                }
            }
            None => match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            },
        };
        let port = match port {
            None => PortMatch::Default,
            Some("*") => PortMatch::Any,
            Some(p) => PortMatch::Exact(p.parse().map_err(|_| bad(&format!("port {p:?}")))?),
        };
        let host = normalize(host);
        let host = match host.strip_prefix("*.") {
            Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => {
                HostMatch::Subdomain(suffix.to_string())
            }
            _ if host.is_empty() || host.contains('*') => {
                return Err(bad("the host may only start with \"*.\" as a wildcard"));
            }
            _ => HostMatch::Exact(host),
        };
        Ok(HostPattern { https, host, port })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.https {
            Some(true) => f.write_str("https://")?,
            Some(false) => f.write_str("http://")?,
            None => f.write_str("*://")?,
        }
        match &self.host {
            HostMatch::Exact(h) => f.write_str(h)?,
            HostMatch::Subdomain(s) => write!(f, "*.{s}")?,
        }
        match self.port {
            PortMatch::Default => Ok(()),
            PortMatch::Exact(p) => write!(f, ":{p}"),
            PortMatch::Any => f.write_str(":*"),
        }
    }
}

/// Lower case, no trailing dot: the form names are compared in.
fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl HostPattern {
    fn matches(&self, https: bool, host: &str, port: u16) -> bool {
        let default_port = if https { 443 } else { 80 };
        self.https.is_none_or(|s| s == https)
            && match self.port {
                PortMatch::Default => port == default_port,
                PortMatch::Exact(p) => port == p,
                PortMatch::Any => true,
            }
            && match &self.host {
                HostMatch::Exact(h) => host == h,
                HostMatch::Subdomain(s) => host
                    .strip_suffix(s.as_str())
                    .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            }
    }
}

/// Parses and checks a version's `allowed_outbound_hosts`.
pub fn parse_patterns(entries: &[String]) -> Result<Vec<HostPattern>, String> {
    entries.iter().map(|e| e.parse()).collect()
}

/// What one version's guests may call, and how long an exchange may take.
#[derive(Debug, Clone)]
pub struct Outbound {
    allow: Arc<[HostPattern]>,
    timeout: Duration,
}

impl Outbound {
    /// Nothing allowed.
    pub fn deny_all() -> Self {
        Outbound {
            allow: Arc::from([]),
            timeout: Duration::ZERO,
        }
    }

    /// `allow` with every exchange bounded by `timeout`.
    pub fn new(allow: Vec<HostPattern>, timeout: Duration) -> Self {
        Outbound {
            allow: allow.into(),
            timeout,
        }
    }

    /// Checks a request's destination; the refusal names it.
    fn check(&self, uri: &http::Uri) -> Result<(), String> {
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        let scheme = if https { "https" } else { "http" };
        let Some(authority) = uri.authority() else {
            return Err("an outbound request with no host".into());
        };
        let host = normalize(authority.host());
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let address = format!("{scheme}://{host}:{port}");
        // A user part (`allowed.com@evil.com`) would connect elsewhere than its host says.
        if authority.as_str().contains('@')
            || !self.allow.iter().any(|p| p.matches(https, &host, port))
        {
            return Err(format!(
                "outbound HTTP to {address} is not allowed (allowed_outbound_hosts: {})",
                if self.allow.is_empty() {
                    "none".to_string()
                } else {
                    self.allow
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
        Ok(())
    }
}

type IoFuture = Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>;
type SendResult = wasmtime_wasi_http::Result<(http::Response<WasiBody>, IoFuture)>;

/// The `wasi:http` hooks of one request: the version's [`Outbound`] policy.
pub(super) struct OutboundHooks(pub(super) Outbound);

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        if let Err(why) = self.0.check(request.uri()) {
            tracing::info!(uri = %request.uri(), "guest outbound request denied");
            return Box::new(async move { Err(Error::InternalError(Some(why))) });
        }
        let timeout = self.0.timeout;
        let deadline = Instant::now() + timeout;
        let cap = |d: Option<Duration>| Some(d.map_or(timeout, |d| d.min(timeout)));
        let asked = options.unwrap_or_default();
        let options = RequestOptions {
            connect_timeout: cap(asked.connect_timeout),
            first_byte_timeout: cap(asked.first_byte_timeout),
            between_bytes_timeout: cap(asked.between_bytes_timeout),
        };
        Box::new(async move {
            let (resp, io) = tokio::time::timeout_at(
                deadline,
                wasmtime_wasi_http::default_send_request(request, Some(options)),
            )
            .await
            .map_err(|_| Error::HttpResponseTimeout)??;
            let resp = resp.map(|body| {
                Deadline {
                    inner: body.boxed_unsync(),
                    sleep: Box::pin(tokio::time::sleep_until(deadline)),
                }
                .boxed_unsync()
            });
            let io = async move {
                tokio::time::timeout_at(deadline, io)
                    .await
                    .unwrap_or(Err(Error::HttpResponseTimeout))
            };
            Ok((resp, Box::new(io) as IoFuture))
        })
    }
}

/// A response body that fails once the exchange's deadline passes.
struct Deadline {
    inner: WasiBody,
    sleep: Pin<Box<Sleep>>,
}

impl Body for Deadline {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Error::HttpResponseTimeout))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound(patterns: &[&str]) -> Outbound {
        let entries: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        Outbound::new(
            parse_patterns(&entries).unwrap_or_else(|e| panic!("{e}")),
            Duration::from_secs(1),
        )
    }

    fn allowed(o: &Outbound, uri: &str) -> bool {
        o.check(&uri.parse().unwrap_or_else(|e| panic!("{e}")))
            .is_ok()
    }

    #[test]
    fn patterns_allow_exact_hosts_ports_and_wildcards() {
        let o = outbound(&[
            "https://api.example.com",
            "http://127.0.0.1:8080",
            "*.models.dev:*",
            "http://[::1]:9000",
        ]);
        assert!(allowed(&o, "http://[::1]:9000/"));
        assert!(!allowed(&o, "http://[::1]:9001/"));
        assert!(allowed(&o, "https://api.example.com/v1"));
        assert!(
            allowed(&o, "https://API.example.com./v1"),
            "case and a trailing dot"
        );
        assert!(!allowed(&o, "http://api.example.com/"), "scheme");
        assert!(!allowed(&o, "https://api.example.com:8443/"), "port");
        assert!(!allowed(&o, "https://example.com/"));
        assert!(allowed(&o, "http://127.0.0.1:8080/"));
        assert!(!allowed(&o, "http://127.0.0.1:8081/"));
        assert!(allowed(&o, "http://a.models.dev:9000/"));
        assert!(allowed(&o, "https://a.b.models.dev/"));
        assert!(
            !allowed(&o, "https://models.dev/"),
            "the wildcard needs a subdomain"
        );
        assert!(!allowed(&o, "https://evilmodels.dev/"));
        assert!(
            !allowed(&o, "https://api.example.com@evil.com/"),
            "no user part"
        );
        let why = o
            .check(&"http://10.0.0.1/".parse().unwrap_or_else(|e| panic!("{e}")))
            .expect_err("denied");
        assert!(why.contains("http://10.0.0.1:80"), "{why}");
        assert!(!allowed(&Outbound::deny_all(), "https://api.example.com/"));
    }

    #[test]
    fn bad_patterns_say_why() {
        for bad in [
            "ftp://x.com",
            "x.com/path",
            "user@x.com",
            "*",
            "a.*.com",
            "x.com:http",
            "",
        ] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad}");
        }
        let p: HostPattern = "*.x.com:*".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.to_string(), "*://*.x.com:*");
    }
}
