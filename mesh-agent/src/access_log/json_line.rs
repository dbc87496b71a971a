//! An [`Entry`] written as one JSON object by hand: the bytes serde_json writes for it (a test
//! holds the two equal), without its byte-by-byte escaping of strings that need none (ids,
//! names and timestamps are most of a line) or its `Display` detour for the endpoint.

use std::net::SocketAddrV4;

use super::Entry;

impl Entry<'_> {
    /// Appends the entry as one JSON object (no newline) to `out`.
    pub(super) fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = Object { out, first: true };
        o.key("time");
        o.out.push(b'"');
        o.out.extend_from_slice(&self.time.format());
        o.out.push(b'"');
        o.str("kind", Some(self.kind));
        o.str("reporter", Some(self.reporter));
        o.str("source_principal", Some(self.source_principal));
        o.str("source_workload", Some(self.source_workload));
        o.str("destination_service", Some(self.destination_service));
        o.key("endpoint");
        match self.endpoint {
            Some(endpoint) => socket_addr(o.out, endpoint),
            None => o.out.extend_from_slice(b"null"),
        }
        o.str("method", self.method);
        o.str("path", self.path);
        o.int("response_code", self.response_code);
        o.int("bytes_sent", Some(self.bytes_sent));
        o.int("bytes_received", Some(self.bytes_received));
        o.key("duration_ms");
        // Floats (and NaN as null) exactly as serde_json formats them.
        let _ = serde_json::to_writer(&mut *o.out, &self.duration_ms);
        o.int("retries", Some(self.retries));
        o.str("policy", self.policy);
        o.str(
            "connection_security_policy",
            Some(self.connection_security_policy),
        );
        o.str("trace_id", self.trace_id);
        o.out.push(b'}');
    }
}

/// A JSON object being written; keys are this module's literals (nothing to escape).
struct Object<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl Object<'_> {
    fn key(&mut self, key: &str) {
        self.out.push(if self.first { b'{' } else { b',' });
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn str(&mut self, key: &str, value: Option<&str>) {
        self.key(key);
        match value {
            Some(text) => string(self.out, text),
            None => self.out.extend_from_slice(b"null"),
        }
    }

    fn int<I: itoa::Integer>(&mut self, key: &str, value: Option<I>) {
        self.key(key);
        match value {
            Some(n) => self
                .out
                .extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
            None => self.out.extend_from_slice(b"null"),
        }
    }
}

/// A JSON string: copied as is when nothing in it needs escaping (checked without an early
/// exit, so the check vectorizes), else escaped by serde_json.
fn string(out: &mut Vec<u8>, text: &str) {
    let needs_escape = text.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if needs_escape {
        let _ = serde_json::to_writer(&mut *out, text);
    } else {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    }
}

/// `"a.b.c.d:port"`.
fn socket_addr(out: &mut Vec<u8>, addr: SocketAddrV4) {
    let mut digits = itoa::Buffer::new();
    out.push(b'"');
    for (i, octet) in addr.ip().octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        out.extend_from_slice(digits.format(octet).as_bytes());
    }
    out.push(b':');
    out.extend_from_slice(digits.format(addr.port()).as_bytes());
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::super::{now, Entry, Timestamp};
    use std::time::{Duration, UNIX_EPOCH};

    fn entry<'a>(text: &'a str, endpoint: Option<&str>, duration_ms: f64) -> Entry<'a> {
        Entry {
            time: Timestamp(UNIX_EPOCH + Duration::new(1_796_312_548, 123_456_789)),
            kind: "http",
            reporter: "source",
            source_principal: "spiffe://cluster.local/ns/shop/sa/client",
            source_workload: "client",
            destination_service: "echo",
            endpoint: endpoint.map(|e| e.parse().expect("test address")),
            method: Some(text),
            path: Some(text),
            response_code: Some(503),
            bytes_sent: u64::MAX,
            bytes_received: 0,
            duration_ms,
            retries: 3,
            policy: None,
            connection_security_policy: "mutual_tls",
            trace_id: None,
        }
    }

    #[test]
    fn lines_are_what_serde_json_writes() {
        for (text, endpoint, duration) in [
            ("/", Some("10.0.0.2:8080"), 1.5),
            ("/a \"quoted\" \\ path", Some("255.255.255.255:65535"), 0.25),
            ("/tab\there\nnew\u{1}line\u{7f}", Some("0.0.0.0:0"), 2.0),
            ("/ünïcødé/𝄞", None, f64::NAN),
            ("", None, 1e-7),
            ("/big", Some("1.2.3.4:5"), 123_456_789.125),
        ] {
            let e = entry(text, endpoint, duration);
            let mut ours = Vec::new();
            e.write_json(&mut ours);
            let theirs = serde_json::to_vec(&e).expect("serializable");
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs)
            );
        }
        let mut line = Vec::new();
        Entry {
            time: now(),
            ..entry("/", None, 0.0)
        }
        .write_json(&mut line);
        serde_json::from_slice::<serde_json::Value>(&line).expect("valid JSON");
    }
}
