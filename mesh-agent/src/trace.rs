//! W3C trace context on proxied HTTP requests and span export over OTLP/gRPC.
//!
//! Built once at start when `observability.tracing.otlp_endpoint` is set and kept in
//! [`crate::state::AgentState`]; when it is unset there is no tracer, so requests cost nothing and
//! their headers pass through untouched. The request path uses this tracer and propagator
//! directly, not opentelemetry's global getters (those take a lock on every call).

use std::net::SocketAddr;
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceFlags, TraceId, TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use thiserror::Error;

use crate::config::TracingConfig;

/// How long one export may take before it is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long agent shutdown waits for the last spans to be sent.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// Span attribute keys (OpenTelemetry semantic conventions where they have one).
const SERVICE: &str = "nodemesh.service";
const ENDPOINT: &str = "server.address";
const ENDPOINT_PORT: &str = "server.port";
const RETRIES: &str = "nodemesh.retries";
const STATUS_CODE: &str = "http.response.status_code";
const METHOD: &str = "http.request.method";
const PATH: &str = "url.path";
const REPORTER: &str = "nodemesh.reporter";

#[derive(Debug, Error)]
pub enum TraceError {
    #[error("observability.tracing.otlp_endpoint: cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The agent's tracer: starts one span per proxied request and carries its context on.
pub struct RequestTracer {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    ids: RandomIdGenerator,
    /// Share of new traces sampled (`observability.tracing.sampling`).
    sampling: f64,
}

impl RequestTracer {
    /// The tracer for `config`, or None when no endpoint is set (tracing off). Must run inside
    /// the tokio runtime: the gRPC channel's connection task is spawned on it. Also installed as
    /// opentelemetry's global provider, for libraries that use that.
    pub fn start(config: &TracingConfig) -> Result<Option<Self>, TraceError> {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(None);
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()?;
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        // An incoming traceparent's sampled flag wins; new traces are sampled at the ratio.
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sampling)));
        let provider = SdkTracerProvider::builder()
            .with_sampler(sampler)
            .with_resource(resource)
            .with_batch_exporter(exporter)
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "nodemesh");
        Ok(Some(Self {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            ids: RandomIdGenerator::default(),
            sampling: config.sampling,
        }))
    }

    /// The calling workload's agent: a client span continuing the request's trace context (or
    /// starting one), whose own context replaces the one in `headers` sent upstream.
    pub fn client_span(&self, headers: &mut HeaderMap, service: &str) -> RequestSpan {
        self.span(headers, service, SpanKind::Client, "outbound", "source")
    }

    /// The destination agent (HTTP arriving over HBONE): a server span continuing the context
    /// the source agent sent, whose own context replaces it in `headers` forwarded to the pod.
    pub fn server_span(&self, headers: &mut HeaderMap, service: &str) -> RequestSpan {
        self.span(headers, service, SpanKind::Server, "inbound", "destination")
    }

    fn span(
        &self,
        headers: &mut HeaderMap,
        service: &str,
        kind: SpanKind,
        name: &'static str,
        reporter: &'static str,
    ) -> RequestSpan {
        let incoming = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        let (trace_id, sampled) = match incoming {
            Some(parent) => parent,
            None => {
                let id = self.ids.new_trace_id();
                (id, self.root_sampled(id))
            }
        };
        if !sampled {
            // Most requests: the trace id and decision are passed on with a span id of ours,
            // without the SDK (which would build a span only to drop it).
            let context = SpanContext::new(
                trace_id,
                self.ids.new_span_id(),
                TraceFlags::default(),
                false,
                TraceState::NONE,
            );
            write_traceparent(headers, &context);
            if incoming.is_none() {
                // A tracestate without a (valid) traceparent belongs to no trace.
                headers.remove(TRACESTATE);
            }
            return RequestSpan { span: None };
        }
        let parent = match incoming {
            Some(_) => self
                .propagator
                .extract_with_context(&Context::new(), &HeaderExtractor(headers)),
            None => Context::new(),
        };
        // A new root keeps the trace id sampled above; the SDK's sampler agrees on it.
        let mut span = self
            .tracer
            .span_builder(format!("{name} {service}"))
            .with_kind(kind)
            .with_trace_id(trace_id)
            .with_attributes([
                KeyValue::new(SERVICE, service.to_owned()),
                KeyValue::new(REPORTER, reporter),
            ])
            .start_with_context(&self.tracer, &parent);
        let context = span.span_context().clone();
        set_trace_context(headers, &context);
        if !span.is_recording() {
            span.end();
            return RequestSpan { span: None };
        }
        RequestSpan { span: Some(span) }
    }

    /// Whether a trace started here is sampled: opentelemetry's TraceIdRatioBased rule (the
    /// low 63 bits of the trace id below the ratio), so the SDK decides the same for it.
    fn root_sampled(&self, trace_id: TraceId) -> bool {
        let low = u64::from_be_bytes(trace_id.to_bytes()[8..].try_into().unwrap_or_default());
        self.sampling >= 1.0 || (low >> 1) < (self.sampling.max(0.0) * (1u64 << 63) as f64) as u64
    }

    /// Sends the spans still queued and stops the exporter, waiting at most a few seconds.
    pub async fn shutdown(&self) {
        let provider = self.provider.clone();
        let done =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT));
        match tokio::time::timeout(SHUTDOWN_TIMEOUT + Duration::from_secs(1), done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "flushing the last spans"),
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing the last spans"),
            Err(_) => tracing::warn!("flushing the last spans timed out"),
        }
    }
}

