//! Agent metrics on the `prometheus` crate: one [`Registry`] per agent. Data-path counters are
//! plain atomics behind cached label children; values the agent already keeps elsewhere (kernel
//! per-CPU counters, HBONE pool, authorization decisions, certificates) are read at scrape time
//! by [`scrape::StateCollector`].

pub mod istio;
pub mod kernel_traffic;
pub mod scrape;

use std::collections::HashMap;

use prometheus::core::Collector;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Every family carries the node name, added once by the registry.
const NODE_LABEL: &str = "node";

/// Counters of one destination service on the outbound path. Cloned handles share the values;
/// take them once per connection (or once per service) so updates are one atomic add.
#[derive(Clone, Debug)]
pub struct ServiceMetrics {
    pub connections: IntCounter,
    pub bytes_to_endpoint: IntCounter,
    pub bytes_from_endpoint: IntCounter,
    pub connect_failures: IntCounter,
    /// Connections refused by authorization (this node's or the destination agent's).
    pub denied: IntCounter,
    /// Connections carried to another node over HBONE.
    pub hbone_connections: IntCounter,
}

/// The per-service families, labelled by `service`.
struct ServiceFamilies {
    connections: IntCounterVec,
    bytes_to_endpoint: IntCounterVec,
    bytes_from_endpoint: IntCounterVec,
    connect_failures: IntCounterVec,
    denied: IntCounterVec,
    hbone_connections: IntCounterVec,
}

