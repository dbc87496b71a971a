//! JSON access log: one line per proxied TCP connection and per HTTP request. A line is
//! serialized straight into a buffer of the calling thread's shard (one uncontended lock, no
//! allocation, no wake-up); a writer thread swaps the shards' buffers out every
//! [`DRAIN_EVERY`] and appends them to the file, so the data path never blocks on the file.
//! A shard holds at most [`SHARD_LIMIT`] bytes; lines beyond that are dropped and counted
//! rather than slowing traffic down. Lines of different threads within one drain interval may
//! reach the file out of time order; each carries its own `time`.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::http::{HeaderValue, Method, Uri};
use prometheus::IntCounter;
#[cfg(test)]
use serde::{Serialize, Serializer};

/// Buffers, each used by the threads whose index maps onto it (tokio's workers get one each).
const SHARDS: usize = 16;
/// Bytes one shard may hold between drains: about 10,000 lines, 500k lines/s per shard.
const SHARD_LIMIT: usize = 4 << 20;
/// How often the writer drains the shards.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("observability.access_log.path {path:?}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the access log writer: {0}")]
    Thread(std::io::Error),
}

mod json_line;

/// One access-log line. Borrowed fields: made on the stack, written once
/// ([`Entry::write_json`]; serde's derive is the reference it is tested against).
#[cfg_attr(test, derive(Serialize))]
pub struct Entry<'a> {
    /// RFC 3339, UTC, microseconds, when the request or connection ended.
    pub time: Timestamp,
    /// `http` (one request) or `tcp` (one connection).
    pub kind: &'static str,
    /// `source` (the caller's agent) or `destination` (the agent terminating the tunnel).
    pub reporter: &'static str,
    pub source_principal: &'a str,
    pub source_workload: &'a str,
    pub destination_service: &'a str,
    /// The endpoint the last attempt went to (none when none was picked).
    pub endpoint: Option<SocketAddrV4>,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub response_code: Option<u16>,
    /// Body bytes (HTTP) or stream bytes (TCP) from the caller towards the service.
    pub bytes_sent: u64,
    /// Body bytes (HTTP) or stream bytes (TCP) from the service back to the caller.
    pub bytes_received: u64,
    pub duration_ms: f64,
    pub retries: u32,
    /// Authorization: `allow`, `deny`, or none when no decision was needed (e.g. rate limited).
    pub policy: Option<&'static str>,
    pub connection_security_policy: &'static str,
    /// W3C trace id of the request (from its `traceparent`), if it carried one.
    pub trace_id: Option<&'a str>,
}

/// The parts of a request the access log keeps, taken before the request is sent on. They
/// share the request's buffers (reference counts, no copy).
pub struct RequestLine {
    pub method: Method,
    uri: Uri,
    traceparent: Option<HeaderValue>,
}

impl RequestLine {
    pub fn new<B>(req: &hyper::Request<B>) -> Self {
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            traceparent: req.headers().get("traceparent").cloned(),
        }
    }

    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// The trace id of the request's `traceparent`, when it has a valid one.
    pub fn trace_id(&self) -> Option<&str> {
        trace_id(self.traceparent.as_ref()?.to_str().ok()?)
    }
}

/// A wall-clock instant, serialized as RFC 3339 in UTC with microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Timestamp(SystemTime);

/// Now, for [`Entry::time`].
pub fn now() -> Timestamp {
    Timestamp(SystemTime::now())
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`
const TIMESTAMP_LEN: usize = 27;

impl Timestamp {
    fn format(&self) -> [u8; TIMESTAMP_LEN] {
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut out = [0u8; TIMESTAMP_LEN];
        out[..19].copy_from_slice(&seconds_prefix(since.as_secs()));
        let mut micros = since.subsec_micros();
        out[19] = b'.';
        for digit in out[20..26].iter_mut().rev() {
            *digit = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        out[26] = b'Z';
        out
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` since the epoch, formatted once per second per thread.
fn seconds_prefix(secs: u64) -> [u8; 19] {
    thread_local! {
        static LAST: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
    }
    LAST.with(|last| {
        let (cached, text) = last.get();
        if cached == secs {
            return text;
        }
        let mut text = [0u8; 19];
        let t = i64::try_from(secs)
            .ok()
            .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let _ = write!(
            &mut text[..],
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
        last.set((secs, text));
        text
    })
}

#[cfg(test)]
impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = self.format();
        // Digits and ASCII punctuation only.
        serializer.serialize_str(std::str::from_utf8(&text).unwrap_or_default())
    }
}

