//! Minimal HTTP/1 server for the agent's plain-text endpoints (/metrics, /health, /ready, /live).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission;

/// A response as the endpoint handlers produce it.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

pub type Handler = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// A handler that also sees the method, the query string and the body (admin writes such as
/// PUT /logging and PUT /mesh).
pub type RequestHandler = Arc<dyn Fn(&Method, &str, Option<&str>, &[u8]) -> Reply + Send + Sync>;

/// Largest request body read (an operator's mesh document); a larger one gets 413.
pub const MAX_BODY: usize = 1 << 20;

/// Serves `handler` (called with the request path) until `shutdown` turns true.
pub async fn serve(listener: TcpListener, handler: Handler, shutdown: watch::Receiver<bool>) {
    serve_requests(
        listener,
        Arc::new(move |_, path, _, _| handler(path)),
        shutdown,
    )
    .await
}

/// Serves `handler` (called with method, path and query) until `shutdown` turns true. At most
/// [`admission::MAX_HTTP_CONNECTIONS`] connections at once (more are closed right away), and a
/// client gets [`admission::HTTP_HEADER_READ_TIMEOUT`] to send its headers.
pub async fn serve_requests(
    listener: TcpListener,
    handler: RequestHandler,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(admission::MAX_HTTP_CONNECTIONS));
    let mut errors = admission::AcceptErrors::new("http");
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                errors.failed(&e).await;
                continue;
            }
        };
        errors.accepted();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Dropping the stream closes it: a flood of idle clients cannot hold the port.
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let reply = match read_body(body).await {
                        Ok(body) => {
                            handler(&parts.method, parts.uri.path(), parts.uri.query(), &body)
                        }
                        Err(reply) => reply,
                    };
                    let response = Response::builder()
                        .status(reply.status)
                        .header("content-type", reply.content_type)
                        .body(Full::new(Bytes::from(reply.body)))
                        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(admission::HTTP_HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The request body, bounded in size and in time.
async fn read_body(body: Incoming) -> Result<Bytes, Reply> {
    use http_body_util::{BodyExt, Limited};
    let read = Limited::new(body, MAX_BODY).collect();
    match tokio::time::timeout(admission::HTTP_HEADER_READ_TIMEOUT, read).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(_)) => Err(Reply::text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes or unreadable\n"),
        )),
        Err(_) => Err(Reply::text(
            StatusCode::REQUEST_TIMEOUT,
            "request body timed out\n",
        )),
    }
}
