//! What guests printed, kept per function for their authors: every stdout and stderr line
//! with its time, request id, version and stream, in memory, bounded per function by bytes
//! ([`PER_FUNCTION_BYTES`]) and age ([`MAX_AGE`]), and over all functions by
//! [`TOTAL_BYTES`] (the oldest line anywhere goes first). Read whole (`GET
//! /v1/functions/{name}/logs`, `kiln logs`) or followed as lines arrive (server-sent
//! events). Each node keeps what its own guests printed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, watch};

/// Bytes of lines kept per function (text and request ids, roughly); the oldest go first.
pub const PER_FUNCTION_BYTES: usize = 1 << 20;
/// Bytes of lines kept over all functions.
pub const TOTAL_BYTES: usize = 64 << 20;
/// Lines older than this are dropped.
pub const MAX_AGE: Duration = Duration::from_secs(3600);
/// Longest line kept; the rest of a longer one is cut (and said so).
pub const MAX_LINE_BYTES: usize = 4096;
/// Lines a follower may fall behind before it is told it missed some.
const FOLLOW_BACKLOG: usize = 1024;

/// One line a guest printed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogLine {
    /// Unix ms.
    pub at_ms: i64,
    pub request_id: String,
    pub version: u32,
    /// `stdout` or `stderr`.
    pub stream: &'static str,
    pub text: String,
}

impl LogLine {
    /// What keeping it costs: the line, its strings, and its slot and reference count.
    fn bytes(&self) -> usize {
        std::mem::size_of::<LogLine>() + self.text.len() + self.request_id.len() + 48
    }
}

/// Whose lines: a function, by name, as made by a tenant at a time. A function deleted and
/// made again (by anyone) is another key, so nobody reads the output of the one before,
/// not even from its requests that were still running.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LogKey {
    function: Arc<str>,
    tenant: Arc<str>,
    created_at: i64,
}

impl LogKey {
    pub fn new(function: &str, tenant: &str, created_at: i64) -> Self {
        LogKey {
            function: function.into(),
            tenant: tenant.into(),
            created_at,
        }
    }
}

/// Which lines a reader wants.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub version: Option<u32>,
    /// Unix ms: lines from then on.
    pub since_ms: i64,
    pub request_id: Option<String>,
}

impl LogQuery {
    pub fn matches(&self, l: &LogLine) -> bool {
        l.at_ms >= self.since_ms
            && self.version.is_none_or(|v| v == l.version)
            && self.request_id.as_deref().is_none_or(|r| r == l.request_id)
    }
}

struct FunctionLog {
    /// Each line with its place in the order of all functions' lines (what the total
    /// bound drops first).
    lines: VecDeque<(u64, Arc<LogLine>)>,
    bytes: usize,
    /// Followers' channel, made by the first and dropped once none is left.
    live: Option<broadcast::Sender<Arc<LogLine>>>,
}

impl FunctionLog {
    fn new() -> Self {
        FunctionLog {
            lines: VecDeque::new(),
            bytes: 0,
            live: None,
        }
    }

    /// The kept lines `q` wants, oldest first, the newest `limit` of them.
    fn matching(&self, q: &LogQuery, limit: usize) -> Vec<Arc<LogLine>> {
        let mut out: Vec<Arc<LogLine>> = self
            .lines
            .iter()
            .rev()
            .map(|(_, l)| l)
            .filter(|l| q.matches(l))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Drops the lines past the byte bound or older than `oldest_ms`; returns the bytes
    /// freed.
    fn trim(&mut self, oldest_ms: i64) -> usize {
        let mut freed = 0;
        while let Some((_, first)) = self.lines.front() {
            if self.bytes <= PER_FUNCTION_BYTES && first.at_ms >= oldest_ms {
                break;
            }
            freed += self.pop();
        }
        freed
    }

    /// Drops the oldest line; returns its bytes.
    fn pop(&mut self) -> usize {
        let freed = self.lines.pop_front().map_or(0, |(_, l)| l.bytes());
        self.bytes -= freed;
        freed
    }
}

/// Every function's lines and their bytes in all.
#[derive(Default)]
struct Inner {
    functions: HashMap<LogKey, FunctionLog>,
    total: usize,
    /// The next line's place in the order of all lines.
    next: u64,
}

impl Inner {
    /// Drops `function`'s lines older than [`MAX_AGE`] (or past its bound).
    fn expire(&mut self, function: &LogKey) {
        if let Some(log) = self.functions.get_mut(function) {
            self.total -= log.trim(crate::unix_ms() - MAX_AGE.as_millis() as i64);
        }
    }

