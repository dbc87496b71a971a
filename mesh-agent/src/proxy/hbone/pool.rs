//! Pool of HTTP/2 connections to other node agents per (source identity, node). A connection
//! carries up to `streams_per_connection` tunnels; when every pooled connection is that busy, one
//! more is dialed, so the number of concurrent tunnels is bounded by fds, not by one connection's
//! stream limit.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tokio::time::timeout;

use super::client::{self, Sender};
use super::stream::{StreamGuard, Usage};
use super::{HboneError, HboneStream, TunnelProtocol};
use crate::identity::SpiffeId;

#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// A connection with no streams for this long is closed.
    pub idle_timeout: Duration,
    /// Bound on dialing a node (TCP + TLS + HTTP/2) and, separately, on the CONNECT answer.
    pub connect_timeout: Duration,
    /// New streams stop using a connection this old; a fresh one is dialed, so every new tunnel
    /// rides a handshake made with a current certificate. Open tunnels are not affected.
    pub max_reuse_age: Duration,
    /// Tunnels one connection carries before another is dialed; below the peer's HTTP/2
    /// max_concurrent_streams (hyper's default 200), so a stream never waits for a free slot.
    pub streams_per_connection: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            max_reuse_age: Duration::from_secs(3600),
            streams_per_connection: 100,
        }
    }
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub connections_opened: u64,
    /// Tunnels established (CONNECT answered 200).
    pub streams_opened: u64,
    pub active_connections: u64,
    pub active_streams: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections_opened: AtomicU64,
    streams_opened: AtomicU64,
    active_connections: Arc<AtomicU64>,
    active_streams: Arc<AtomicU64>,
}

/// The source identity is part of the key: a connection presents one workload's certificate
/// and must never carry another workload's traffic.
type Key = (SpiffeId, SocketAddr);

struct Pooled {
    sender: Sender,
    usage: Arc<Usage>,
    opened_at: Instant,
}

#[derive(Default)]
struct SlotState {
    pooled: Vec<Pooled>,
    /// When and why the last dial failed; callers that queued behind it fail fast.
    last_failure: Option<(Instant, String)>,
}

/// Async lock per key so concurrent callers to one node share a single dial.
type Slot = Arc<tokio::sync::Mutex<SlotState>>;

struct Inner {
    config: PoolConfig,
    slots: Mutex<HashMap<Key, Slot>>,
    counters: Counters,
    sweeper_started: AtomicBool,
}

/// Cheap to clone; clones share connections and counters.
#[derive(Clone)]
pub struct HbonePool {
    inner: Arc<Inner>,
}

