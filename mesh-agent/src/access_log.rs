//! JSON access log: one line per proxied TCP connection and per HTTP request, written by a
//! dedicated thread so the data path never blocks on the file. The queue is bounded; lines that
//! do not fit are dropped and counted rather than slowing traffic down.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::Duration;

use prometheus::IntCounter;
use serde::Serialize;

/// Lines waiting for the writer (one drain interval's worth at over 400k lines/s); beyond
/// this they are dropped (and counted).
const QUEUE: usize = 8192;
/// How often the writer drains the queue.
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

/// One access-log line. Borrowed fields: made on the stack, serialized once.
#[derive(Serialize)]
pub struct Entry<'a> {
    /// RFC 3339, UTC, when the request or connection ended.
    pub time: String,
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

/// The parts of a request the access log keeps (taken before the request is sent on).
pub struct RequestLine {
    pub method: hyper::Method,
    pub path: String,
    pub trace_id: Option<String>,
}

impl RequestLine {
    pub fn new<B>(req: &hyper::Request<B>) -> Self {
        let trace_id = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(trace_id)
            .map(str::to_owned);
        Self {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            trace_id,
        }
    }
}

/// The log's sending side; cheap to share (`Arc`).
pub struct AccessLog {
    tx: SyncSender<String>,
    dropped: IntCounter,
}

impl AccessLog {
    /// Starts the writer: appends to `path`, or writes to stdout when `path` is None.
    pub fn start(path: Option<&Path>) -> Result<Self, AccessLogError> {
        let dropped = IntCounter::new(
            "nodemesh_access_log_dropped_total",
            "Access-log lines dropped because the writer's queue was full.",
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
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out))
            .map_err(AccessLogError::Thread)?;
        Ok(Self { tx, dropped })
    }

    /// The dropped-lines counter, for the agent's registry.
    pub fn dropped(&self) -> IntCounter {
        self.dropped.clone()
    }

    pub fn log(&self, entry: &Entry<'_>) {
        let line = match serde_json::to_string(entry) {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "access log entry not serializable");
                return;
            }
        };
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Drains the queue every [`DRAIN_EVERY`] into a 64 KiB buffer and writes it out: the writer is
/// never woken by a sender (a wake-up per line cost the data path more than the line itself),
/// and a line reaches the file within about that interval.
fn write_lines(rx: Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    loop {
        let mut wrote = false;
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    if writeln!(out, "{line}").is_err() {
                        return;
                    }
                    wrote = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if wrote && out.flush().is_err() {
            return;
        }
        std::thread::sleep(DRAIN_EVERY);
    }
}

/// Now, RFC 3339 in UTC.
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
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