    /// Drops the oldest lines anywhere until the total is within [`TOTAL_BYTES`] (a scan
    /// of the functions per line dropped: only once the total is full).
    fn bound(&mut self) {
        while self.total > TOTAL_BYTES {
            let oldest = self
                .functions
                .values_mut()
                .filter_map(|log| log.lines.front().map(|(n, _)| *n).zip(Some(log)))
                .min_by_key(|(n, _)| *n);
            match oldest {
                Some((_, log)) => self.total -= log.pop(),
                None => return,
            }
        }
    }
}

/// Every function's recent guest output on this node.
pub struct LogBook {
    inner: Mutex<Inner>,
    /// Set when the server stops: followers end their streams.
    closed: watch::Sender<bool>,
}

impl Default for LogBook {
    fn default() -> Self {
        LogBook {
            inner: Mutex::new(Inner::default()),
            closed: watch::channel(false).0,
        }
    }
}

impl LogBook {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Pushes and trims keep the deques and the byte counts consistent at every step.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `line` as `function`'s newest and hands it to its followers.
    pub fn push(&self, function: &LogKey, line: LogLine) {
        let line = Arc::new(line);
        let mut inner = self.inner();
        let n = inner.next;
        inner.next += 1;
        let log = inner
            .functions
            .entry(function.clone())
            .or_insert_with(FunctionLog::new);
        log.bytes += line.bytes();
        log.lines.push_back((n, line.clone()));
        if let Some(live) = &log.live
            && live.send(line.clone()).is_err()
        {
            // The last follower left.
            log.live = None;
        }
        inner.total += line.bytes();
        inner.expire(function);
        inner.bound();
    }

    /// `function`'s kept lines that `q` wants, oldest first, the newest `limit` of them.
    pub fn lines(&self, function: &LogKey, q: &LogQuery, limit: usize) -> Vec<Arc<LogLine>> {
        let mut inner = self.inner();
        inner.expire(function);
        match inner.functions.get(function) {
            Some(log) => log.matching(q, limit),
            None => Vec::new(),
        }
    }

    /// Like [`LogBook::lines`], and a receiver of every line pushed after them: taken
    /// together, so no line is missed or seen twice.
    pub fn follow(
        &self,
        function: &LogKey,
        q: &LogQuery,
        limit: usize,
    ) -> (Vec<Arc<LogLine>>, broadcast::Receiver<Arc<LogLine>>) {
        let mut inner = self.inner();
        inner.expire(function);
        let log = inner
            .functions
            .entry(function.clone())
            .or_insert_with(FunctionLog::new);
        let live = log
            .live
            .get_or_insert_with(|| broadcast::channel(FOLLOW_BACKLOG).0);
        let rx = live.subscribe();
        (log.matching(q, limit), rx)
    }

    /// Forgets the lines of every function called `name` (it was deleted); their
    /// followers end.
    pub fn remove(&self, name: &str) {
        let mut inner = self.inner();
        let gone: Vec<LogKey> = inner
            .functions
            .keys()
            .filter(|k| &*k.function == name)
            .cloned()
            .collect();
        for k in gone {
            if let Some(log) = inner.functions.remove(&k) {
                inner.total -= log.bytes;
            }
        }
    }

