//! The signing endpoint: mTLS (TLS 1.3) with the mesh CA's own roots, one JSON request per
//! connection. A request is signed only for the caller's node identity itself or a workload
//! identity the placements put on that node; every refusal is logged and counted.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::config::{CaServiceConfig, Placements};
use super::protocol::{SignRequest, SignResponse, MAX_MESSAGE};
use super::CA_SERVICE_ACCOUNT;
use crate::config::AGENT_NAMESPACE;
use crate::identity::trust::read_certs;
use crate::identity::{
    peer_spiffe_id, server_config, CertStore, IdentityError, MeshCa, SpiffeId, TrustBundle,
    WorkloadSpec,
};

/// Concurrent connections being served; more wait in the kernel backlog.
const MAX_CONNECTIONS: usize = 256;
/// TLS handshake, request read and response write each get this long.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The service name (CN) of every node identity certificate.
pub const NODE_SERVICE: &str = "nodemesh-agent";
/// Issued certificates never outlive this, whatever the request asks.
const MAX_TTL: Duration = Duration::from_secs(48 * 3600);
/// The service's own certificate lifetime; re-issued locally at half of it.
const OWN_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

pub struct CaServer {
    ca: MeshCa,
    /// Roots node certificates may chain to; published to nodes with every certificate.
    trust: Arc<TrustBundle>,
    trust_path: Option<PathBuf>,
    placements: RwLock<Arc<Placements>>,
    own: Arc<CertStore>,
    own_id: SpiffeId,
    metrics: CaMetrics,
}

/// Why a request was refused: the `reason` label of `nodemesh_ca_csr_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No client certificate chaining to the mesh roots (or none at all).
    Handshake,
    /// The client certificate's SPIFFE ID is no node identity of this trust domain.
    NotANode,
    Malformed,
    /// The requested identity is in another trust domain.
    TrustDomain,
    /// The requested identity is not placed on the caller's node.
    NotPlaced,
    /// The CSR could not be signed (bad CSR or names).
    Signing,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::Handshake,
        Refusal::NotANode,
        Refusal::Malformed,
        Refusal::TrustDomain,
        Refusal::NotPlaced,
        Refusal::Signing,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Handshake => "handshake",
            Refusal::NotANode => "not_a_node",
            Refusal::Malformed => "malformed",
            Refusal::TrustDomain => "trust_domain",
            Refusal::NotPlaced => "not_placed",
            Refusal::Signing => "signing",
        }
    }
}

/// The CA service's Prometheus families (served on its `metrics` address).
pub struct CaMetrics {
    registry: prometheus::Registry,
    pub signed: prometheus::IntCounter,
    pub refused: prometheus::IntCounterVec,
}

