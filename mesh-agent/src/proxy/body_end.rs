//! A response body that counts its data bytes and reports the total once, when hyper is done
//! with it (finished, failed or dropped by a client that went away), so sizes and durations
//! are recorded at the response's real end without buffering it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

pin_project_lite::pin_project! {
    pub struct OnEnd<B, F: FnOnce(u64)> {
        #[pin]
        inner: B,
        end: End<F>,
    }
}

impl<B, F: FnOnce(u64)> OnEnd<B, F> {
    /// `on_end` gets the data bytes that passed.
    pub fn new(inner: B, on_end: F) -> Self {
        Self {
            inner,
            end: End {
                bytes: 0,
                on_end: Some(on_end),
            },
        }
    }
}

struct End<F: FnOnce(u64)> {
    bytes: u64,
    on_end: Option<F>,
}

impl<F: FnOnce(u64)> Drop for End<F> {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes);
        }
    }
}

impl<B: Body<Data = Bytes>, F: FnOnce(u64)> Body for OnEnd<B, F> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.end.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn reports_the_bytes_once_when_dropped() {
        let seen = Arc::new(AtomicU64::new(u64::MAX));
        let s = seen.clone();
        let body = OnEnd::new(Full::new(Bytes::from_static(b"hello")), move |n| {
            s.store(n, Ordering::SeqCst)
        });
        let collected = body.collect().await.expect("body").to_bytes();
        assert_eq!(&collected[..], b"hello");
        assert_eq!(seen.load(Ordering::SeqCst), 5);
    }
}
