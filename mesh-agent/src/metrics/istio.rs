//! Istio-compatible metric families (names, labels and buckets of Istio's standard metrics), so
//! existing dashboards and alerts work on nodemesh.
//!
//! Who reports what: the calling workload's agent reports `reporter="source"` for every HTTP
//! request (L7 path) and every opaque TCP connection it proxies; the agent that terminates an
//! HBONE tunnel reports `reporter="destination"` for that tunnel as a TCP connection. Label
//! children are taken once per proxied connection (the registry's child map is the cache), so
//! a request costs a few atomic adds and no allocation.
//!
//! Cardinality: every label value comes from configuration (workload identities, services) or
//! from a fixed set (reporter, security policy), except `response_code`, which is one of the
//! at most 500 HTTP codes 100-599. Series per family <= 2 reporters x callers x services x 2
//! security policies (x codes seen, for `istio_requests_total`).

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Registry};

use super::Registrar;
use crate::identity::SpiffeId;

/// promtool's lint of Istio's duration name (Prometheus prefers seconds); the name is Istio's
/// and dashboards query it, so this one finding is expected.
pub const ISTIO_UNIT_LINT: &str =
    "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";

/// Istio's default buckets of `istio_request_duration_milliseconds`.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's default buckets of the request and response size histograms.
const BYTES_BUCKETS: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

/// Labels of the HTTP families, in order; the TCP families have all but `response_code`.
const HTTP_LABELS: [&str; 8] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_service",
    "destination_workload",
    "connection_security_policy",
    "response_code",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    fn label(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// `mutual_tls` when the connection crossed nodes over HBONE, `none` when it stayed on the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    None,
    MutualTls,
}

impl Security {
    pub fn of_remote(remote: bool) -> Self {
        if remote {
            Security::MutualTls
        } else {
            Security::None
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Security::None => "none",
            Security::MutualTls => "mutual_tls",
        }
    }
}

/// The label values that stay fixed for one proxied connection (made once per connection).
#[derive(Clone, Debug)]
pub struct PeerLabels {
    pub source_workload: String,
    pub source_namespace: String,
    pub source_principal: String,
    /// `<service>.<namespace>.svc.cluster.local`, as Istio names services.
    pub destination_service: String,
    /// Endpoints carry no workload name: the service's name stands for its workload.
    pub destination_workload: String,
}

impl PeerLabels {
    /// `source_service` is the service the caller's workload serves (its certificate's CN), if
    /// any; otherwise its service account names the workload.
    pub fn new(
        source: &SpiffeId,
        source_service: Option<&str>,
        service: &str,
        service_namespace: &str,
    ) -> Self {
        Self {
            source_workload: source_service
                .filter(|s| !s.is_empty())
                .unwrap_or(&source.service_account)
                .to_owned(),
            source_namespace: source.namespace.clone(),
            source_principal: source.to_string(),
            destination_service: format!("{service}.{service_namespace}.svc.cluster.local"),
            destination_workload: service.to_owned(),
        }
    }

    fn values(&self, reporter: Reporter, security: Security) -> [&str; 7] {
        [
            reporter.label(),
            &self.source_workload,
            &self.source_namespace,
            &self.source_principal,
            &self.destination_service,
            &self.destination_workload,
            security.label(),
        ]
    }
}

/// One connection's HTTP series (all but the per-code counter).
#[derive(Clone)]
pub struct HttpSeries {
    pub duration_ms: Histogram,
    pub request_bytes: Histogram,
    pub response_bytes: Histogram,
}

/// One connection's TCP series.
#[derive(Clone)]
pub struct TcpSeries {
    pub opened: IntCounter,
    pub closed: IntCounter,
    pub sent: IntCounter,
    pub received: IntCounter,
}

impl TcpSeries {
    /// Counts a finished connection: `sent` from the caller to the service, `received` back.
    pub fn finished(&self, sent: u64, received: u64) {
        self.closed.inc();
        self.sent.inc_by(sent);
        self.received.inc_by(received);
    }
}

pub struct IstioMetrics {
    requests: IntCounterVec,
    duration_ms: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
    tcp_sent: IntCounterVec,
    tcp_received: IntCounterVec,
}