impl HbonePool {
    pub fn new(config: PoolConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                slots: Mutex::default(),
                counters: Counters::default(),
                sweeper_started: AtomicBool::new(false),
            }),
        }
    }

    pub fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        PoolStats {
            connections_opened: c.connections_opened.load(Ordering::Relaxed),
            streams_opened: c.streams_opened.load(Ordering::Relaxed),
            active_connections: c.active_connections.load(Ordering::Relaxed),
            active_streams: c.active_streams.load(Ordering::Relaxed),
        }
    }

    /// Opens a tunnel to `target` (an endpoint behind the agent at `node_addr`) for
    /// `service`. `client_tls` must present `source`'s workload certificate; `caller` is the
    /// calling pod's address, named to the destination agent (`Forwarded: for=`).
    pub async fn connect(
        &self,
        source: &SpiffeId,
        client_tls: Arc<ClientConfig>,
        node_addr: SocketAddr,
        target: SocketAddr,
        service: &str,
        caller: Option<Ipv4Addr>,
    ) -> Result<HboneStream, HboneError> {
        self.open_tunnel(source, client_tls, node_addr, target, service, caller, None)
            .await
    }

    /// Like [`HbonePool::connect`], for a tunnel that carries HTTP in `protocol` (marked, so
    /// the destination agent sees, counts and logs each request).
    #[allow(clippy::too_many_arguments)]
    pub async fn connect_carrying(
        &self,
        source: &SpiffeId,
        client_tls: Arc<ClientConfig>,
        node_addr: SocketAddr,
        target: SocketAddr,
        service: &str,
        caller: Option<Ipv4Addr>,
        protocol: TunnelProtocol,
    ) -> Result<HboneStream, HboneError> {
        let protocol = Some(protocol);
        self.open_tunnel(
            source, client_tls, node_addr, target, service, caller, protocol,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn open_tunnel(
        &self,
        source: &SpiffeId,
        client_tls: Arc<ClientConfig>,
        node_addr: SocketAddr,
        target: SocketAddr,
        service: &str,
        caller: Option<Ipv4Addr>,
        protocol: Option<TunnelProtocol>,
    ) -> Result<HboneStream, HboneError> {
        self.start_sweeper();
        let (sender, usage, reused) = self
            .checkout(source, client_tls.clone(), node_addr, None)
            .await?;
        match self
            .open(sender, usage.clone(), target, service, caller, protocol)
            .await
        {
            // A pooled connection can die (peer restart, GOAWAY) before we notice; no tunnel
            // bytes were sent yet, so one retry on a fresh connection is safe.
            Err(HboneError::Stream { source: e, .. }) if reused => {
                tracing::debug!(node = %node_addr, error = %e, "pooled HBONE connection failed, redialing");
                let (sender, usage, _) = self
                    .checkout(source, client_tls, node_addr, Some(&usage))
                    .await?;
                self.open(sender, usage, target, service, caller, protocol)
                    .await
            }
            result => result,
        }
    }

    /// Sends the CONNECT on an acquired connection; releases the acquisition on failure.
    async fn open(
        &self,
        mut sender: Sender,
        usage: Arc<Usage>,
        target: SocketAddr,
        service: &str,
        caller: Option<Ipv4Addr>,
        protocol: Option<TunnelProtocol>,
    ) -> Result<HboneStream, HboneError> {
        let guard = StreamGuard::new(usage, self.inner.counters.active_streams.clone());
        let after = self.inner.config.connect_timeout;
        let upgraded = timeout(
            after,
            client::open_stream(&mut sender, target, service, caller, protocol),
        )
        .await
        .map_err(|_| HboneError::Timeout {
            what: "CONNECT",
            after,
        })??;
        self.inner
            .counters
            .streams_opened
            .fetch_add(1, Ordering::Relaxed);
        Ok(HboneStream::new(upgraded, guard, sender))
    }

    /// Returns a live connection for the key (dialing if needed) with one stream acquired,
    /// and whether it was reused. A pooled connection identified by `stale` is replaced.
    async fn checkout(
        &self,
        source: &SpiffeId,
        client_tls: Arc<ClientConfig>,
        node: SocketAddr,
        stale: Option<&Arc<Usage>>,
    ) -> Result<(Sender, Arc<Usage>, bool), HboneError> {
        let slot = {
            let mut slots = self
                .inner
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            slots.entry((source.clone(), node)).or_default().clone()
        };
        let queued_at = Instant::now();
        let mut slot = slot.lock().await;
        // Without this, N callers queued behind a dead node would time out one after another.
        if let Some((at, reason)) = slot
            .last_failure
            .as_ref()
            .filter(|(at, _)| *at >= queued_at)
        {
            tracing::trace!(node = %node, failed_at = ?at, "sharing failed dial");
            return Err(HboneError::NodeUnavailable {
                addr: node,
                reason: reason.clone(),
            });
        }
        let max_age = self.inner.config.max_reuse_age;
        let budget = self.inner.config.streams_per_connection;
        // Connections that cannot take new streams leave the slot (their open tunnels go on).
        slot.pooled.retain(|p| {
            p.sender.is_ready()
                && p.opened_at.elapsed() < max_age
                && !stale.is_some_and(|s| Arc::ptr_eq(s, &p.usage))
        });
        // The least busy connection with room for one more stream.
        if let Some(pooled) = slot
            .pooled
            .iter()
            .filter(|p| p.usage.active() < budget)
            .min_by_key(|p| p.usage.active())
        {
            pooled.usage.acquire();
            return Ok((pooled.sender.clone(), pooled.usage.clone(), true));
        }
        let after = self.inner.config.connect_timeout;
        let dialed = match timeout(after, client::dial(client_tls, node)).await {
            Ok(dialed) => dialed,
            Err(_) => Err(HboneError::Timeout {
                what: "dial",
                after,
            }),
        };
        let (sender, driver) = match dialed {
            Ok(dialed) => dialed,
            Err(e) => {
                slot.last_failure = Some((Instant::now(), e.to_string()));
                return Err(e);
            }
        };
        slot.last_failure = None;
        let counters = &self.inner.counters;
        counters.connections_opened.fetch_add(1, Ordering::Relaxed);
        let active = counters.active_connections.clone();
        active.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(node = %node, error = %e, "HBONE connection ended with error");
            }
            active.fetch_sub(1, Ordering::Relaxed);
        });
        tracing::debug!(node = %node, source = %source, "HBONE connection opened");
        let usage = Arc::new(Usage::new());
        usage.acquire();
        slot.pooled.push(Pooled {
            sender: sender.clone(),
            usage: usage.clone(),
            opened_at: Instant::now(),
        });
        Ok((sender, usage, false))
    }

    fn start_sweeper(&self) {
        if self.inner.sweeper_started.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::spawn(sweep_loop(Arc::downgrade(&self.inner)));
    }
}

/// Runs until the pool is dropped.
async fn sweep_loop(pool: Weak<Inner>) {
    let Some(tick) = pool.upgrade().map(|p| sweep_tick(p.config.idle_timeout)) else {
        return;
    };
    loop {
        tokio::time::sleep(tick).await;
        match pool.upgrade() {
            Some(inner) => inner.sweep(),
            None => return,
        }
    }
}

/// Checks often enough that a connection outlives its idle timeout by at most ~25%.
fn sweep_tick(idle_timeout: Duration) -> Duration {
    (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(5))
}

impl Inner {
    /// Drops idle or closed connections; dropping the last sender closes the connection.
    fn sweep(&self) {
        let idle_timeout = self.config.idle_timeout;
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.retain(|key, slot| {
            // A locked slot is being used by a caller right now: not idle.
            let Ok(mut state) = slot.try_lock() else {
                return true;
            };
            let before = state.pooled.len();
            state.pooled.retain(|p| {
                p.sender.is_ready() && p.usage.idle_for().is_none_or(|d| d < idle_timeout)
            });
            if state.pooled.len() < before {
                tracing::debug!(node = %key.1, source = %key.0, released = before - state.pooled.len(), "releasing idle HBONE connections");
            }
            // Keep an empty slot only while a caller still holds it (cloned under this lock).
            !state.pooled.is_empty() || Arc::strong_count(slot) > 1
        });
    }
}