pub struct AgentMetrics {
    registry: Registry,
    pub outbound_accepted: IntCounter,
    pub outbound_active: IntGauge,
    /// Accepted connections with no recorded original destination (not captured by us).
    pub outbound_unknown_destination: IntCounter,
    pub outbound_no_endpoints: IntCounter,
    pub config_reloads_ok: IntCounter,
    pub config_reloads_failed: IntCounter,
    pub config_generation: IntGauge,
    services: ServiceFamilies,
    /// Istio-compatible request and TCP families (see [`istio`]).
    pub istio: istio::IstioMetrics,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl AgentMetrics {
    /// A registry whose every sample carries `node="<node>"`.
    pub fn new(node: &str) -> Self {
        let labels = HashMap::from([(NODE_LABEL.to_owned(), node.to_owned())]);
        let registry = Registry::new_custom(None, Some(labels))
            .expect("a registry with a fixed, valid common label");
        let r = Registrar(&registry);
        let reloads = r.counter_vec(
            "nodemesh_config_reloads_total",
            "Config reloads by result.",
            &["result"],
        );
        let service = |name, help| r.counter_vec(name, help, &["service"]);
        Self {
            outbound_accepted: r.counter(
                "nodemesh_outbound_accepted_total",
                "Connections accepted on the outbound listener.",
            ),
            outbound_active: r.gauge(
                "nodemesh_outbound_active_connections",
                "Outbound connections being proxied now.",
            ),
            outbound_unknown_destination: r.counter(
                "nodemesh_outbound_unknown_destination_total",
                "Accepted connections without a recorded original destination.",
            ),
            outbound_no_endpoints: r.counter(
                "nodemesh_outbound_no_endpoints_total",
                "Connections closed because the service had no endpoint.",
            ),
            config_generation: r.gauge(
                "nodemesh_config_generation",
                "Number of configs applied since start (1 = the initial one).",
            ),
            config_reloads_ok: reloads.with_label_values(&["ok"]),
            config_reloads_failed: reloads.with_label_values(&["error"]),
            services: ServiceFamilies {
                denied: service(
                    "nodemesh_outbound_denied_total",
                    "Outbound connections refused by authorization, by service.",
                ),
                hbone_connections: service(
                    "nodemesh_outbound_hbone_connections_total",
                    "Outbound connections carried to another node over HBONE (mTLS), by service.",
                ),
                connections: service(
                    "nodemesh_outbound_connections_total",
                    "Proxied outbound connections by service.",
                ),
                connect_failures: service(
                    "nodemesh_outbound_connect_failures_total",
                    "Failed endpoint connects by service.",
                ),
                bytes_to_endpoint: service(
                    "nodemesh_outbound_bytes_sent_total",
                    "Bytes sent to endpoints by service.",
                ),
                bytes_from_endpoint: service(
                    "nodemesh_outbound_bytes_received_total",
                    "Bytes received from endpoints by service.",
                ),
            },
            istio: istio::IstioMetrics::new(&registry),
            registry,
        }
    }

    /// The counters of `service`; the label children are created on first use and shared after.
    pub fn service(&self, service: &str) -> ServiceMetrics {
        let s = &self.services;
        let child = |v: &IntCounterVec| v.with_label_values(&[service]);
        ServiceMetrics {
            connections: child(&s.connections),
            bytes_to_endpoint: child(&s.bytes_to_endpoint),
            bytes_from_endpoint: child(&s.bytes_from_endpoint),
            connect_failures: child(&s.connect_failures),
            denied: child(&s.denied),
            hbone_connections: child(&s.hbone_connections),
        }
    }

    /// The registry, for families owned by other modules.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Adds a collector that reads its values at scrape time.
    pub fn register(&self, collector: Box<dyn Collector>) -> prometheus::Result<()> {
        self.registry.register(collector)
    }

    /// Prometheus text exposition format of everything registered.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// Prometheus text exposition format of everything in `registry`.
pub fn render(registry: &Registry) -> String {
    TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_else(|e| format!("# metrics encoding failed: {e}\n"))
}

/// Creates and registers families; names and help texts are fixed, so failure is a bug.
pub struct Registrar<'a>(pub &'a Registry);

impl Registrar<'_> {
    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        let c = IntCounter::with_opts(Opts::new(name, help)).expect("valid metric name");
        self.add(c.clone());
        c
    }

    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let g = IntGauge::with_opts(Opts::new(name, help)).expect("valid metric name");
        self.add(g.clone());
        g
    }

    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name");
        self.add(v.clone());
        v
    }

    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::IntGaugeVec {
        let v =
            prometheus::IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name");
        self.add(v.clone());
        v
    }

    fn add(&self, c: impl Collector + 'static) {
        self.0
            .register(Box::new(c))
            .expect("each family is registered once");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_names_and_labels_and_adds_node() {
        let m = AgentMetrics::new("n1");
        m.outbound_accepted.inc();
        let echo = m.service("echo");
        echo.connections.inc();
        echo.bytes_to_endpoint.inc_by(10);
        m.service("echo").bytes_to_endpoint.inc_by(5);
        let text = m.render();
        assert!(
            text.contains("nodemesh_outbound_accepted_total{node=\"n1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nodemesh_outbound_bytes_sent_total{service=\"echo\",node=\"n1\"} 15"),
            "{text}"
        );
        assert!(
            text.contains("nodemesh_config_reloads_total{result=\"error\",node=\"n1\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE nodemesh_outbound_active_connections gauge"),
            "{text}"
        );
    }

    /// promtool is the reference parser and linter of the exposition format.
    #[test]
    fn promtool_accepts_the_output() {
        let m = AgentMetrics::new("n1");
        m.service("a\"b\\c").denied.inc();
        check_with_promtool(&m.render());
    }

    pub(crate) fn check_with_promtool(text: &str) {
        use std::io::Write;
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus, installed by `cargo xtask setup`)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("promtool");
        // Istio's name is fixed by the dashboards that use it; every other finding fails.
        let problems: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .chain(String::from_utf8_lossy(&out.stderr).lines())
            .filter(|l| !l.trim().is_empty() && *l != istio::ISTIO_UNIT_LINT)
            .map(str::to_owned)
            .collect();
        assert!(
            out.status.success() || problems.is_empty(),
            "promtool: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
