//! The tunnelled byte stream handed to callers; releases its pool slot on drop.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::client::Sender;

/// Streams in use on one pooled connection, and since when it has had none.
#[derive(Debug)]
pub(crate) struct Usage {
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Usage {
    pub(crate) fn new() -> Self {
        Self {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    /// Streams open on the connection now.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    pub(crate) fn acquire(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
    }

    fn release(&self) {
        // Stamp before decrementing so a sweeper never sees 0 active with a stale stamp.
        *self
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.active.fetch_sub(1, Ordering::SeqCst);
    }

    /// How long the connection has had no streams, or `None` while it has some.
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(
            self.idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .elapsed(),
        )
    }
}

/// Marks one stream as in use until dropped.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    usage: Arc<Usage>,
    active_streams: Arc<AtomicU64>,
}

impl StreamGuard {
    /// `usage` must already have been acquired for this stream.
    pub(crate) fn new(usage: Arc<Usage>, active_streams: Arc<AtomicU64>) -> Self {
        active_streams.fetch_add(1, Ordering::Relaxed);
        Self {
            usage,
            active_streams,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.usage.release();
        self.active_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP connection tunnelled through HBONE. Shutting down the write side half-closes the
/// tunnel (END_STREAM); the target sees EOF.
#[derive(Debug)]
pub struct HboneStream {
    io: TokioIo<Upgraded>,
    _guard: StreamGuard,
    // hyper's connection future (whose end the pool counts as a closed connection) finishes
    // once every sender is gone; holding one keeps the count true while this tunnel is open.
    _connection: Sender,
}

impl HboneStream {
    pub(crate) fn new(upgraded: Upgraded, guard: StreamGuard, connection: Sender) -> Self {
        Self {
            io: TokioIo::new(upgraded),
            _guard: guard,
            _connection: connection,
        }
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
