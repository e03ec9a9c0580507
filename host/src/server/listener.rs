//! The accept loop, the connection limits and graceful shutdown.
//!
//! What bounds a flood here (the `[server]` table): at most `max_connections` connections
//! (one more is answered 503 and closed at once), at most `h2_max_streams` streams on an
//! HTTP/2 connection and small HTTP/2 flow-control windows (a stream waiting for
//! admission holds at most a window of unread bytes), keep-alive pings that drop a peer
//! that stopped answering, a first request due within the header timeout on every
//! protocol (HTTP/1 enforces it per request too), and an idle timeout that closes a
//! connection no request has used for `idle_timeout_ms`. With TLS (`server/tls.rs`) the
//! handshake is due within the header timeout too.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::app::App;

/// HTTP/2 receive window of one stream: what a stream may send before it is read.
const H2_STREAM_WINDOW: u32 = 64 << 10;
/// Connections over the limit being answered at once; more are closed without an answer.
const MAX_REFUSING: usize = 64;

/// Serves `listener` until `shutdown` resolves, then stops accepting and waits (up to the
/// configured drain timeout) for in-flight requests to finish. With `tls`, every
/// connection is a TLS one (handshake due within the header timeout).
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let limits = app.config.server.clone();
    let header_timeout = Duration::from_millis(app.config.header_timeout_ms);
    let keepalive = Duration::from_millis(limits.h2_keepalive_ms);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(limits.h2_window_kb.saturating_mul(1024))
        .keep_alive_interval(Some(keepalive))
        .keep_alive_timeout(keepalive);
    let timeouts = Timeouts {
        first_request: header_timeout,
        idle: Duration::from_millis(limits.idle_timeout_ms),
        drain: Duration::from_millis(app.config.drain_timeout_ms),
    };
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSING));
    let (stop, stopping) = watch::channel(false);
    let server = Arc::new(Connections {
        app: app.clone(),
        builder,
        timeouts,
        stopping,
    });
    // Connection tasks, so that the ones still open after the drain timeout can be ended
    // (and their requests' usage records written) before the ledger is flushed.
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    app.metrics.connection_refused();
                    // Refusals in progress are bounded too: past that, closed at once.
                    if let Ok(refusing) = refusals.clone().try_acquire_owned() {
                        let tls = tls.clone();
                        tokio::spawn(async move {
                            refuse(stream, tls).await;
                            drop(refusing);
                        });
                    }
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let open = app.metrics.connection_opened();
                let (server, tls) = (server.clone(), tls.clone());
                connections.spawn(async move {
                    match tls {
                        None => server.serve(stream, peer).await,
                        Some(tls) => match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                            Ok(Ok(stream)) => server.serve(stream, peer).await,
                            Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake not done within the header timeout"),
                        },
                    }
                    drop((slot, open));
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    let _ = stop.send(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    tokio::select! {
        () = drained => tracing::info!("all connections drained"),
        () = tokio::time::sleep(timeouts.drain) => tracing::warn!("drain timeout reached; closing remaining connections"),
    }
    connections.shutdown().await;
    Ok(())
}

/// What every connection is served with.
struct Connections {
    app: Arc<App>,
    builder: auto::Builder<TokioExecutor>,
    timeouts: Timeouts,
    stopping: watch::Receiver<bool>,
}

impl Connections {
    /// Serves HTTP/1 or HTTP/2 on one connection (plain or TLS) until it ends.
    async fn serve<I>(&self, io: I, peer: std::net::SocketAddr)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let service = {
            let (app, activity) = (self.app.clone(), activity.clone());
            service_fn(move |req| {
                let (app, activity) = (app.clone(), activity.clone());
                async move {
                    // In progress until the response body has been sent (or dropped).
                    let busy = Activity::begin(&activity);
                    let resp = super::handle(app, req).await;
                    Ok::<_, Infallible>(
                        resp.map(|body| Holding { body, _busy: busy }.boxed_unsync()),
                    )
                }
            })
        };
        let conn = self
            .builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        drive(conn, &activity, self.stopping.clone(), self.timeouts, peer).await;
    }
}