impl IstioMetrics {
    pub fn new(registry: &Registry) -> Self {
        let r = Registrar(registry);
        let tcp_labels = &HTTP_LABELS[..7];
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let v = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                &HTTP_LABELS[..7],
            )
            .expect("valid histogram");
            registry
                .register(Box::new(v.clone()))
                .expect("each family is registered once");
            v
        };
        Self {
            requests: r.counter_vec(
                "istio_requests_total",
                "HTTP requests, by reporter, source and destination workload, security policy and response code.",
                &HTTP_LABELS,
            ),
            duration_ms: histogram(
                "istio_request_duration_milliseconds",
                "HTTP request duration in milliseconds, from the request's arrival to its response's end.",
                &DURATION_BUCKETS_MS,
            ),
            request_bytes: histogram(
                "istio_request_bytes",
                "HTTP request body sizes in bytes.",
                &BYTES_BUCKETS,
            ),
            response_bytes: histogram(
                "istio_response_bytes",
                "HTTP response body sizes in bytes.",
                &BYTES_BUCKETS,
            ),
            tcp_opened: r.counter_vec(
                "istio_tcp_connections_opened_total",
                "TCP connections opened (opaque TCP proxied by the source, HBONE tunnels at the destination).",
                tcp_labels,
            ),
            tcp_closed: r.counter_vec(
                "istio_tcp_connections_closed_total",
                "TCP connections closed.",
                tcp_labels,
            ),
            tcp_sent: r.counter_vec(
                "istio_tcp_sent_bytes_total",
                "Bytes sent from the caller towards the service over TCP connections.",
                tcp_labels,
            ),
            tcp_received: r.counter_vec(
                "istio_tcp_received_bytes_total",
                "Bytes received by the caller from the service over TCP connections.",
                tcp_labels,
            ),
        }
    }

    pub fn http(&self, peer: &PeerLabels, reporter: Reporter, security: Security) -> HttpSeries {
        let l = peer.values(reporter, security);
        HttpSeries {
            duration_ms: self.duration_ms.with_label_values(&l),
            request_bytes: self.request_bytes.with_label_values(&l),
            response_bytes: self.response_bytes.with_label_values(&l),
        }
    }

    /// The request counter of one response code (take once per code and connection).
    pub fn requests(
        &self,
        peer: &PeerLabels,
        reporter: Reporter,
        security: Security,
        code: u16,
    ) -> IntCounter {
        let [a, b, c, d, e, f, g] = peer.values(reporter, security);
        let mut digits = [0u8; 3];
        self.requests
            .with_label_values(&[a, b, c, d, e, f, g, code_label(code, &mut digits)])
    }

    /// Counts the connection as opened and returns its series.
    pub fn tcp_opened(
        &self,
        peer: &PeerLabels,
        reporter: Reporter,
        security: Security,
    ) -> TcpSeries {
        let l = peer.values(reporter, security);
        let series = TcpSeries {
            opened: self.tcp_opened.with_label_values(&l),
            closed: self.tcp_closed.with_label_values(&l),
            sent: self.tcp_sent.with_label_values(&l),
            received: self.tcp_received.with_label_values(&l),
        };
        series.opened.inc();
        series
    }
}

/// A status code as its three digits, without allocating (codes outside 100-999 cannot come
/// from hyper's `StatusCode`).
fn code_label(code: u16, buf: &mut [u8; 3]) -> &str {
    let code = code.clamp(100, 999);
    *buf = [
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ];
    std::str::from_utf8(buf).expect("ASCII digits")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::AgentMetrics;

    fn peer() -> PeerLabels {
        let id = SpiffeId::new("cluster.local", "shop", "client").expect("test setup");
        PeerLabels::new(&id, Some("client"), "echo", "shop")
    }

    #[test]
    fn counts_requests_and_tcp_with_istio_labels() {
        let m = AgentMetrics::new("n1");
        let p = peer();
        let http = m.istio.http(&p, Reporter::Source, Security::MutualTls);
        http.duration_ms.observe(3.0);
        http.request_bytes.observe(0.0);
        http.response_bytes.observe(120.0);
        m.istio
            .requests(&p, Reporter::Source, Security::MutualTls, 200)
            .inc();
        m.istio
            .requests(&p, Reporter::Source, Security::MutualTls, 200)
            .inc();
        let tcp = m
            .istio
            .tcp_opened(&p, Reporter::Destination, Security::None);
        tcp.finished(10, 20);
        let text = m.render();
        for line in [
            "istio_requests_total{connection_security_policy=\"mutual_tls\",destination_service=\"echo.shop.svc.cluster.local\",destination_workload=\"echo\",node=\"n1\",reporter=\"source\",response_code=\"200\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",source_workload=\"client\",source_workload_namespace=\"shop\"} 2",
            "istio_request_duration_milliseconds_bucket{connection_security_policy=\"mutual_tls\",destination_service=\"echo.shop.svc.cluster.local\",destination_workload=\"echo\",le=\"5\",node=\"n1\",reporter=\"source\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",source_workload=\"client\",source_workload_namespace=\"shop\"} 1",
            "istio_tcp_sent_bytes_total{connection_security_policy=\"none\",destination_service=\"echo.shop.svc.cluster.local\",destination_workload=\"echo\",node=\"n1\",reporter=\"destination\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",source_workload=\"client\",source_workload_namespace=\"shop\"} 10",
        ] {
            let sorted = sort_labels(&text);
            assert!(sorted.contains(line), "missing {line}\n{sorted}");
        }
        crate::metrics::tests::check_with_promtool(&text);
    }

    #[test]
    fn code_labels_are_three_digits() {
        let mut b = [0; 3];
        assert_eq!(code_label(503, &mut b), "503");
        assert_eq!(code_label(200, &mut b), "200");
        assert_eq!(code_label(0, &mut b), "100");
    }

    /// The encoder's label order is not part of the format; compare with labels sorted.
    fn sort_labels(text: &str) -> String {
        text.lines()
            .map(|line| {
                let Some((name, rest)) = line.split_once('{') else {
                    return line.to_owned();
                };
                let (labels, value) = rest.rsplit_once('}').expect("test setup");
                let mut labels: Vec<&str> = labels.split("\",").collect();
                let last = labels.len() - 1;
                let mut owned: Vec<String> = labels
                    .drain(..)
                    .enumerate()
                    .map(|(i, l)| {
                        if i == last {
                            l.to_owned()
                        } else {
                            format!("{l}\"")
                        }
                    })
                    .collect();
                owned.sort();
                format!("{name}{{{}}}{value}", owned.join(","))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
