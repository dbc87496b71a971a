//! Values the agent keeps outside the registry, read at scrape time: kernel per-CPU counters,
//! the HBONE pool and inbound server, authorization decisions and certificate freshness.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, Weak};
use std::time::SystemTime;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::state::AgentState;

/// Families refilled on every scrape. They are not in the registry themselves: this collector
/// is, and hands their output to it.
pub struct StateCollector {
    state: Weak<AgentState>,
    /// Scrapes reset and refill the families; one at a time.
    scraping: Mutex<()>,
    kernel: [IntCounterVec; 5],
    /// Outbound connections refused by the connection limits.
    outbound_refused: IntCounter,
    /// Bytes and packets per identity ([`super::kernel_traffic::FAMILIES`], same order).
    kernel_traffic: [IntCounterVec; 4],
    authz: IntCounterVec,
    pool_opened: [IntCounter; 2],
    pool_active: [IntGauge; 2],
    inbound_connections: IntCounterVec,
    inbound_streams: IntCounterVec,
    forwarded_refused: IntCounter,
    cert_expiry: IntGaugeVec,
    cert_changes: IntCounter,
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name")
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric name")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric name")
}

impl StateCollector {
    /// Holds the state weakly: the state owns the registry this collector is registered in.
    pub fn new(state: Weak<AgentState>) -> Self {
        let kernel = |name, help| counter_vec(name, help, &["identity"]);
        let kernel_traffic =
            super::kernel_traffic::FAMILIES.map(|(name, help, _)| kernel(name, help));
        Self {
            state,
            kernel_traffic,
            scraping: Mutex::new(()),
            kernel: [
                kernel(
                    "nodemesh_kernel_connections_opened_total",
                    "connect() calls the kernel allowed, by source identity.",
                ),
                kernel(
                    "nodemesh_kernel_connections_redirected_total",
                    "connect() calls to mesh services redirected to the agent.",
                ),
                kernel(
                    "nodemesh_kernel_connections_denied_total",
                    "connect() calls refused with EPERM by the kernel deny-list.",
                ),
                kernel(
                    "nodemesh_kernel_inbound_dropped_total",
                    "Inbound TCP SYNs to strict workloads dropped for bypassing the agent, by destination identity.",
                ),
                kernel(
                    "nodemesh_kernel_egress_denied_total",
                    "connect()/sendmsg() calls to non-mesh destinations refused for lack of an egress rule, by source identity.",
                ),
            ],
            outbound_refused: counter(
                "nodemesh_outbound_refused_total",
                "Outbound connections refused by the connection limits (per calling identity or total).",
            ),
            authz: counter_vec(
                "nodemesh_authz_decisions_total",
                "Authorization decisions by policy and result.",
                &["policy", "decision"],
            ),
            pool_opened: [
                counter(
                    "nodemesh_hbone_connections_opened_total",
                    "mTLS HTTP/2 connections opened to other agents.",
                ),
                counter(
                    "nodemesh_hbone_streams_opened_total",
                    "HBONE tunnels (CONNECT streams) opened.",
                ),
            ],
            pool_active: [
                gauge(
                    "nodemesh_hbone_active_connections",
                    "Open pooled HBONE connections.",
                ),
                gauge("nodemesh_hbone_active_streams", "Open HBONE tunnels."),
            ],
            inbound_connections: counter_vec(
                "nodemesh_hbone_inbound_connections_total",
                "Inbound HBONE connections by handshake outcome.",
                &["result"],
            ),
            inbound_streams: counter_vec(
                "nodemesh_hbone_inbound_streams_total",
                "Inbound HBONE CONNECT streams by answer.",
                &["result"],
            ),
            cert_expiry: IntGaugeVec::new(
                Opts::new(
                    "nodemesh_identity_cert_expiry_seconds",
                    "Seconds until the current certificate of each local identity expires.",
                ),
                &["identity"],
            )
            .expect("valid metric name"),
            forwarded_refused: counter(
                "nodemesh_hbone_forwarded_refused_total",
                "Forwarded caller addresses of inbound tunnels not bound (malformed, or this node's, its pods' or a reserved address); those connect from the agent address.",
            ),
            cert_changes: counter(
                "nodemesh_identity_cert_changes_total",
                "Certificate store changes: issues, renewals and removals.",
            ),
        }
    }

    fn collectors(&self) -> [&dyn Collector; 20] {
        let [k0, k1, k2, k3, k4] = &self.kernel;
        let [t0, t1, t2, t3] = &self.kernel_traffic;
        let [p0, p1] = &self.pool_opened;
        let [a0, a1] = &self.pool_active;
        [
            k0,
            k1,
            k2,
            k3,
            k4,
            &self.outbound_refused,
            t0,
            t1,
            t2,
            t3,
            &self.authz,
            p0,
            p1,
            a0,
            a1,
            &self.inbound_connections,
            &self.inbound_streams,
            &self.forwarded_refused,
            &self.cert_expiry,
            &self.cert_changes,
        ]
    }