impl CaMetrics {
    fn new() -> Self {
        let registry = prometheus::Registry::new();
        let r = crate::metrics::Registrar(&registry);
        let signed = r.counter("nodemesh_ca_csr_signed_total", "CSRs the CA service signed");
        let refused = r.counter_vec(
            "nodemesh_ca_csr_refused_total",
            "CSR requests the CA service refused, by reason",
            &["reason"],
        );
        for reason in Refusal::ALL {
            refused.with_label_values(&[reason.label()]);
        }
        Self {
            registry,
            signed,
            refused,
        }
    }

    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused.with_label_values(&[reason.label()]).get()
    }

    /// Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        crate::metrics::render(&self.registry)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaServiceError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Spiffe(#[from] crate::identity::SpiffeError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl CaServer {
    pub fn new(config: &CaServiceConfig) -> Result<Self, CaServiceError> {
        let ca = load_ca(config)?;
        let own_id = SpiffeId::new(&config.trust_domain, AGENT_NAMESPACE, CA_SERVICE_ACCOUNT)?;
        let own = Arc::new(CertStore::new());
        own.insert(ca.issue(&own_spec(&own_id), OWN_CERT_TTL)?)?;
        let trust = match &config.trust_bundle {
            Some(path) => TrustBundle::new(bundle_with_own_root(path, &ca)?)?,
            None => TrustBundle::new(vec![ca.cert_der().clone()])?,
        };
        Ok(Self {
            trust,
            trust_path: config.trust_bundle.clone(),
            placements: RwLock::new(Arc::new(config.placements()?)),
            ca,
            own,
            own_id,
            metrics: CaMetrics::new(),
        })
    }

    pub fn ca(&self) -> &MeshCa {
        &self.ca
    }

    pub fn trust(&self) -> &Arc<TrustBundle> {
        &self.trust
    }

    pub fn metrics(&self) -> &CaMetrics {
        &self.metrics
    }

    /// Replaces the placements (hot reload); a bad config keeps the current ones.
    pub fn set_placements(&self, placements: Placements) {
        *self.placements.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(placements);
    }

    /// Serves until `shutdown` turns true; reloads the placements from `config_path` when it
    /// changes (checked every `poll`).
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        config_path: Option<PathBuf>,
        poll: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), CaServiceError> {
        let tls = server_config(&self.trust, self.own.clone(), self.own_id.clone())?;
        let acceptor = TlsAcceptor::from(tls);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut reload = tokio::time::interval(poll);
        let mut last_text = config_path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok());
        let mut renew = tokio::time::interval(OWN_CERT_TTL / 2);
        renew.tick().await;
        let mut errors = crate::admission::AcceptErrors::new("ca");
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = reload.tick() => {
                    if let Some(path) = &config_path {
                        self.reload(path, &mut last_text);
                    }
                    self.reload_trust();
                    continue;
                }
                _ = renew.tick() => {
                    match self.ca.issue(&own_spec(&self.own_id), OWN_CERT_TTL) {
                        Ok(cert) => { let _ = self.own.insert(cert); }
                        Err(e) => tracing::error!(error = %e, "renewing the CA service certificate"),
                    }
                    continue;
                }
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    errors.failed(&e).await;
                    continue;
                }
            };
            errors.accepted();
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return Ok(());
            };
            let (server, acceptor) = (self.clone(), acceptor.clone());
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = server.serve(acceptor, stream).await {
                    tracing::debug!(%peer, error = %e, "CA connection ended");
                }
            });
        }
    }

    fn reload(&self, path: &std::path::Path, last: &mut Option<String>) {
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        if last.as_deref() == Some(text.as_str()) {
            return;
        }
        *last = Some(text.clone());
        match CaServiceConfig::parse(&text, &path.display().to_string())
            .and_then(|c| c.placements())
        {
            Ok(p) => {
                self.set_placements(p);
                tracing::info!(path = %path.display(), "placements reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "placements reload refused; keeping the current ones")
            }
        }
    }

    /// Re-reads the trust bundle file; one without the CA's own root is refused.
    fn reload_trust(&self) {
        let Some(path) = &self.trust_path else {
            return;
        };
        match bundle_with_own_root(path, &self.ca).and_then(|certs| self.trust.replace(certs)) {
            Ok(true) => {
                tracing::info!(path = %path.display(), roots = self.trust.certs().len(), "trust bundle reloaded")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "trust bundle reload refused; keeping the current roots")
            }
        }
    }

    async fn serve(
        &self,
        acceptor: TlsAcceptor,
        stream: tokio::net::TcpStream,
    ) -> std::io::Result<()> {
        let timed = |what: &'static str| {
            move |_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} timed out"))
        };
        let tls = match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                // No valid node certificate (or none at all): refused by the TLS verifier.
                self.refuse("-", Refusal::Handshake, &format!("TLS handshake: {e}"));
                return Err(e);
            }
            Err(e) => return Err(timed("handshake")(e)),
        };
        let caller = peer_spiffe_id(tls.get_ref().1);
        let mut reader = BufReader::new(tls);
        let mut line = String::new();
        tokio::time::timeout(
            IO_TIMEOUT,
            (&mut reader).take(MAX_MESSAGE).read_line(&mut line),
        )
        .await
        .map_err(timed("request read"))??;
        let response = match caller {
            Ok(caller) => self.answer(&caller, &line),
            Err(e) => self.refuse("-", Refusal::NotANode, &format!("no client identity: {e}")),
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_default();
        out.push(b'\n');
        let mut tls = reader.into_inner();
        tokio::time::timeout(IO_TIMEOUT, async {
            tls.write_all(&out).await?;
            tls.shutdown().await
        })
        .await
        .map_err(timed("response write"))?
    }

    /// Signs `line`'s CSR if `caller` (a node identity) may hold the identity it asks for.
    fn answer(&self, caller: &SpiffeId, line: &str) -> SignResponse {
        let Some(node) = node_of(caller, &self.ca) else {
            return self.refuse(
                &caller.to_string(),
                Refusal::NotANode,
                "not a node identity",
            );
        };
        let request: SignRequest = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => {
                return self.refuse(node, Refusal::Malformed, &format!("malformed request: {e}"))
            }
        };
        let wanted: SpiffeId = match request.id.parse() {
            Ok(id) => id,
            Err(e) => return self.refuse(node, Refusal::Malformed, &format!("bad id: {e}")),
        };
        if wanted.trust_domain != self.ca.trust_domain() {
            return self.refuse(
                node,
                Refusal::TrustDomain,
                &format!(
                    "{wanted} is outside trust domain {}",
                    self.ca.trust_domain()
                ),
            );
        }
        // The service is the certificate's CN, which `from_service` rules match: it is part of
        // what is placed, not the requester's choice.
        let placed = if &wanted == caller {
            request.service == NODE_SERVICE
        } else {
            let placements = self.placements.read().unwrap_or_else(|p| p.into_inner());
            placements.allows(
                node,
                &format!("{}/{}", wanted.namespace, wanted.service_account),
                &request.service,
            )
        };
        if !placed {
            return self.refuse(
                node,
                Refusal::NotPlaced,
                &format!(
                    "{wanted} (service {:?}) is not placed on node {node}",
                    crate::config::short_message(&request.service)
                ),
            );
        }
        let spec = WorkloadSpec {
            id: wanted.clone(),
            service: request.service,
        };
        let ttl = Duration::from_secs(request.ttl_secs).min(MAX_TTL);
        match self.ca.sign_csr(&spec, &request.csr, ttl) {
            Ok(cert) => {
                self.metrics.signed.inc();
                tracing::info!(%node, id = %wanted, "CSR signed");
                SignResponse {
                    cert: Some(cert),
                    bundle: Some(self.trust.to_pem()),
                    error: None,
                }
            }
            Err(e) => self.refuse(node, Refusal::Signing, &e.to_string()),
        }
    }

    fn refuse(&self, caller: &str, why: Refusal, reason: &str) -> SignResponse {
        self.metrics.refused.with_label_values(&[why.label()]).inc();
        tracing::warn!(%caller, reason = why.label(), detail = %reason, "CSR refused");
        SignResponse {
            error: Some(reason.to_owned()),
            ..Default::default()
        }
    }
}

