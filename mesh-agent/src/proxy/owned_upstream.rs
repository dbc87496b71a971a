//! Upstream HTTP/1.1 connections owned by one client connection and driven in its task.
//!
//! A pooled client (hyper-util) runs each upstream connection in a task of its own and hands
//! every request and response across a channel: two cross-task wake-ups per request, often
//! across worker threads. Here each client connection opens its own upstream connections, one
//! per endpoint it has used (made on first use, closed with the client connection), and polls
//! them together with the client side in one task, so a request costs no thread hop. Every
//! request still picks its endpoint (and a retry another one): a keep-alive client connection
//! spreads its requests over as many upstream connections as endpoints it reached.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::rt::{Read, Write};
use hyper::{Request, Response, Uri, Version};
use hyper_util::rt::TokioIo;

use super::connect::Source;
use super::outbound::Caller;
use super::upstream::{ProxyBody, UpstreamError, UpstreamIo, Upstreams};
use crate::traffic::RouteEndpoint;

/// Upstream connections one client connection keeps at most; past it the oldest is closed
/// (e.g. ones stuck on a hung endpoint after their request timed out).
const MAX_CONNECTIONS: usize = 8;

type Driven = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One client connection's upstream connections.
#[derive(Default)]
pub struct OwnedUpstreams {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Send handles, oldest first; a handle is busy while its response is in flight.
    senders: Vec<(Key, SendRequest<ProxyBody>)>,
    /// Connections opened since the driver last ran.
    opened: Vec<Driven>,
    /// Wakes the driver when a connection was opened.
    driver: Option<Waker>,
}

/// This client connection's connections to one endpoint.
enum Free {
    Ready(SendRequest<ProxyBody>),
    /// All in use (or not yet ready again).
    Busy,
    None,
}

/// What an upstream connection is bound to: its endpoint and where it was connected from.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    endpoint: SocketAddrV4,
    source: Source,
}

impl OwnedUpstreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one HTTP/1 attempt to `target` over this client connection's own upstream
    /// connection to it (opened now if it has none free).
    pub async fn send(
        &self,
        upstreams: &Upstreams,
        target: &RouteEndpoint,
        caller: &Caller,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let endpoint = target.entry.addr;
        let key = Key {
            endpoint,
            source: upstreams.source(),
        };
        origin_form(&mut req);
        *req.version_mut() = Version::HTTP_11;
        let mut sender = match self.free(key).await {
            Some(s) => s,
            // Boxed: opening (connect, HBONE, handshake) is a large future, once per
            // connection; inline it would be moved with every request's future.
            None => Box::pin(self.open(upstreams, target, caller)).await?,
        };
        // The response future does not borrow the handle: it goes back at once, busy until
        // this response is read.
        let response = sender.send_request(req);
        self.put(key, sender);
        response.await.map_err(|e| UpstreamError::Reset {
            endpoint,
            source: e.into(),
        })
    }

    /// A free connection to `key`. A connection that just finished a response may need its
    /// driver to run once before it takes the next request: one yield gives it that chance.
    async fn free(&self, key: Key) -> Option<SendRequest<ProxyBody>> {
        match self.take_ready(key) {
            Free::Ready(s) => Some(s),
            Free::None => None,
            Free::Busy => {
                tokio::task::yield_now().await;
                match self.take_ready(key) {
                    Free::Ready(s) => Some(s),
                    Free::None | Free::Busy => None,
                }
            }
        }
    }

    fn take_ready(&self, key: Key) -> Free {
        let mut inner = self.lock();
        inner.senders.retain(|(_, s)| !s.is_closed());
        if let Some(i) = inner
            .senders
            .iter()
            .position(|(k, s)| *k == key && s.is_ready())
        {
            return Free::Ready(inner.senders.remove(i).1);
        }
        if inner.senders.iter().any(|(k, _)| *k == key) {
            Free::Busy
        } else {
            Free::None
        }
    }

    fn put(&self, key: Key, sender: SendRequest<ProxyBody>) {
        let mut inner = self.lock();
        if inner.senders.len() >= MAX_CONNECTIONS {
            inner.senders.remove(0);
        }
        inner.senders.push((key, sender));
    }

    async fn open(
        &self,
        upstreams: &Upstreams,
        target: &RouteEndpoint,
        caller: &Caller,
    ) -> Result<SendRequest<ProxyBody>, UpstreamError> {
        let endpoint = target.entry.addr;
        let reset = |e: hyper::Error| UpstreamError::Reset {
            endpoint,
            source: e.into(),
        };
        let mut sender = match upstreams.open(target, caller).await? {
            UpstreamIo::Direct(tcp) => self.start(TokioIo::new(tcp)).await,
            UpstreamIo::Hbone(stream) => self.start(TokioIo::new(stream)).await,
        }
        .map_err(reset)?;
        sender.ready().await.map_err(reset)?;
        Ok(sender)
    }

    /// Starts HTTP/1.1 on `io`; its connection is handed to the driver.
    async fn start<T>(&self, io: T) -> hyper::Result<SendRequest<ProxyBody>>
    where
        T: Read + Write + Unpin + Send + 'static,
    {
        let (sender, connection) = http1::Builder::new().handshake(io).await?;
        let mut inner = self.lock();
        inner.opened.push(Box::pin(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream HTTP/1 connection ended with error");
            }
        }));
        if let Some(driver) = &inner.driver {
            driver.wake_by_ref();
        }
        Ok(sender)
    }

    /// Polls the upstream connections; never completes (poll it next to the client side, in
    /// the same task, until the client connection ends).
    pub fn drive(&self) -> impl Future<Output = Infallible> + Send + '_ {
        let mut running: Vec<Driven> = Vec::new();
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            {
                let mut inner = self.lock();
                if !inner
                    .driver
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    inner.driver = Some(cx.waker().clone());
                }
                running.append(&mut inner.opened);
            }
            // Connections whose handles were evicted may still wait on a hung endpoint.
            let excess = running.len().saturating_sub(2 * MAX_CONNECTIONS);
            running.drain(..excess);
            running.retain_mut(|c| c.as_mut().poll(cx).is_pending());
            Poll::Pending
        })
    }
}

/// HTTP/1 requests go upstream in origin form (`/path?query`), whatever form the client used.
fn origin_form(req: &mut Request<ProxyBody>) {
    if req.uri().scheme().is_none() && req.uri().authority().is_none() {
        return;
    }
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(path);
}