/// One request's span; ends (and is queued for export) on [`RequestSpan::end`] or drop. A
/// request that is not sampled has none, and the setters do nothing.
pub struct RequestSpan {
    span: Option<opentelemetry_sdk::trace::Span>,
}

impl RequestSpan {
    pub fn is_recording(&self) -> bool {
        self.span.is_some()
    }

    fn set(&mut self, attribute: impl FnOnce() -> KeyValue) {
        if let Some(span) = &mut self.span {
            span.set_attribute(attribute());
        }
    }

    /// The request's method and path.
    pub fn set_request(&mut self, method: &hyper::Method, path: &str) {
        self.set(|| KeyValue::new(METHOD, method.as_str().to_owned()));
        self.set(|| KeyValue::new(PATH, path.to_owned()));
    }

    /// The endpoint the request went to (the last one tried).
    pub fn set_endpoint(&mut self, endpoint: SocketAddr) {
        self.set(|| KeyValue::new(ENDPOINT, endpoint.ip().to_string()));
        self.set(|| KeyValue::new(ENDPOINT_PORT, i64::from(endpoint.port())));
    }

    pub fn set_retries(&mut self, retries: u32) {
        self.set(|| KeyValue::new(RETRIES, i64::from(retries)));
    }

    /// The response code; 5xx marks the span as an error (OpenTelemetry's HTTP convention).
    pub fn set_response(&mut self, code: u16) {
        self.set(|| KeyValue::new(STATUS_CODE, i64::from(code)));
        if let Some(span) = &mut self.span {
            if code >= 500 {
                span.set_status(Status::error(""));
            }
        }
    }

    pub fn end(mut self) {
        if let Some(span) = &mut self.span {
            span.end();
        }
    }
}

