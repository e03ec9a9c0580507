//! A webhook receiver for the alert tests: plain HTTP/1.1 over loopback, one request per
//! connection, every delivery kept (headers lowercased, body); the first `fail_first`
//! deliveries are answered 500.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One delivery attempt: its headers and body.
pub type Delivery = (Vec<(String, String)>, Vec<u8>);

/// A running receiver.
pub struct Webhook {
    pub url: String,
    got: Arc<Mutex<Vec<Delivery>>>,
}

impl Webhook {
    /// Starts a receiver on a free port.
    pub fn start(fail_first: usize) -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the webhook");
        let url = format!("http://{}/hook", listener.local_addr().expect("address"));
        let got: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let seen = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let Some(delivery) = read(&stream) else {
                    continue;
                };
                let n = {
                    let mut g = seen.lock().unwrap_or_else(|p| p.into_inner());
                    g.push(delivery);
                    g.len()
                };
                let status = if n <= fail_first {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        Webhook { url, got }
    }

    /// Every delivery so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (up to `within`) for a delivery of event `kind`; returns its JSON body.
    pub fn wait_for(&self, kind: &str, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            for (_, body) in self.deliveries() {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if v["type"] == kind {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {kind} event; got {:?}",
                self.deliveries()
                    .iter()
                    .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn read(stream: &std::net::TcpStream) -> Option<Delivery> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some((headers, body))
}
