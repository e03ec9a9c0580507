//! Alerts: events (`drift.detected`, `accuracy.dropped`, `rollout.rolled_back`,
//! `validation.failed`, `budget.threshold`) POSTed as JSON to the webhook of `[alerts]` in the server config,
//! signed with HMAC-SHA256 (`x-kiln-signature: sha256=<hex>` over the body, keyed by the
//! configured secret), retried with exponential backoff. Events wait in a bounded queue and
//! are sent by a task of their own: never on a request's path. A full queue drops the new
//! event (logged and counted) rather than grow.
//!
//! ```toml
//! [alerts]
//! webhook = "https://hooks.example.com/kiln"
//! secret = "a long random string"
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;

/// Events waiting to be sent at most.
const QUEUE: usize = 1024;
/// Attempts per event (the first and the retries).
const ATTEMPTS: u32 = 8;
/// The first retry's delay; each next one doubles, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// One delivery attempt's limit.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-kiln-signature";

/// `[alerts]` in the server config.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Where events are POSTed (`http://` or `https://`); unset: no alerts.
    #[serde(default)]
    pub webhook: Option<String>,
    /// The HMAC-SHA256 key of `x-kiln-signature`; required with a webhook.
    #[serde(default)]
    pub secret: Option<String>,
}

impl std::fmt::Debug for AlertsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertsConfig")
            .field("webhook", &self.webhook)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl AlertsConfig {
    /// Checks the webhook's URL and that a secret signs it.
    pub fn validate(&self) -> Result<(), String> {
        let Some(url) = &self.webhook else {
            return Ok(());
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("alerts.webhook {url:?}: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "alerts.webhook {url:?} must be an http:// or https:// URL"
            ));
        }
        match &self.secret {
            Some(s) if s.len() >= 16 => Ok(()),
            _ => Err("alerts.secret (16 characters or more) must sign the webhook's events".into()),
        }
    }
}

/// One event, stamped when it happened.
#[derive(Debug, Clone)]
struct Event {
    kind: &'static str,
    at: String,
    data: serde_json::Value,
}

/// The alert sender: a queue in front of the webhook (or nothing, without one).
pub struct Alerts {
    tx: Option<tokio::sync::mpsc::Sender<Event>>,
    dropped: Arc<AtomicU64>,
}

impl Alerts {
    /// Starts the sender for `config` (on the current tokio runtime); `node` says which
    /// node sent an event. Without a webhook, events go nowhere.
    pub fn start(config: &AlertsConfig, node: &str) -> Alerts {
        let dropped = Arc::new(AtomicU64::new(0));
        let (Some(url), Some(secret)) = (config.webhook.clone(), config.secret.clone()) else {
            return Alerts { tx: None, dropped };
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return Alerts { tx: None, dropped };
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(QUEUE);
        let node = node.to_string();
        tokio::spawn(async move {
            // No redirects: a 3xx would turn the POST into a bodiless GET elsewhere, with
            // the signature, and count as delivered.
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .max_redirects(0)
                .timeout_global(Some(ATTEMPT_TIMEOUT))
                .http_status_as_error(false)
                .tls_config(
                    ureq::tls::TlsConfig::builder()
                        .provider(ureq::tls::TlsProvider::Rustls)
                        .unversioned_rustls_crypto_provider(Arc::new(
                            rustls::crypto::aws_lc_rs::default_provider(),
                        ))
                        .build(),
                )
                .build()
                .into();
            while let Some(event) = rx.recv().await {
                let body = envelope(&event, &node);
                let signature = sign(secret.as_bytes(), &body);
                deliver(&agent, &url, &event, body, signature).await;
            }
        });
        Alerts {
            tx: Some(tx),
            dropped,
        }
    }

    /// Whether events go anywhere (`[alerts] webhook` is set).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues event `kind` with `data`; never waits.
    pub fn send(&self, kind: &'static str, data: serde_json::Value) {
        let Some(tx) = &self.tx else { return };
        let at = jiff::Timestamp::now().to_string();
        if tx.try_send(Event { kind, at, data }).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(kind, dropped = n, "alert queue full: an event was dropped");
        }
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The JSON body of an event: a delivery id (the same on every retry), its type, when and
/// where it happened, and its data.
fn envelope(event: &Event, node: &str) -> Vec<u8> {
    let mut id = [0u8; 12];
    let _ = getrandom::fill(&mut id);
    serde_json::to_vec(&serde_json::json!({
        "id": hex::encode(id),
        "type": event.kind,
        "at": event.at,
        "node": node,
        "data": event.data,
    }))
    .unwrap_or_default()
}

/// `sha256=<hex>` of HMAC-SHA256(`key`, `body`).
pub fn sign(key: &[u8], body: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    format!(
        "sha256={}",
        hex::encode(aws_lc_rs::hmac::sign(&key, body).as_ref())
    )
}

/// Sends one event until the webhook answers 2xx, a status retrying cannot change (a 4xx
/// other than 408 and 429), or the attempts run out.
async fn deliver(agent: &ureq::Agent, url: &str, event: &Event, body: Vec<u8>, signature: String) {
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let (agent, url, body, signature) = (
            agent.clone(),
            url.to_string(),
            body.clone(),
            signature.clone(),
        );
        let kind = event.kind;
        let sent = tokio::task::spawn_blocking(move || {
            agent
                .post(&url)
                .header("content-type", "application/json")
                .header("x-kiln-event", kind)
                .header(SIGNATURE_HEADER, &signature)
                .send(&body[..])
                .map(|r| r.status().as_u16())
        })
        .await;
        let status = match sent {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => {
                tracing::warn!(kind = event.kind, attempt, "alert webhook unreachable: {e}");
                0
            }
            Err(e) => {
                tracing::warn!(kind = event.kind, "alert delivery task: {e}");
                return;
            }
        };
        match status {
            200..=299 => return,
            300..=399 => {
                tracing::warn!(
                    kind = event.kind,
                    status,
                    "alert webhook redirects; events are not sent on (set its final URL)"
                );
                return;
            }
            400..=499 if status != 408 && status != 429 => {
                tracing::warn!(kind = event.kind, status, "alert webhook refused an event");
                return;
            }
            _ => {}
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    tracing::error!(
        kind = event.kind,
        "alert not delivered after {ATTEMPTS} attempts"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        let s = sign(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            s,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_webhook_needs_a_url_and_a_secret() {
        let c = |w: &str, s: Option<&str>| AlertsConfig {
            webhook: Some(w.into()),
            secret: s.map(str::to_string),
        };
        assert!(
            c("https://hooks.example.com/k", Some("0123456789abcdef"))
                .validate()
                .is_ok()
        );
        assert!(c("https://hooks.example.com/k", None).validate().is_err());
        assert!(c("ftp://x/y", Some("0123456789abcdef")).validate().is_err());
        assert!(AlertsConfig::default().validate().is_ok());
    }
}