/// The trace id and sampled flag of a `traceparent`, by the rules of opentelemetry's W3C
/// propagator (which the sampled path still uses), without its allocations.
fn parse_traceparent(header: &str) -> Option<(TraceId, bool)> {
    let mut parts = header.trim().split_terminator('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let version = u8::from_str_radix(version, 16).ok()?;
    let extra = parts.next().is_some();
    if version == u8::MAX || (version == 0 && extra) {
        return None;
    }
    let lower = |part: &str| !part.bytes().any(|b| b.is_ascii_uppercase());
    if !lower(trace) || !lower(span) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = opentelemetry::trace::SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if (version == 0 && flags > 2)
        || trace_id == TraceId::INVALID
        || span_id == opentelemetry::trace::SpanId::INVALID
    {
        return None;
    }
    Some((trace_id, flags & TraceFlags::SAMPLED.to_u8() != 0))
}

/// Reads trace context headers of a request.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// `traceparent` as the W3C format writes it: `00-<trace id>-<span id>-<flags>`.
const TRACEPARENT_LEN: usize = 55;

/// Writes `context` as the request's `traceparent` and `tracestate`, replacing the ones it came
/// with: what opentelemetry's propagator writes, without its String per header (the header is
/// formatted on the stack; an empty `tracestate`, none came in, is left out rather than sent
/// empty).
fn set_trace_context(headers: &mut HeaderMap, context: &SpanContext) {
    if !context.is_valid() {
        return;
    }
    write_traceparent(headers, context);
    let state = context.trace_state().header();
    match HeaderValue::from_str(&state) {
        Ok(value) if !state.is_empty() => {
            headers.insert(TRACESTATE, value);
        }
        _ => {
            headers.remove(TRACESTATE);
        }
    }
}

/// Writes `context` as the request's `traceparent`, formatted on the stack.
fn write_traceparent(headers: &mut HeaderMap, context: &SpanContext) {
    let mut text = [0u8; TRACEPARENT_LEN];
    text[..3].copy_from_slice(b"00-");
    hex(&context.trace_id().to_bytes(), &mut text[3..35]);
    text[35] = b'-';
    hex(&context.span_id().to_bytes(), &mut text[36..52]);
    text[52] = b'-';
    hex(
        &[(context.trace_flags() & TraceFlags::SAMPLED).to_u8()],
        &mut text[53..],
    );
    if let Ok(value) = HeaderValue::from_bytes(&text) {
        headers.insert(TRACEPARENT, value);
    }
}

/// Lower-case hex of `bytes` into `out` (twice as long).
fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT_SPAN: &str = "00f067aa0ba902b7";

    /// A tracer exporting to a port nothing listens on (spans are only looked at here).
    fn tracer(sampling: f64) -> RequestTracer {
        let config = TracingConfig {
            otlp_endpoint: Some("http://127.0.0.1:9".into()),
            sampling,
            ..TracingConfig::default()
        };
        RequestTracer::start(&config)
            .expect("exporter")
            .expect("tracing on")
    }

    fn headers(traceparent: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(tp) = traceparent {
            h.insert(
                "traceparent",
                HeaderValue::from_str(tp).expect("header value"),
            );
            h.insert("tracestate", HeaderValue::from_static("vendor=1"));
        }
        h
    }

    /// (version, trace id, span id, flags) of the traceparent in `h`.
    fn parts(h: &HeaderMap) -> Vec<String> {
        h["traceparent"]
            .to_str()
            .expect("ascii")
            .split('-')
            .map(str::to_owned)
            .collect()
    }

    /// What a sampled span would export (it must be sampled and recording).
    fn recorded(span: &RequestSpan) -> opentelemetry_sdk::trace::SpanData {
        span.span
            .as_ref()
            .expect("sampled")
            .exported_data()
            .expect("recording")
    }

    #[test]
    fn trace_context_headers_are_what_the_w3c_propagator_writes() {
        use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TraceState};
        let propagator = TraceContextPropagator::new();
        for (flags, state) in [
            (TraceFlags::SAMPLED, "vendor=1,other=x"),
            (TraceFlags::default(), ""),
        ] {
            let context = SpanContext::new(
                TraceId::from_hex(PARENT_TRACE).expect("hex"),
                SpanId::from_hex(PARENT_SPAN).expect("hex"),
                flags,
                true,
                state.parse::<TraceState>().expect("trace state"),
            );
            let mut ours = headers(Some(
                "00-11111111111111111111111111111111-2222222222222222-01",
            ));
            set_trace_context(&mut ours, &context);
            let mut theirs = std::collections::HashMap::new();
            propagator.inject_context(
                &Context::new().with_remote_span_context(context),
                &mut theirs,
            );
            assert_eq!(ours["traceparent"], theirs["traceparent"]);
            match state {
                "" => assert!(
                    !ours.contains_key("tracestate"),
                    "an empty state is left out"
                ),
                _ => assert_eq!(ours["tracestate"], theirs["tracestate"]),
            }
        }
        // An invalid context writes nothing.
        let mut untouched = headers(None);
        set_trace_context(&mut untouched, &SpanContext::empty_context());
        assert!(untouched.is_empty());
    }

    #[test]
    fn tracing_is_off_without_an_endpoint() {
        assert!(RequestTracer::start(&TracingConfig::default())
            .expect("no exporter needed")
            .is_none());
    }

    #[tokio::test]
    async fn server_span_continues_the_callers_trace_as_its_child() {
        let t = tracer(0.0);
        let mut h = headers(Some(&format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01")));
        let span = t.server_span(&mut h, "echo");
        let p = parts(&h);
        assert_eq!(p[1], PARENT_TRACE, "same trace");
        assert_ne!(p[2], PARENT_SPAN, "its own span id is passed on");
        assert_eq!(p[3], "01", "the caller's sampled flag wins over sampling 0");
        assert_eq!(h["tracestate"], "vendor=1");
        let data = recorded(&span);
        assert_eq!(data.parent_span_id.to_string(), PARENT_SPAN);
        assert_eq!(data.span_context.span_id().to_string(), p[2]);
        assert_eq!(data.span_kind, SpanKind::Server);
        assert_eq!(data.name, "inbound echo");
        assert!(data.parent_span_is_remote);
    }

    #[tokio::test]
    async fn client_span_starts_a_trace_at_the_sampling_ratio() {
        let sampled = tracer(1.0);
        let mut h = headers(None);
        let span = sampled.client_span(&mut h, "echo");
        let p = parts(&h);
        assert_eq!(p[3], "01");
        assert_eq!(
            p[1],
            span.span
                .as_ref()
                .expect("sampled")
                .span_context()
                .trace_id()
                .to_string()
        );
        assert!(span.is_recording());
        assert_eq!(recorded(&span).span_kind, SpanKind::Client);

        assert!(!h.contains_key("tracestate"), "none came in, none is sent");

        let unsampled = tracer(0.0);
        let mut h = headers(None);
        let span = unsampled.client_span(&mut h, "echo");
        assert!(!span.is_recording(), "sampling 0 records nothing");
        assert_eq!(parts(&h)[3], "00", "the decision is passed on");
    }

    #[tokio::test]
    async fn an_unsampled_parent_is_not_recorded_even_at_ratio_one() {
        let t = tracer(1.0);
        let mut h = headers(Some(&format!("00-{PARENT_TRACE}-{PARENT_SPAN}-00")));
        let span = t.client_span(&mut h, "echo");
        assert!(!span.is_recording());
        let p = parts(&h);
        assert_eq!(p[1], PARENT_TRACE, "same trace");
        assert_ne!(p[2], PARENT_SPAN, "a span id of this hop");
        assert_eq!(p[3], "00", "still not sampled");
        assert_eq!(
            h["tracestate"], "vendor=1",
            "the caller's state is passed on"
        );
    }

    #[tokio::test]
    async fn an_invalid_traceparent_starts_a_new_trace_without_its_tracestate() {
        let t = tracer(0.0);
        let mut h = headers(Some(&format!("00-{}-{PARENT_SPAN}-00", "0".repeat(32))));
        let span = t.client_span(&mut h, "echo");
        assert!(!span.is_recording());
        let p = parts(&h);
        assert_ne!(p[1], "0".repeat(32));
        assert!(TraceId::from_hex(&p[1]).is_ok_and(|id| id != TraceId::INVALID));
        assert!(!h.contains_key("tracestate"));
    }

    #[tokio::test]
    async fn new_traces_are_sampled_at_the_ratio_and_every_sampled_one_is_recorded() {
        let t = tracer(0.25);
        let n = 4000;
        let mut sampled = 0;
        for _ in 0..n {
            let mut h = headers(None);
            let span = t.client_span(&mut h, "echo");
            let flag = parts(&h)[3] == "01";
            assert_eq!(flag, span.is_recording(), "header and span agree");
            sampled += usize::from(flag);
        }
        let share = sampled as f64 / f64::from(n);
        assert!((0.2..0.3).contains(&share), "sampled {share}");
    }

    /// Our traceparent parse accepts and reads exactly what the SDK's propagator does.
    fn agrees_with_the_propagator(header: &str) {
        use opentelemetry::trace::TraceContextExt;
        let mut h = HeaderMap::new();
        let Ok(value) = HeaderValue::from_str(header) else {
            return;
        };
        h.insert("traceparent", value);
        let theirs = TraceContextPropagator::new()
            .extract(&HeaderExtractor(&h))
            .span()
            .span_context()
            .clone();
        let theirs = theirs
            .is_valid()
            .then(|| (theirs.trace_id(), theirs.is_sampled()));
        assert_eq!(parse_traceparent(header), theirs, "{header:?}");
    }

    #[test]
    fn traceparents_are_parsed_as_the_propagator_parses_them() {
        for header in [
            format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01"),
            format!("00-{PARENT_TRACE}-{PARENT_SPAN}-00"),
            format!("00-{PARENT_TRACE}-{PARENT_SPAN}-02"),
            format!("00-{PARENT_TRACE}-{PARENT_SPAN}-03"),
            format!(" 00-{PARENT_TRACE}-{PARENT_SPAN}-01 "),
            format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01-extra"),
            format!("01-{PARENT_TRACE}-{PARENT_SPAN}-09-extra"),
            format!("ff-{PARENT_TRACE}-{PARENT_SPAN}-01"),
            format!("00-{}-{PARENT_SPAN}-01", PARENT_TRACE.to_uppercase()),
            format!("00-{PARENT_TRACE}-{}-01", "0".repeat(16)),
            format!("00-{}-{PARENT_SPAN}-01", "0".repeat(32)),
            format!("00-{PARENT_TRACE}-{PARENT_SPAN}"),
            format!("00-{PARENT_TRACE}-{PARENT_SPAN}-"),
            format!("00-abc-{PARENT_SPAN}-01"),
            format!("0x-{PARENT_TRACE}-{PARENT_SPAN}-01"),
            String::new(),
        ] {
            agrees_with_the_propagator(&header);
        }
    }

    proptest::proptest! {
        #[test]
        fn random_traceparents_are_parsed_as_the_propagator_parses_them(
            header in "[ 0-9a-fA-Fx-]{0,64}",
            shaped in "[0-9a-fA-F]{2}-[0-9a-fA-F]{30,33}-[0-9a-fA-F]{15,17}-[0-9a-fA-F]{1,3}(-[a-z]{0,3})?"
        ) {
            agrees_with_the_propagator(&header);
            agrees_with_the_propagator(&shaped);
        }
    }

    #[tokio::test]
    async fn attributes_are_kept_on_sampled_spans() {
        let t = tracer(1.0);
        let mut span = t.client_span(&mut headers(None), "echo");
        span.set_endpoint("10.0.0.2:8080".parse().expect("address"));
        span.set_retries(2);
        span.set_response(503);
        let data = recorded(&span);
        let value = |k: &str| {
            data.attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(value(SERVICE).as_deref(), Some("echo"));
        assert_eq!(value(ENDPOINT).as_deref(), Some("10.0.0.2"));
        assert_eq!(value(ENDPOINT_PORT).as_deref(), Some("8080"));
        assert_eq!(value(RETRIES).as_deref(), Some("2"));
        assert_eq!(value(STATUS_CODE).as_deref(), Some("503"));
        assert!(matches!(data.status, Status::Error { .. }));
    }
}