/// One shard's pending lines, on its own cache lines.
#[repr(align(128))]
struct Shard(Mutex<Vec<u8>>);

struct Shards {
    shards: [Shard; SHARDS],
    closed: AtomicBool,
}

/// The log's sending side; cheap to share (`Arc`).
pub struct AccessLog {
    shared: Arc<Shards>,
    limit: usize,
    dropped: IntCounter,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl AccessLog {
    /// Starts the writer: appends to `path`, or writes to stdout when `path` is None.
    pub fn start(path: Option<&Path>) -> Result<Self, AccessLogError> {
        Self::with_limit(path, SHARD_LIMIT)
    }

    fn with_limit(path: Option<&Path>, limit: usize) -> Result<Self, AccessLogError> {
        let dropped = IntCounter::new(
            "nodemesh_access_log_dropped_total",
            "Access-log lines dropped because the writer fell behind or could not write.",
        )
        .expect("valid metric name");
        let out: Box<dyn Write + Send> = match path {
            Some(p) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| AccessLogError::Open {
                        path: p.to_owned(),
                        source,
                    })?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let shared = Arc::new(Shards {
            shards: std::array::from_fn(|_| Shard(Mutex::new(Vec::new()))),
            closed: AtomicBool::new(false),
        });
        let writer = {
            let (shared, dropped) = (shared.clone(), dropped.clone());
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_lines(&shared, out, &dropped))
                .map_err(AccessLogError::Thread)?
        };
        Ok(Self {
            shared,
            limit,
            dropped,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The dropped-lines counter, for the agent's registry.
    pub fn dropped(&self) -> IntCounter {
        self.dropped.clone()
    }

    pub fn log(&self, entry: &Entry<'_>) {
        let shard = &self.shared.shards[shard_index()];
        let mut buffer = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
        if buffer.len() >= self.limit {
            drop(buffer);
            self.dropped.inc();
            return;
        }
        entry.write_json(&mut buffer);
        buffer.push(b'\n');
    }

    /// Writes out every line logged so far and stops the writer (at shutdown; lines logged
    /// afterwards are not written).
    pub fn finish(&self) {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            self.shared.closed.store(true, Ordering::Release);
            writer.thread().unpark();
            let _ = writer.join();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.finish();
    }
}

/// This thread's shard: threads are numbered on first use.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

/// Every [`DRAIN_EVERY`], swaps each non-empty shard's buffer for an empty one (holding its
/// lock only for the swap) and writes it out; the writer is never woken by a line.
fn write_lines(shared: &Shards, mut out: Box<dyn Write + Send>, dropped: &IntCounter) {
    let mut spare = Vec::new();
    let mut failed = false;
    loop {
        let last = shared.closed.load(Ordering::Acquire);
        for shard in &shared.shards {
            {
                let mut buffer = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
                if buffer.is_empty() {
                    continue;
                }
                std::mem::swap(&mut *buffer, &mut spare);
            }
            if let Err(e) = out.write_all(&spare) {
                let lines = spare.iter().filter(|&&b| b == b'\n').count();
                dropped.inc_by(lines as u64);
                if !failed {
                    tracing::error!(error = %e, "writing the access log; dropping lines until writes succeed");
                }
                failed = true;
            } else {
                failed = false;
            }
            spare.clear();
        }
        let _ = out.flush();
        if last {
            return;
        }
        std::thread::park_timeout(DRAIN_EVERY);
    }
}

/// The trace id of a W3C `traceparent` (`00-<32 hex trace id>-<16 hex span id>-<flags>`).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id != ZERO_TRACE).then_some(id)
}

const ZERO_TRACE: &str = "00000000000000000000000000000000";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_one_json_line_per_entry_to_the_file() {
        let dir = tempfile::tempdir().expect("test setup");
        let path = dir.path().join("access.log");
        let log = AccessLog::start(Some(&path)).expect("test setup");
        for code in [200, 503] {
            log.log(&Entry {
                time: now(),
                kind: "http",
                reporter: "source",
                source_principal: "spiffe://cluster.local/ns/shop/sa/client",
                source_workload: "client",
                destination_service: "echo.shop.svc.cluster.local",
                endpoint: Some("10.0.0.2:8080".parse().expect("test setup")),
                method: Some("GET"),
                path: Some("/"),
                response_code: Some(code),
                bytes_sent: 0,
                bytes_received: 12,
                duration_ms: 1.5,
                retries: 1,
                policy: Some("allow"),
                connection_security_policy: "none",
                trace_id: trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            });
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let lines = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() >= 2 || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let parsed: Vec<serde_json::Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).expect("test setup"))
            .collect();
        assert_eq!(parsed.len(), 2, "{lines}");
        assert_eq!(parsed[1]["response_code"], 503);
        assert_eq!(parsed[0]["endpoint"], "10.0.0.2:8080");
        assert_eq!(parsed[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(parsed[0]["time"]
            .as_str()
            .expect("test setup")
            .ends_with('Z'));
        assert_eq!(log.dropped().get(), 0);
    }

    fn entry(code: u16) -> Entry<'static> {
        Entry {
            time: now(),
            kind: "http",
            reporter: "source",
            source_principal: "spiffe://cluster.local/ns/shop/sa/client",
            source_workload: "client",
            destination_service: "echo",
            endpoint: None,
            method: Some("GET"),
            path: Some("/"),
            response_code: Some(code),
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0.25,
            retries: 0,
            policy: None,
            connection_security_policy: "none",
            trace_id: None,
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        use time::format_description::well_known::Rfc3339;
        let at = UNIX_EPOCH + Duration::new(1_796_312_548, 123_456_789);
        let text = serde_json::to_string(&Timestamp(at)).expect("test setup");
        assert_eq!(text, "\"2026-12-03T15:42:28.123456Z\"");
        // Within a second the cached prefix is reused; a new second is formatted anew.
        let next =
            serde_json::to_string(&Timestamp(at + Duration::from_secs(1))).expect("test setup");
        assert_eq!(next, "\"2026-12-03T15:42:29.123456Z\"");
        let parsed = time::OffsetDateTime::parse(text.trim_matches('"'), &Rfc3339)
            .expect("parses as RFC 3339");
        assert_eq!(parsed.unix_timestamp(), 1_796_312_548);
        assert_eq!(parsed.microsecond(), 123_456);
    }

    #[test]
    fn finish_writes_every_line_logged_before_it() {
        let dir = tempfile::tempdir().expect("test setup");
        let path = dir.path().join("access.log");
        let log = AccessLog::start(Some(&path)).expect("test setup");
        for i in 0..1000 {
            log.log(&entry(200 + (i % 2)));
        }
        log.finish();
        let text = std::fs::read_to_string(&path).expect("test setup");
        assert_eq!(text.lines().count(), 1000);
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
        assert_eq!(log.dropped().get(), 0);
    }

    #[test]
    fn lines_beyond_a_full_shard_are_dropped_and_counted() {
        let dir = tempfile::tempdir().expect("test setup");
        let path = dir.path().join("access.log");
        // Room for a few lines between drains.
        let log = AccessLog::with_limit(Some(&path), 1000).expect("test setup");
        for _ in 0..100 {
            log.log(&entry(200));
        }
        log.finish();
        let written = std::fs::read_to_string(&path)
            .expect("test setup")
            .lines()
            .count() as u64;
        assert!(log.dropped().get() > 0, "a full shard drops");
        assert_eq!(
            written + log.dropped().get(),
            100,
            "each line written or counted"
        );
    }

    #[test]
    fn trace_ids_are_read_from_traceparent_only_when_valid() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("00-xyz-00f067aa0ba902b7-01"), None);
        assert_eq!(
            trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
    }
}
