//! Active proxied connections, for the admin `/flows` endpoint and `mesh-agent ctl flows`:
//! outbound ones (a local workload calling a service) and inbound HBONE tunnels (another node's
//! workload reaching a local endpoint).
//!
//! The proxy registers a connection with [`FlowTable::open`] (or [`FlowTable::open_inbound`]) and
//! keeps the returned guard for the connection's life; dropping it removes the entry. Byte counts are atomics updated as the relay
//! reads and writes, so a flow's bytes are live. The table is sharded by flow id so that opening
//! and closing connections on different cores rarely meet on one lock; nothing is locked per byte.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const SHARDS: usize = 16;

/// Which side of the mesh this agent plays for a flow.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// A local workload's connection, captured and proxied by this agent.
    Outbound,
    /// An HBONE tunnel from another agent, spliced to a local endpoint.
    Inbound,
}

/// One proxied connection.
#[derive(Debug)]
pub struct Flow {
    pub id: u64,
    pub direction: Direction,
    /// SPIFFE ID of the calling workload.
    pub source: String,
    pub service: String,
    pub endpoint: String,
    /// Node of the endpoint when the flow goes over HBONE; None for a same-node endpoint.
    pub node: Option<String>,
    started: Instant,
    started_at: SystemTime,
    to_endpoint: AtomicU64,
    from_endpoint: AtomicU64,
}

/// A point-in-time copy of a flow, as the admin endpoint reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FlowSnapshot {
    pub id: u64,
    pub direction: Direction,
    pub source: String,
    pub service: String,
    pub endpoint: String,
    pub node: Option<String>,
    /// Unix seconds at which the connection was accepted.
    pub started: u64,
    pub age_ms: u64,
    pub bytes_to_endpoint: u64,
    pub bytes_from_endpoint: u64,
}

#[derive(Default)]
pub struct FlowTable {
    next_id: AtomicU64,
    shards: [Mutex<HashMap<u64, Arc<Flow>>>; SHARDS],
}

impl FlowTable {
    /// Registers an outbound connection (`node`: the endpoint's node when carried over HBONE);
    /// it stays listed until the guard is dropped.
    pub fn open(
        self: &Arc<Self>,
        source: impl Into<String>,
        service: impl Into<String>,
        endpoint: impl Into<String>,
        node: Option<String>,
    ) -> FlowGuard {
        self.register(Direction::Outbound, source, service, endpoint, node)
    }

    /// Registers an inbound HBONE tunnel from `source` to a local endpoint.
    pub fn open_inbound(
        self: &Arc<Self>,
        source: impl Into<String>,
        service: impl Into<String>,
        endpoint: impl Into<String>,
    ) -> FlowGuard {
        self.register(Direction::Inbound, source, service, endpoint, None)
    }

    fn register(
        self: &Arc<Self>,
        direction: Direction,
        source: impl Into<String>,
        service: impl Into<String>,
        endpoint: impl Into<String>,
        node: Option<String>,
    ) -> FlowGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let flow = Arc::new(Flow {
            id,
            direction,
            source: source.into(),
            service: service.into(),
            endpoint: endpoint.into(),
            node,
            started: Instant::now(),
            started_at: SystemTime::now(),
            to_endpoint: AtomicU64::new(0),
            from_endpoint: AtomicU64::new(0),
        });
        self.shard(id).insert(id, flow.clone());
        FlowGuard {
            table: self.clone(),
            flow,
        }
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Flow>>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// All active flows, oldest first.
    pub fn snapshot(&self) -> Vec<FlowSnapshot> {
        let mut flows: Vec<FlowSnapshot> = (0..SHARDS as u64)
            .flat_map(|s| {
                self.shard(s)
                    .values()
                    .map(|f| f.snapshot())
                    .collect::<Vec<_>>()
            })
            .collect();
        flows.sort_by_key(|f| f.id);
        flows
    }
}

impl Flow {
    fn snapshot(&self) -> FlowSnapshot {
        FlowSnapshot {
            id: self.id,
            direction: self.direction,
            source: self.source.clone(),
            service: self.service.clone(),
            endpoint: self.endpoint.clone(),
            node: self.node.clone(),
            started: self
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            age_ms: self.started.elapsed().as_millis() as u64,
            bytes_to_endpoint: self.to_endpoint.load(Ordering::Relaxed),
            bytes_from_endpoint: self.from_endpoint.load(Ordering::Relaxed),
        }
    }
}

/// Keeps a flow listed; removes it when dropped (however the connection ends). Owns a handle on
/// the table so it can move into a spawned task.
pub struct FlowGuard {
    table: Arc<FlowTable>,
    flow: Arc<Flow>,
}

impl FlowGuard {
    /// Wraps the caller's side of the connection (the client socket, or the inbound tunnel) so
    /// its bytes count on this flow: what it sends goes to the endpoint, what is written to it
    /// came from the endpoint.
    pub fn count<S>(&self, client: S) -> Counted<S> {
        Counted {
            inner: client,
            flow: self.flow.clone(),
        }
    }
}

impl FlowGuard {
    /// Bytes so far: (to the endpoint, from the endpoint).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.flow.to_endpoint.load(Ordering::Relaxed),
            self.flow.from_endpoint.load(Ordering::Relaxed),
        )
    }
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        self.table.shard(self.flow.id).remove(&self.flow.id);
    }
}

/// The client stream of a flow, counting bytes as they pass.
pub struct Counted<S> {
    inner: S,
    flow: Arc<Flow>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.flow.to_endpoint.fetch_add(read, Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.flow
                .from_endpoint
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_flow_is_listed_with_live_bytes_until_its_guard_drops() {
        let table = Arc::new(FlowTable::default());
        let (client, mut peer) = tokio::io::duplex(64);
        {
            let guard = table.open("spiffe://td/ns/a/sa/b", "echo", "10.0.0.1:80", None);
            let mut counted = guard.count(client);
            peer.write_all(b"hello")
                .await
                .expect("write to the client side");
            let mut buf = [0u8; 5];
            counted
                .read_exact(&mut buf)
                .await
                .expect("read through the counter");
            counted
                .write_all(b"abc")
                .await
                .expect("write through the counter");
            let flows = table.snapshot();
            assert_eq!(flows.len(), 1);
            let f = &flows[0];
            assert_eq!(
                (f.source.as_str(), f.service.as_str()),
                ("spiffe://td/ns/a/sa/b", "echo")
            );
            assert_eq!((f.bytes_to_endpoint, f.bytes_from_endpoint), (5, 3));
            assert_eq!(f.direction, Direction::Outbound);
            let _second = table.open_inbound("x", "y", "z");
            let flows = table.snapshot();
            assert_eq!(flows.len(), 2);
            assert_eq!(flows[1].direction, Direction::Inbound);
        }
        assert!(table.snapshot().is_empty());
    }
}
