//! A small blocking client for the Kiln HTTP API, turning `{"error":{...}}` answers into
//! readable errors.

use std::io::Read;

use anyhow::{Context, bail};
use serde_json::Value;

/// Client of one Kiln server.
pub struct Client {
    base: String,
    agent: ureq::Agent,
    /// `authorization` header value, when an API key was given.
    bearer: Option<String>,
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:8080`) sending `api_key` (if any) as
    /// `authorization: Bearer`.
    pub fn new(base: &str, api_key: Option<&str>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent,
            bearer: api_key
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(|k| format!("Bearer {k}")),
        }
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
        let mut req = self
            .auth(self.agent.post(self.url(path)))
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req
            .send(json)
            .with_context(|| format!("connecting to {}", self.base))?;
        json_or_error(resp)
    }
}

/// The JSON body of a 2xx answer, or the server's error message as an error.
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
    match serde_json::from_str::<Value>(&text) {
        Ok(v) if v["error"]["message"].is_string() => bail!(
            "{} ({}, HTTP {})",
            v["error"]["message"].as_str().unwrap_or_default(),
            v["error"]["code"].as_str().unwrap_or("error"),
            status.as_u16()
        ),
        _ => bail!("HTTP {}: {text}", status.as_u16()),
    }
}
