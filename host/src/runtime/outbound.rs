//! Outbound HTTP from guests: denied unless the version's `allowed_outbound_hosts` names
//! the address. A denied call fails in the guest before any connection is made, with an
//! error that names the address; an allowed one runs with a host-side deadline on the
//! whole exchange (connect, TLS, headers and body), so no guest can hold a socket open.
//!
//! Patterns: `[scheme://]host[:port]`. `scheme` is `http`, `https` or `*` (default: both);
//! `host` is a name or IP, or `*.example.com` for any subdomain; `port` is a number or `*`
//! (default: the scheme's, 80 or 443).
//!
//! Whatever a manifest allows, a destination that is or resolves to a loopback, private,
//! link-local or otherwise non-public address is refused unless the operator turned
//! `[runtime] allow_private_outbound` on: a tenant cannot point its guest at the server
//! itself, the cloud metadata service or the internal network. A plain-HTTP request is sent
//! to the address that was checked (no second lookup to rebind); HTTPS connects by name,
//! and the certificate must match it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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

use super::breaker::Breakers;
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
    /// Private, loopback and link-local destinations are reachable (operator's choice).
    allow_private: bool,
    /// The function whose guests call out, and the node's breakers they go through.
    function: Arc<str>,
    breakers: Arc<Breakers>,
}

impl Outbound {
    /// Nothing allowed.
    pub fn deny_all() -> Self {
        Outbound {
            allow: Arc::from([]),
            timeout: Duration::ZERO,
            allow_private: false,
            function: Arc::from(""),
            breakers: Breakers::off(),
        }
    }

    /// `allow` with every exchange bounded by `timeout`; non-public addresses only with
    /// `allow_private`.
    pub fn new(allow: Vec<HostPattern>, timeout: Duration, allow_private: bool) -> Self {
        Outbound {
            allow: allow.into(),
            timeout,
            allow_private,
            function: Arc::from(""),
            breakers: Breakers::off(),
        }
    }

    /// The same policy, its calls going through `function`'s breakers in `breakers`.
    pub fn with_breakers(mut self, function: Arc<str>, breakers: Arc<Breakers>) -> Self {
        self.function = function;
        self.breakers = breakers;
        self
    }

    /// Checks a request's destination; returns it as `scheme://host:port`, or the refusal
    /// that names it.
    fn check(&self, uri: &http::Uri) -> Result<String, String> {
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
        Ok(address)
    }
}

type IoFuture = Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>;
type SendResult = wasmtime_wasi_http::Result<(http::Response<WasiBody>, IoFuture)>;

/// The `wasi:http` hooks of one request: the version's [`Outbound`] policy.
pub(super) struct OutboundHooks(pub(super) Outbound);

/// Whether `ip` is an address on the public internet (not loopback, private, link-local,
/// shared, multicast, reserved, unspecified, or an IPv6 form of one of those).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 198 && (18..20).contains(&b))) // benchmarking
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let o = v6.octets();
            let embedded = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
            // IPv4-mapped, NAT64 (64:ff9b::/96) and IPv4-compatible forms reach IPv4.
            if v6.to_ipv4_mapped().is_some()
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4])
                || s[..6] == [0; 6]
            {
                return is_public(IpAddr::V4(embedded));
            }
            !(v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0] == 0x2001 && s[1] == 0x0db8)) // documentation
        }
    }
}

/// Resolves a request's destination and checks every address is public (unless allowed);
/// for plain HTTP, points the request at the checked address.
async fn resolve_checked(
    request: &mut http::Request<WasiBody>,
    allow_private: bool,
) -> Result<(), String> {
    let uri = request.uri().clone();
    let https = uri.scheme() == Some(&Scheme::HTTPS);
    let authority = uri.authority().ok_or("an outbound request with no host")?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("resolving {host}: {e}"))?
            .collect(),
    };
    let first = *addrs
        .first()
        .ok_or_else(|| format!("{host} has no address"))?;
    if !allow_private && let Some(private) = addrs.iter().find(|a| !is_public(a.ip())) {
        return Err(format!(
            "outbound HTTP to {host}:{port} is not allowed: it is (or resolves to) the non-public address {} ([runtime] allow_private_outbound is off)",
            private.ip()
        ));
    }
    if !https {
        // Connect to the address just checked; the Host header keeps the name.
        let mut parts = uri.into_parts();
        parts.authority = Some(
            first
                .to_string()
                .parse()
                .map_err(|e| format!("address {first}: {e}"))?,
        );
        *request.uri_mut() =
            http::Uri::from_parts(parts).map_err(|e| format!("address {first}: {e}"))?;
    }
    Ok(())
}

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        let permit = self
            .0
            .check(request.uri())
            .and_then(|destination| self.0.breakers.admit(&self.0.function, &destination));
        let permit = match permit {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(uri = %request.uri(), "guest outbound request refused: {why}");
                return Box::new(async move { Err(Error::InternalError(Some(why))) });
            }
        };
        let allow_private = self.0.allow_private;
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
            let send = async {
                resolve_checked(&mut request, allow_private)
                    .await
                    .map_err(|why| Error::InternalError(Some(why)))?;
                wasmtime_wasi_http::default_send_request(request, Some(options)).await
            };
            let sent = tokio::time::timeout_at(deadline, send)
                .await
                .map_err(|_| Error::HttpResponseTimeout)
                .and_then(|r| r);
            // The breaker judges by the answer's head: none, or a 5xx, is a failure.
            permit.done(
                sent.as_ref()
                    .is_ok_and(|(r, _)| !r.status().is_server_error()),
            );
            let (resp, io) = sent?;
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
            false,
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
            !allowed(&o, "https://evil.com@api.example.com/"),
            "no user part"
        );
        let why = o
            .check(&"http://10.0.0.1/".parse().unwrap_or_else(|e| panic!("{e}")))
            .expect_err("denied");
        assert!(why.contains("http://10.0.0.1:80"), "{why}");
        assert!(!allowed(&Outbound::deny_all(), "https://api.example.com/"));
    }

    #[test]
    fn only_public_addresses_are_public() {
        let public = |s: &str| is_public(s.parse().unwrap_or_else(|e| panic!("{s}: {e}")));
        for p in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(public(p), "{p}");
        }
        for p in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::7f00:1",
        ] {
            assert!(!public(p), "{p}");
        }
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
