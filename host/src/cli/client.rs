//! A small blocking client for the Kiln HTTP API, turning `{"error":{...}}` answers into
//! readable errors. It speaks https (rustls, the public roots or a private CA), gives up
//! on a server that stops answering, and keeps API keys off plain http beyond loopback.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

/// How the client reaches the server.
#[derive(Debug, Clone, Default)]
pub struct Connect {
    /// PEM certificates of a private CA, trusted instead of the public roots.
    pub ca_cert: Option<PathBuf>,
    /// Send the key over plain http to a host beyond loopback anyway.
    pub allow_http: bool,
    /// Longest wait to connect and for each read or write (`None`: no limit).
    pub timeout: Option<Duration>,
}

/// Client of one Kiln server.
pub struct Client {
    base: String,
    agent: ureq::Agent,
    /// `authorization` header value, when an API key was given.
    bearer: Option<String>,
}

impl Client {
    /// A client for `base` (e.g. `https://kiln.example.com`) sending `api_key` (if any)
    /// as `authorization: Bearer`. Refuses to send a key over plain http to a host beyond
    /// loopback unless `connect.allow_http`.
    pub fn new(base: &str, api_key: Option<&str>, connect: &Connect) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        let uri: http::Uri = base
            .parse()
            .with_context(|| format!("server URL {base:?} is not a URL"))?;
        let bearer = api_key
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| format!("Bearer {k}"));
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") => {
                let host = uri.host().unwrap_or_default();
                if bearer.is_some() && !connect.allow_http && !is_loopback(host) {
                    bail!(
                        "refusing to send the API key over plain http to {host}: anyone on the path could read and reuse it. Use https://, or pass --allow-http if the network is trusted"
                    );
                }
            }
            _ => bail!("server URL {base:?} must start with http:// or https://"),
        }
        let mut tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ));
        if let Some(path) = &connect.ca_cert {
            tls = tls.root_certs(read_ca(path)?);
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls.build())
            .timeout_resolve(connect.timeout)
            .timeout_connect(connect.timeout)
            .timeout_per_read(connect.timeout)
            .timeout_per_write(connect.timeout)
            .build()
            .into();
        Ok(Client {
            base,
            agent,
            bearer,
        })
    }

    /// The `authorization` header value, if a key was given.
    pub fn bearer(&self) -> Option<&str> {
        self.bearer.as_deref()
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.bearer {
            Some(b) => req.header("authorization", b),
            None => req,
        }
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The underlying agent, for requests the helpers below do not cover.
    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET a JSON document.
    pub fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.auth(self.agent.get(self.url(path))))
    }

    /// GETs every page of a list (`key` holds the items; `next_cursor` the next page),
    /// stopping once `max` items are in. Returns the first page's answer with all the items.
    pub fn get_all(&self, path: &str, key: &str, max: Option<usize>) -> anyhow::Result<Value> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut first = self.get_json(path)?;
        let mut items = first[key].as_array().cloned().unwrap_or_default();
        let mut cursor = first["next_cursor"].as_str().map(str::to_string);
        while let Some(c) = cursor.filter(|_| max.is_none_or(|m| items.len() < m)) {
            let page = self.get_json(&format!("{path}{sep}cursor={c}"))?;
            items.extend(page[key].as_array().cloned().unwrap_or_default());
            cursor = page["next_cursor"].as_str().map(str::to_string);
        }
        if let Some(m) = max {
            items.truncate(m);
        }
        first[key] = Value::Array(items);
        first["next_cursor"] = Value::Null;
        Ok(first)
    }

    /// GET a text document (an error answer becomes an error).
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let mut resp = self
            .auth(self.agent.get(self.url(path)))
            .call()
            .with_context(|| format!("connecting to {}", self.base))?;
        if !resp.status().is_success() {
            json_or_error(resp)?;
            bail!("the server refused the request");
        }
        resp.body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .context("reading the server's answer")
    }

    /// DELETE, returning the JSON answer.
    pub fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.auth(self.agent.delete(self.url(path))))
    }

    fn call(
        &self,
        req: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> anyhow::Result<Value> {
        let resp = req
            .call()
            .with_context(|| format!("connecting to {}", self.base))?;
        json_or_error(resp)
    }

    /// Whether the server has a blob.
    pub fn has_blob(&self, digest: &str) -> anyhow::Result<bool> {
        let resp = self
            .auth(self.agent.head(self.url(&format!("/v1/blobs/{digest}"))))
            .call()
            .with_context(|| format!("connecting to {}", self.base))?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            401 | 403 => json_or_error(resp).map(|_| false),
            s => bail!("HEAD blob {digest}: unexpected status {s}"),
        }
    }

    /// Uploads a blob from a reader of `len` bytes.
    pub fn put_blob(&self, digest: &str, len: u64, reader: &mut dyn Read) -> anyhow::Result<Value> {
        let resp = self
            .auth(self.agent.put(self.url(&format!("/v1/blobs/{digest}"))))
            .header("content-type", "application/octet-stream")
            .header("content-length", len.to_string())
            .send(ureq::SendBody::from_reader(reader))
            .with_context(|| format!("uploading to {}", self.base))?;
        json_or_error(resp)
    }

    /// PUTs a JSON document.
    pub fn put_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self
            .auth(self.agent.put(self.url(path)))
            .header("content-type", "application/json")
            .send(body.to_string())
            .with_context(|| format!("connecting to {}", self.base))?;
        json_or_error(resp)
    }

    /// POSTs a JSON document.
    pub fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.post_bytes(path, body.to_string().as_bytes(), &[])
    }

    /// POSTs JSON text as given (signed manifests are sent byte for byte), with extra headers.
    pub fn post_bytes(
        &self,
        path: &str,
        json: &[u8],
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Value> {
        self.post_with(self.agent.post(self.url(path)), json, headers)
    }

    /// As [`post_bytes`](Self::post_bytes), waiting as long as the server takes to answer:
    /// a deploy's answer comes once the component is compiled, which may take minutes.
    pub fn post_waiting(
        &self,
        path: &str,
        json: &[u8],
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Value> {
        let req = self
            .agent
            .post(self.url(path))
            .config()
            .timeout_per_read(None)
            .build();
        self.post_with(req, json, headers)
    }

    fn post_with(
        &self,
        req: ureq::RequestBuilder<ureq::typestate::WithBody>,
        json: &[u8],
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Value> {
        let mut req = self.auth(req).header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req
            .send(json)
            .with_context(|| format!("connecting to {}", self.base))?;
        json_or_error(resp)
    }
}

/// Whether `host` (as a URL spells it) is this machine: plain http stays on it.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The certificates of a private CA's PEM file.
fn read_ca(path: &std::path::Path) -> anyhow::Result<ureq::tls::RootCerts> {
    let pem =
        std::fs::read(path).with_context(|| format!("reading --ca-cert {}", path.display()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(c) =
            item.with_context(|| format!("--ca-cert {}: not PEM", path.display()))?
        {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        bail!(
            "--ca-cert {}: no PEM certificate in the file",
            path.display()
        );
    }
    Ok(ureq::tls::RootCerts::new_with_certs(&certs))
}

/// An error answer of the API, as the server gave it: what `--output json` prints, and
/// what callers match on.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({code}, HTTP {status})")]
pub struct ApiFailure {
    /// The HTTP status.
    pub status: u16,
    /// The stable code (`function.not_found`), or `http.<status>` when the answer had none.
    pub code: String,
    pub message: String,
}

impl ApiFailure {
    /// The error as `{"error":{"code","message","status"}}`, for any error the CLI ends
    /// with: an API failure keeps its code; anything else (a file, the network, the
    /// arguments) is `cli.error`.
    pub fn json_of(e: &anyhow::Error) -> Value {
        match e.chain().find_map(|c| c.downcast_ref::<ApiFailure>()) {
            Some(f) => serde_json::json!({"error": {
                "code": f.code, "message": format!("{e:#}"), "status": f.status}}),
            None => {
                serde_json::json!({"error": {"code": "cli.error", "message": format!("{e:#}")}})
            }
        }
    }
}

/// The JSON body of a 2xx answer, or the server's error (an [`ApiFailure`]).
/// The failing cases of a refused validation, one line each (the first ten).
fn failed_cases(validation: &Value) -> String {
    let failed: Vec<&Value> = validation["results"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|r| r["passed"] == false)
        .collect();
    let mut out = String::new();
    for r in failed.iter().take(10) {
        let text = |k: &str| match &r[k] {
            Value::Null => "-".to_string(),
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        out.push_str(&format!(
            "\n  line {}: status {} (expected {}), predicted {} (expected {}){}",
            r["line"],
            text("status"),
            match &r["expected_status"] {
                Value::Null => "2xx".to_string(),
                v => v.to_string(),
            },
            text("prediction"),
            text("label"),
            r["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    if failed.len() > 10 {
        out.push_str(&format!("\n  ... and {} more", failed.len() - 10));
    }
    out
}

pub fn json_or_error(mut resp: http::Response<ureq::Body>) -> anyhow::Result<Value> {
    let status = resp.status();
    let text = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .context("reading the server's answer")?;
    if status.is_success() {
        if text.is_empty() {
            return Ok(Value::Null);
        }
        return serde_json::from_str(&text)
            .with_context(|| format!("server sent invalid JSON: {text}"));
    }
    let (code, message) = match serde_json::from_str::<Value>(&text) {
        Ok(v) if v["error"]["message"].is_string() => (
            v["error"]["code"].as_str().map(str::to_string),
            format!(
                "{}{}",
                v["error"]["message"].as_str().unwrap_or_default(),
                failed_cases(&v["error"]["validation"])
            ),
        ),
        _ => (None, text),
    };
    Err(ApiFailure {
        status: status.as_u16(),
        code: code.unwrap_or_else(|| format!("http.{}", status.as_u16())),
        message,
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_kept_off_plain_http_beyond_loopback() {
        let plain = Connect::default();
        for url in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:8080",
        ] {
            assert!(Client::new(url, Some("k"), &plain).is_ok(), "{url}");
        }
        let err = Client::new("http://10.0.0.5:8080", Some("k"), &plain)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("--allow-http") && err.contains("10.0.0.5"),
            "{err}"
        );
        // Without a key nothing secret is sent; with --allow-http the operator chose.
        assert!(Client::new("http://10.0.0.5:8080", None, &plain).is_ok());
        let allowed = Connect {
            allow_http: true,
            ..Connect::default()
        };
        assert!(Client::new("http://10.0.0.5:8080", Some("k"), &allowed).is_ok());
        assert!(Client::new("https://10.0.0.5", Some("k"), &plain).is_ok());
        assert!(Client::new("ftp://10.0.0.5", None, &plain).is_err());
    }
}