/// The timeouts a connection runs under.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    /// From accept to the first request's head.
    first_request: Duration,
    /// With no request in progress.
    idle: Duration,
    /// For the requests in progress once the connection is told to close.
    drain: Duration,
}

/// Serves one connection until it ends, closing it gracefully when the server stops or
/// when it stays unused past its timeout.
async fn drive<C>(
    conn: C,
    activity: &Activity,
    mut stopping: watch::Receiver<bool>,
    timeouts: Timeouts,
    peer: std::net::SocketAddr,
) where
    C: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Graceful,
{
    tokio::pin!(conn);
    let mut deadline = Instant::now() + timeouts.first_request;
    let why = loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, "connection ended with error: {e}");
                }
                return;
            }
            _ = stopping.changed() => break "server shutting down",
            () = tokio::time::sleep_until(deadline) => match activity.idle_since() {
                None => deadline = Instant::now() + timeouts.idle,
                Some(since) => {
                    let limit = match activity.served() {
                        0 => timeouts.first_request,
                        _ => timeouts.idle,
                    };
                    if since.elapsed() >= limit {
                        break "idle";
                    }
                    deadline = since + limit;
                }
            },
        }
    };
    tracing::debug!(%peer, why, "closing connection");
    Graceful::graceful_shutdown(conn.as_mut());
    if tokio::time::timeout(timeouts.drain, conn).await.is_err() {
        tracing::debug!(%peer, "connection did not close within the drain timeout");
    }
}

/// A connection that can be asked to finish what is in progress and close.
trait Graceful {
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E, B> Graceful for auto::Connection<'static, I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: auto::HttpServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        auto::Connection::graceful_shutdown(self)
    }
}

/// The requests of one connection: how many are in progress, how many were served, and
/// when the last one ended (ms since the connection opened).
struct Activity {
    opened: Instant,
    in_progress: AtomicUsize,
    served: AtomicU64,
    last_ms: AtomicU64,
}

/// Marks a request in progress until dropped.
struct Busy(Arc<Activity>);

/// A response body holding its request's [`Busy`] mark until it is dropped.
struct Holding {
    body: super::Body,
    _busy: Busy,
}

impl hyper::body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = super::BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            in_progress: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn begin(this: &Arc<Activity>) -> Busy {
        this.in_progress.fetch_add(1, Ordering::SeqCst);
        this.served.fetch_add(1, Ordering::Relaxed);
        Busy(this.clone())
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Since when nothing is in progress; `None` while a request is.
    fn idle_since(&self) -> Option<Instant> {
        (self.in_progress.load(Ordering::SeqCst) == 0)
            .then(|| self.opened + Duration::from_millis(self.last_ms.load(Ordering::SeqCst)))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let ms = self.0.opened.elapsed().as_millis() as u64;
        self.0.last_ms.fetch_max(ms, Ordering::SeqCst);
        self.0.in_progress.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a connection over `max_connections` is told before it is closed: the error every
/// other refusal uses, written by hand (no HTTP connection is served for it).
fn refusal() -> String {
    let e =
        crate::api::ApiError::Busy("the server is at its connection limit; try again".to_string());
    let body = e.to_json().to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Answers a connection over the limit with a 503 and closes it, within a second. Over
/// TLS the handshake comes first; a client that chose HTTP/2 is closed without an answer
/// (an HTTP/1 one would not parse).
async fn refuse(stream: TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        match tls {
            None => answer_refusal(stream).await,
            Some(tls) => {
                let mut stream = tls.accept(stream).await?;
                if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                    return stream.shutdown().await;
                }
                answer_refusal(stream).await
            }
        }
    })
    .await;
}

async fn answer_refusal<S>(mut stream: S) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(refusal().as_bytes()).await?;
    stream.shutdown().await?;
    // Read what the client sent, so closing does not reset the connection before the
    // client has read the answer.
    let mut sink = [0u8; 4096];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_well_formed_response() {
        let refusal = refusal();
        let (head, body) = refusal.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), len);
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "server.busy");
    }
}