    /// Ends every follower's stream (the server is stopping).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Whether, and when, the server stops.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }
}

/// Where one request's guest output goes: its function's log, under its request id and
/// version.
#[derive(Clone)]
pub struct RequestLog {
    pub book: Arc<LogBook>,
    pub key: LogKey,
    pub version: u32,
    pub request_id: Arc<str>,
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLog")
            .field("version", &self.version)
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

impl RequestLog {
    /// Keeps a line the guest printed on `stream`, cut at [`MAX_LINE_BYTES`].
    pub fn line(&self, stream: &'static str, text: &str) {
        let text = if text.len() > MAX_LINE_BYTES {
            let mut end = MAX_LINE_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}… [line cut at {MAX_LINE_BYTES} bytes]", &text[..end])
        } else {
            text.to_string()
        };
        self.book.push(
            &self.key,
            LogLine {
                at_ms: crate::unix_ms(),
                request_id: self.request_id.to_string(),
                version: self.version,
                stream,
                text,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(f: &str) -> LogKey {
        LogKey::new(f, "t", 1)
    }

    fn line(book: &LogBook, f: &LogKey, request: &str, version: u32, text: &str) {
        book.push(
            f,
            LogLine {
                at_ms: crate::unix_ms(),
                request_id: request.to_string(),
                version,
                stream: "stdout",
                text: text.into(),
            },
        );
    }

    /// The total matches what the functions hold, and every bound holds.
    fn check(book: &LogBook) -> usize {
        let inner = book.inner();
        let mut sum = 0;
        for log in inner.functions.values() {
            let held: usize = log.lines.iter().map(|(_, l)| l.bytes()).sum();
            assert_eq!(held, log.bytes);
            assert!(log.bytes <= PER_FUNCTION_BYTES);
            sum += held;
        }
        assert_eq!(sum, inner.total);
        assert!(sum <= TOTAL_BYTES);
        sum
    }

    #[test]
    fn lines_are_found_by_request_and_version_and_bounded_by_bytes() {
        let book = LogBook::default();
        let f = key("f");
        line(&book, &f, "r1", 1, "one");
        line(&book, &f, "r2", 2, "two");
        line(&book, &f, "r2", 2, "three");
        let by_request = LogQuery {
            request_id: Some("r2".into()),
            ..LogQuery::default()
        };
        let texts = |v: Vec<Arc<LogLine>>| v.iter().map(|l| l.text.clone()).collect::<Vec<_>>();
        assert_eq!(texts(book.lines(&f, &by_request, 10)), ["two", "three"]);
        assert_eq!(texts(book.lines(&f, &by_request, 1)), ["three"]);
        let v1 = LogQuery {
            version: Some(1),
            ..LogQuery::default()
        };
        assert_eq!(texts(book.lines(&f, &v1, 10)), ["one"]);
        assert!(book.lines(&key("g"), &LogQuery::default(), 10).is_empty());
        // The same name made again (or by another tenant) is another function.
        assert!(
            book.lines(&LogKey::new("f", "t", 2), &LogQuery::default(), 10)
                .is_empty()
        );
        assert!(
            book.lines(&LogKey::new("f", "u", 1), &LogQuery::default(), 10)
                .is_empty()
        );

        // Past the byte bound the oldest lines go.
        let big = "x".repeat(MAX_LINE_BYTES);
        for _ in 0..(PER_FUNCTION_BYTES / MAX_LINE_BYTES + 10) {
            line(&book, &f, "r3", 1, &big);
        }
        let all = book.lines(&f, &LogQuery::default(), usize::MAX);
        assert!(all.iter().all(|l| l.text == big));
        assert!(check(&book) > PER_FUNCTION_BYTES / 2);
        book.remove("f");
        assert!(book.lines(&f, &LogQuery::default(), 10).is_empty());
        assert_eq!(check(&book), 0);
    }

    #[test]
    fn all_functions_together_keep_at_most_the_total_and_lose_the_oldest_lines_first() {
        let book = LogBook::default();
        let big = "x".repeat(MAX_LINE_BYTES);
        let per_function = PER_FUNCTION_BYTES / (MAX_LINE_BYTES + 200);
        let functions = TOTAL_BYTES / PER_FUNCTION_BYTES + 8;
        for i in 0..functions {
            for _ in 0..per_function {
                line(&book, &key(&format!("f{i}")), "r", 1, &big);
            }
        }
        assert!(check(&book) > TOTAL_BYTES - PER_FUNCTION_BYTES);
        // The first functions' lines were the oldest: they went first.
        assert!(book.lines(&key("f0"), &LogQuery::default(), 1).is_empty());
        let last = key(&format!("f{}", functions - 1));
        assert_eq!(
            book.lines(&last, &LogQuery::default(), usize::MAX).len(),
            per_function
        );
    }

    #[test]
    fn followers_get_new_lines_and_the_channel_goes_with_the_last_of_them() {
        let book = LogBook::default();
        let f = key("f");
        line(&book, &f, "r", 1, "before");
        let (first, mut rx) = book.follow(&f, &LogQuery::default(), 10);
        assert_eq!(first.len(), 1);
        line(&book, &f, "r", 1, "after");
        assert_eq!(rx.try_recv().expect("a line").text, "after");
        drop(rx);
        line(&book, &f, "r", 1, "unheard");
        assert!(book.inner().functions[&f].live.is_none());
    }

    #[test]
    fn long_lines_are_cut_on_a_character_boundary() {
        let book = Arc::new(LogBook::default());
        let log = RequestLog {
            book: book.clone(),
            key: key("f"),
            version: 1,
            request_id: "r".into(),
        };
        // Byte 4096 falls inside an "é": the cut moves back to its start.
        log.line("stderr", &format!("a{}", "é".repeat(MAX_LINE_BYTES)));
        let got = book.lines(&key("f"), &LogQuery::default(), 1);
        let kept = got[0]
            .text
            .strip_suffix("… [line cut at 4096 bytes]")
            .expect("cut");
        assert_eq!(kept.len(), MAX_LINE_BYTES - 1);
        assert_eq!(got[0].stream, "stderr");
    }
}