/// The node name of an agent identity `spiffe://<td>/ns/nodemesh-system/sa/node.<node>`.
fn node_of<'a>(id: &'a SpiffeId, ca: &MeshCa) -> Option<&'a str> {
    if id.trust_domain != ca.trust_domain() || id.namespace != AGENT_NAMESPACE {
        return None;
    }
    id.service_account.strip_prefix("node.")
}

/// The roots of the bundle at `path`, which must include the CA's own certificate (else the
/// certificates it issues would not verify).
fn bundle_with_own_root(
    path: &std::path::Path,
    ca: &MeshCa,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, IdentityError> {
    let certs = read_certs(path)?;
    if !certs.contains(ca.cert_der()) {
        return Err(crate::identity::files::invalid(
            path,
            "does not contain the CA certificate (ca_cert) the service issues from",
        ));
    }
    Ok(certs)
}

fn own_spec(id: &SpiffeId) -> WorkloadSpec {
    WorkloadSpec {
        id: id.clone(),
        service: "nodemesh-ca".into(),
    }
}

fn load_ca(config: &CaServiceConfig) -> Result<MeshCa, crate::identity::IdentityError> {
    match (&config.ca_cert, &config.ca_key) {
        (Some(cert), Some(key)) => {
            MeshCa::from_pem_files_with_trust_domain(cert, key, &config.trust_domain)
        }
        _ => MeshCa::load_or_generate(&config.state_dir, &config.trust_domain),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca_service::RemoteCa;
    use crate::identity::{CertIssuer, IdentityError};

    const TD: &str = "cluster.local";

    fn config(dir: &std::path::Path) -> CaServiceConfig {
        CaServiceConfig::parse(
            &format!(
                "trust_domain: {TD}\nlisten: 127.0.0.1:0\nstate_dir: {}\nplacements:\n  n1: [shop/client]\n",
                dir.display()
            ),
            "test",
        )
        .expect("config")
    }

    fn spec(ns: &str, sa: &str) -> WorkloadSpec {
        WorkloadSpec {
            id: SpiffeId::new(TD, ns, sa).expect("id"),
            service: sa.to_owned(),
        }
    }

    /// A client of `server` authenticating with a node certificate issued by `ca`.
    fn client(addr: std::net::SocketAddr, anchor: &MeshCa, ca: &MeshCa, node: &str) -> RemoteCa {
        let node_id = crate::app::security::agent_identity(TD, node).expect("id");
        let store = Arc::new(CertStore::new());
        let cert = ca
            .issue(
                &WorkloadSpec {
                    id: node_id.clone(),
                    service: NODE_SERVICE.into(),
                },
                Duration::from_secs(3600),
            )
            .expect("node cert");
        store.insert(cert).expect("insert");
        RemoteCa::new(
            addr,
            &crate::identity::TrustBundle::new(vec![anchor.cert_der().clone()]).expect("bundle"),
            store,
            node_id,
            Duration::from_secs(2),
        )
        .expect("client")
    }

    async fn start(
        dir: &std::path::Path,
    ) -> (Arc<CaServer>, std::net::SocketAddr, watch::Sender<bool>) {
        let server = Arc::new(CaServer::new(&config(dir)).expect("server"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(
            server
                .clone()
                .run(listener, None, Duration::from_secs(60), stopped),
        );
        (server, addr, stop)
    }

    async fn issue(
        c: RemoteCa,
        s: WorkloadSpec,
    ) -> Result<crate::identity::WorkloadCert, IdentityError> {
        tokio::task::spawn_blocking(move || c.issue(&s, Duration::from_secs(3600)))
            .await
            .expect("join")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn signs_only_identities_placed_on_the_calling_node() {
        let dir = tempfile::tempdir().expect("dir");
        let (server, addr, _stop) = start(dir.path()).await;
        let ca = server.ca();

        let placed = issue(client(addr, ca, ca, "n1"), spec("shop", "client"))
            .await
            .expect("placed");
        assert_eq!(placed.spiffe_id, spec("shop", "client").id);
        let own = issue(
            client(addr, ca, ca, "n1"),
            WorkloadSpec {
                id: crate::app::security::agent_identity(TD, "n1").expect("id"),
                service: NODE_SERVICE.into(),
            },
        )
        .await;
        assert!(own.is_ok(), "a node renews its own identity: {own:?}");

        // Placed on n1, asked for by n2: refused.
        let other = issue(client(addr, ca, ca, "n2"), spec("shop", "client")).await;
        assert!(
            matches!(&other, Err(IdentityError::Issuer(m)) if m.contains("not placed")),
            "{other:?}"
        );
        // Placed, but asked for with another service name (CN): refused.
        let renamed = issue(
            client(addr, ca, ca, "n1"),
            WorkloadSpec {
                service: "wallet".into(),
                ..spec("shop", "client")
            },
        )
        .await;
        assert!(
            matches!(&renamed, Err(IdentityError::Issuer(m)) if m.contains("not placed")),
            "{renamed:?}"
        );
        // Not placed anywhere.
        let unplaced = issue(client(addr, ca, ca, "n1"), spec("shop", "admin")).await;
        assert!(unplaced.is_err(), "{unplaced:?}");
        // Another trust domain, even for a placed namespace/service account.
        let foreign = issue(
            client(addr, ca, ca, "n1"),
            WorkloadSpec {
                id: SpiffeId::new("evil.example", "shop", "client").expect("id"),
                service: "client".into(),
            },
        )
        .await;
        assert!(
            matches!(&foreign, Err(IdentityError::Issuer(m)) if m.contains("outside trust domain")),
            "{foreign:?}"
        );
        // A node certificate from another CA: the handshake fails.
        let rogue = MeshCa::generate(TD).expect("rogue ca");
        let forged = issue(client(addr, ca, &rogue, "n1"), spec("shop", "client")).await;
        assert!(forged.is_err(), "{forged:?}");
        // Hot reload: placing shop/admin on n1 makes it signable.
        server.set_placements(
            CaServiceConfig::parse(
                &format!(
                    "trust_domain: {TD}\nlisten: 127.0.0.1:0\nplacements:\n  n1: [shop/admin]\n"
                ),
                "t",
            )
            .expect("config")
            .placements()
            .expect("placements"),
        );
        assert!(issue(client(addr, ca, ca, "n1"), spec("shop", "admin"))
            .await
            .is_ok());

        let m = server.metrics();
        assert_eq!(m.signed.get(), 3);
        assert_eq!(m.refused(Refusal::NotPlaced), 3);
        assert_eq!(m.refused(Refusal::Handshake), 1);
        assert_eq!(m.refused(Refusal::TrustDomain), 1);
        assert!(m
            .render()
            .contains("nodemesh_ca_csr_refused_total{reason=\"not_placed\"} 3"));
    }

    #[test]
    fn placements_are_checked_by_field() {
        let e = CaServiceConfig::parse(
            &format!("trust_domain: {TD}\nlisten: 127.0.0.1:1\nplacements:\n  n1: [client]\n"),
            "t",
        )
        .expect_err("no namespace");
        assert!(e.to_string().contains("placements.n1[0]"), "{e}");
        let e = CaServiceConfig::parse(
            &format!("trust_domain: {TD}\nlisten: 127.0.0.1:1\nplacements:\n  n1: [shop/a, \"shop/b:Web\"]\n"),
            "t",
        )
        .expect_err("bad service");
        assert!(e.to_string().contains("placements.n1[1]"), "{e}");
        let placements = CaServiceConfig::parse(
            &format!("trust_domain: {TD}\nlisten: 127.0.0.1:1\nplacements:\n  n1: [shop/a, \"shop/b:web\"]\n"),
            "t",
        )
        .expect("config")
        .placements()
        .expect("placements");
        assert!(placements.allows("n1", "shop/a", "a") && placements.allows("n1", "shop/b", "web"));
        assert!(!placements.allows("n1", "shop/b", "b") && !placements.allows("n2", "shop/a", "a"));
        let e = CaServiceConfig::parse(
            &format!("trust_domain: {TD}\nlisten: 127.0.0.1:1\nplacement: {{}}\n"),
            "t",
        )
        .expect_err("unknown field");
        assert!(e.to_string().contains("placement"), "{e}");
    }
}
