//! A real OTLP/gRPC trace receiver: opentelemetry-proto's `TraceService` served by tonic on
//! 127.0.0.1 inside one or more node namespaces (so each node's agent reaches it on its own
//! loopback), keeping every span it is sent.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};

use crate::{Node, Topology};

/// The port collectors listen on for OTLP/gRPC.
pub const OTLP_PORT: u16 = 4317;

/// One received span, ids in lowercase hex as in `traceparent`.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP `SpanKind` (2 server, 3 client).
    pub kind: i32,
    /// The exporting process's `service.name`.
    pub service_name: String,
    pub attributes: BTreeMap<String, String>,
}

pub const SPAN_KIND_SERVER: i32 = 2;
pub const SPAN_KIND_CLIENT: i32 = 3;

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<Mutex<u64>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource in request.into_inner().resource_spans {
            let service_name = resource
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .map(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    received.push(ReceivedSpan {
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name,
                        kind: span.kind,
                        service_name: service_name.clone(),
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        *self.requests.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

/// A running receiver; stops when dropped.
pub struct OtlpReceiver {
    collector: Collector,
    /// Owns the server tasks; dropping it stops them.
    _runtime: tokio::runtime::Runtime,
}

impl OtlpReceiver {
    /// Listens on 127.0.0.1:[`OTLP_PORT`] in each of `nodes`' namespaces.
    pub fn start(topo: &Topology, nodes: &[&Node]) -> Result<OtlpReceiver> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, OTLP_PORT));
        let mut listeners = Vec::new();
        for node in nodes {
            // A socket keeps the namespace it was made in, whichever thread serves it later.
            let listener = topo.in_netns(&node.netns, || {
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("OTLP receiver bind {addr}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?;
            listeners.push(listener);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let collector = Collector::default();
        for listener in listeners {
            let listener = {
                let _guard = runtime.enter();
                tokio::net::TcpListener::from_std(listener)?
            };
            let service = TraceServiceServer::new(collector.clone());
            runtime.spawn(async move {
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                if let Err(e) = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(incoming)
                    .await
                {
                    eprintln!("OTLP receiver stopped: {e}");
                }
            });
        }
        Ok(OtlpReceiver {
            collector,
            _runtime: runtime,
        })
    }

    /// The `otlp_endpoint` agents on the receiver's nodes use.
    pub fn endpoint() -> String {
        format!("http://127.0.0.1:{OTLP_PORT}")
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.collector
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Export calls received so far (an exporter with nothing to send makes none).
    pub fn export_requests(&self) -> u64 {
        *self
            .collector
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until a span matching `wanted` has arrived and returns it.
    pub fn wait_for_span(
        &self,
        timeout: Duration,
        wanted: impl Fn(&ReceivedSpan) -> bool,
    ) -> Result<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.spans().into_iter().find(&wanted) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "no matching span within {timeout:?}; received: {:#?}",
                    self.spans()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