    fn refill(&self, state: &AgentState) {
        self.refill_kernel(state);
        set_counter(&self.outbound_refused, state.outbound_limits.refused());
        let security = &state.security;
        self.authz.reset();
        for d in security.authz.counters().snapshot() {
            let decision = if d.allowed { "allow" } else { "deny" };
            set_counter(
                &self.authz.with_label_values(&[&d.policy, decision]),
                d.count,
            );
        }
        // Audit mode: allowed, but the policy would have denied.
        for (policy, count) in security.authz.counters().audit_deny_snapshot() {
            set_counter(
                &self.authz.with_label_values(&[&policy, "audit_deny"]),
                count,
            );
        }
        let pool = security.pool.stats();
        set_counter(&self.pool_opened[0], pool.connections_opened);
        set_counter(&self.pool_opened[1], pool.streams_opened);
        self.pool_active[0].set(gauge_value(pool.active_connections));
        self.pool_active[1].set(gauge_value(pool.active_streams));
        let inbound = &security.inbound;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (result, c) in [
            ("accepted", &inbound.connections_accepted),
            ("refused", &inbound.handshakes_refused),
        ] {
            set_counter(
                &self.inbound_connections.with_label_values(&[result]),
                get(c),
            );
        }
        for (result, c) in [
            ("opened", &inbound.streams_opened),
            ("denied", &inbound.streams_denied),
            ("rejected", &inbound.streams_rejected),
            ("target_failed", &inbound.streams_failed),
        ] {
            set_counter(&self.inbound_streams.with_label_values(&[result]), get(c));
        }
        set_counter(&self.forwarded_refused, get(&inbound.forwarded_refused));
        let store = security.identities.store();
        self.cert_expiry.reset();
        for id in store.ids() {
            if let Some(cert) = store.get(&id) {
                let left = cert
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                self.cert_expiry
                    .with_label_values(&[&id.to_string()])
                    .set(gauge_value(left.as_secs()));
            }
        }
        set_counter(&self.cert_changes, *store.subscribe().borrow());
    }

    /// Per-identity kernel counters (id 0 collects processes in unknown child cgroups).
    fn refill_kernel(&self, state: &AgentState) {
        let model = state.model();
        let mut identities: Vec<(&str, u32)> = model
            .identities
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        identities.push(("unknown", 0));
        for family in &self.kernel {
            family.reset();
        }
        state.with_kernel(|k| {
            for (name, id) in &identities {
                let Ok(c) = k.maps.counters(*id) else {
                    continue;
                };
                let values = [
                    c.opened,
                    c.redirected,
                    c.denied,
                    c.inbound_dropped,
                    c.egress_denied,
                ];
                for (family, value) in self.kernel.iter().zip(values) {
                    set_counter(&family.with_label_values(&[name]), value);
                }
            }
        });
        for family in &self.kernel_traffic {
            family.reset();
        }
        let owned: Vec<(String, u32)> = identities
            .iter()
            .map(|(name, id)| ((*name).to_owned(), *id))
            .collect();
        for (name, c) in super::kernel_traffic::read(state, &owned) {
            for (family, (_, _, get)) in self
                .kernel_traffic
                .iter()
                .zip(super::kernel_traffic::FAMILIES)
            {
                set_counter(&family.with_label_values(&[&name]), get(&c));
            }
        }
    }
}

/// Counters read from elsewhere are monotonic there; mirror the current value.
pub(crate) fn set_counter(c: &IntCounter, value: u64) {
    c.reset();
    c.inc_by(value);
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The descriptors of families a scrape-time collector refills.
pub(crate) fn descs<'a>(families: impl IntoIterator<Item = &'a dyn Collector>) -> Vec<&'a Desc> {
    families.into_iter().flat_map(|c| c.desc()).collect()
}

/// One scrape of a scrape-time collector: refill its families from the live state (one scrape
/// at a time, since refilling resets them), then hand their output to the registry. Nothing once
/// the agent state is gone.
pub(crate) fn collect_refilled<'a, F>(
    state: &Weak<AgentState>,
    scraping: &Mutex<()>,
    refill: impl FnOnce(&AgentState),
    families: impl FnOnce() -> F,
) -> Vec<MetricFamily>
where
    F: IntoIterator<Item = &'a dyn Collector>,
{
    let Some(state) = state.upgrade() else {
        return Vec::new();
    };
    let _one_scrape = scraping.lock().unwrap_or_else(PoisonError::into_inner);
    refill(&state);
    families().into_iter().flat_map(|c| c.collect()).collect()
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        descs(self.collectors())
    }

    fn collect(&self) -> Vec<MetricFamily> {
        collect_refilled(
            &self.state,
            &self.scraping,
            |state| self.refill(state),
            || self.collectors(),
        )
    }
}
