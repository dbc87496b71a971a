//! Protocol detection on a captured connection: peek (never consume) the first bytes for an
//! HTTP/1.x request line or the HTTP/2 prior-knowledge preface. Server-first protocols send
//! nothing, so the wait is bounded; anything else is opaque TCP.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a silent client may take before the connection is treated as opaque TCP.
pub const SNIFF_WINDOW: Duration = Duration::from_millis(100);
/// How often a partial prefix (e.g. "GE") is peeked again.
const REPEEK: Duration = Duration::from_millis(1);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http,
    Tcp,
}

/// What the bytes so far say: decided, or still a prefix of something HTTP. Public for the
/// protocol-detection fuzz target.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    let candidates = METHODS.iter().copied().chain([H2_PREFACE]);
    let mut ambiguous = false;
    for c in candidates {
        let n = bytes.len().min(c.len());
        if bytes[..n] == c[..n] {
            if bytes.len() >= c.len() {
                return Some(Detected::Http);
            }
            ambiguous = true;
        }
    }
    (!ambiguous).then_some(Detected::Tcp)
}

/// Peeks until the first bytes decide, the client closes, or the window ends.
pub async fn detect(stream: &TcpStream, window: Duration) -> Detected {
    let deadline = Instant::now() + window;
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut last_len = 0;
    loop {
        let peeked = if last_len == 0 {
            // Nothing yet: wait for the first bytes (bounded).
            tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await
        } else {
            tokio::time::sleep(REPEEK).await;
            Ok(stream.peek(&mut buf).await)
        };
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            // Closed, failed or silent: leave it to the TCP relay.
            _ => return Detected::Tcp,
        };
        if let Some(d) = classify(&buf[..n]) {
            return d;
        }
        if Instant::now() >= deadline {
            return Detected::Tcp;
        }
        last_len = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_http1_h2_and_everything_else() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http));
        assert_eq!(classify(b"DELETE /x"), Some(Detected::Http));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http));
        assert_eq!(classify(b"GE"), None, "could still become GET");
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b"hello-mesh"), Some(Detected::Tcp));
        assert_eq!(classify(b"GETX"), Some(Detected::Tcp));
        assert_eq!(
            classify(b"\x16\x03\x01"),
            Some(Detected::Tcp),
            "TLS client hello"
        );
    }

    #[tokio::test]
    async fn a_silent_client_is_tcp_after_the_window() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let started = std::time::Instant::now();
        assert_eq!(
            detect(&server, Duration::from_millis(50)).await,
            Detected::Tcp
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(50) && waited < Duration::from_millis(500),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_request_split_across_writes_is_http() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        client.write_all(b"PO").await.expect("write");
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"ST / HTTP/1.1\r\n").await.expect("write");
            client
        });
        assert_eq!(
            detect(&server, Duration::from_millis(500)).await,
            Detected::Http
        );
        let _ = writer.await;
    }
}
