//! `GET /v1/functions/{name}/logs`: what the function's guests printed on this node, oldest
//! first, each line with its time, request id, version and stream. Parameters: `version`,
//! `request_id` (the response's `x-kiln-request-id`), `since` (RFC 3339, unix ms or a span
//! back from now like `10m`; default: all kept), `limit` (the newest N, default 1000, at
//! most 10000), and `follow=true`: the lines so far and then each new one as it comes, as
//! server-sent events (`event: line`, JSON data), with a comment every 15 s to keep the
//! connection open, for at most an hour (then the client asks again). Only the function's
//! tenant (and admins) may read them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, percent_decode};
use crate::app::App;
use crate::common::time::parse_time;
use crate::runtime::logs::{LogKey, LogLine, LogQuery};
use crate::server::{Body, BodyError, json_response};

/// Lines answered unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 1000;
/// Most lines one answer holds.
const MAX_LIMIT: usize = 10_000;
/// How often a followed stream sends a comment when it sent nothing else.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How long one follow lasts; the client asks again (and is authorized again) after.
const MAX_FOLLOW: Duration = Duration::from_secs(3600);

#[derive(Debug)]
struct Params {
    query: LogQuery,
    limit: usize,
    follow: bool,
}

fn parse(query: &str) -> Result<Params, String> {
    let mut p = Params {
        query: LogQuery::default(),
        limit: DEFAULT_LIMIT,
        follow: false,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        match k {
            "version" => {
                p.query.version = Some(
                    v.parse()
                        .map_err(|_| format!("version: expected a number, not {v:?}"))?,
                )
            }
            "request_id" => p.query.request_id = Some(v).filter(|v| !v.is_empty()),
            "since" => p.query.since_ms = parse_time(&v).map_err(|e| format!("since: {e}"))?,
            "limit" => {
                p.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| format!("limit: expected 1 to {MAX_LIMIT}, not {v:?}"))?
            }
            "follow" => {
                p.follow = match v.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(format!("follow: expected true or false, not {v:?}")),
                }
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?} (known: version, request_id, since, limit, follow)"
                ));
            }
        }
    }
    Ok(p)
}

pub(super) fn get(app: &Arc<App>, name: &str, query: &str) -> Result<Response<Body>, ApiError> {
    let p = parse(query).map_err(ApiError::InvalidRequest)?;
    // A function that does not exist (or is another tenant's) is a 404 like everywhere.
    let f = app
        .registry
        .function(name)
        .ok_or_else(|| crate::deploy::RouteError::NoFunction(name.to_string()))?;
    let key = LogKey::new(name, &f.owner, f.created_at);
    if !p.follow {
        let lines = app.logs.lines(&key, &p.query, p.limit);
        let lines: Vec<&LogLine> = lines.iter().map(|l| &**l).collect();
        return Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"function": name, "lines": lines}),
        ));
    }
    let (lines, rx) = app.logs.follow(&key, &p.query, p.limit);
    let mut resp = Response::new(follow_body(lines, rx, p.query, app.logs.closed()));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// One server-sent event carrying `line`.
fn event(line: &LogLine) -> Bytes {
    let data = serde_json::to_string(line).unwrap_or_default();
    Bytes::from(format!("event: line\ndata: {data}\n\n"))
}

/// A followed stream's state: what it still has to send first, where new lines come
/// from, which it wants, when it stops, and when it last sent something.
struct Follow {
    head: Option<Bytes>,
    rx: tokio::sync::broadcast::Receiver<Arc<LogLine>>,
    q: LogQuery,
    closed: tokio::sync::watch::Receiver<bool>,
    until: tokio::time::Instant,
    quiet_since: tokio::time::Instant,
}

/// The lines so far, then each new one `q` wants as it arrives, until the function is
/// deleted, the server stops or [`MAX_FOLLOW`] has passed; a comment every [`KEEP_ALIVE`]
/// that sent nothing else.
fn follow_body(
    first: Vec<Arc<LogLine>>,
    rx: tokio::sync::broadcast::Receiver<Arc<LogLine>>,
    q: LogQuery,
    closed: tokio::sync::watch::Receiver<bool>,
) -> Body {
    let mut head = String::from(": following\n\n");
    for l in &first {
        head.push_str(&String::from_utf8_lossy(&event(l)));
    }
    let now = tokio::time::Instant::now();
    let state = Follow {
        head: Some(Bytes::from(head)),
        rx,
        q,
        closed,
        until: now + MAX_FOLLOW,
        quiet_since: now,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if let Some(h) = s.head.take() {
            return Some((Ok::<_, BodyError>(Frame::data(h)), s));
        }
        loop {
            if *s.closed.borrow() || tokio::time::Instant::now() >= s.until {
                return None;
            }
            let keep_alive = (s.quiet_since + KEEP_ALIVE).min(s.until);
            let bytes = tokio::select! {
                r = s.rx.recv() => match r {
                    Ok(l) if s.q.matches(&l) => event(&l),
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => {
                        Bytes::from(format!("event: missed\ndata: {{\"lines\": {n}}}\n\n"))
                    }
                    Err(RecvError::Closed) => return None,
                },
                _ = s.closed.changed() => return None,
                () = tokio::time::sleep_until(keep_alive) => Bytes::from_static(b": keep-alive\n\n"),
            };
            s.quiet_since = tokio::time::Instant::now();
            return Some((Ok(Frame::data(bytes)), s));
        }
    });
    http_body_util::StreamBody::new(stream).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_parse_and_unknown_ones_are_refused() {
        let p = parse("version=2&request_id=abc&since=10m&limit=5&follow=true").expect("ok");
        assert_eq!(p.query.version, Some(2));
        assert_eq!(p.query.request_id.as_deref(), Some("abc"));
        assert!(p.query.since_ms > crate::unix_ms() - 11 * 60_000);
        assert_eq!((p.limit, p.follow), (5, true));
        assert!(parse("limit=0").is_err());
        assert!(parse("follow=maybe").is_err());
        assert!(parse("version=x").is_err());
        assert!(
            parse("tail=1")
                .expect_err("unknown")
                .contains("unknown parameter")
        );
    }
}
