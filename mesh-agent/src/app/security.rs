//! Identity and authorization wiring: the mesh CA, certificates for every local identity (each
//! workload's and this agent's own), the inbound authorizer, and the HBONE client pool with one
//! TLS config per (calling identity, destination node).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::ClientConfig;

use crate::ca_service::client::load_node_cert;
use crate::ca_service::RemoteCa;
use crate::config::{agent_service_account, Config, AGENT_NAMESPACE};
use crate::identity::{
    client_config, server_config, CertDir, CertStore, IdentityError, IdentityManager, MeshCa,
    RotationConfig, SpiffeError, SpiffeId, TrustBundle, WorkloadSpec,
};
use crate::policy::authz::ReloadableAuthorizer;
use crate::policy::authz_config::AuthzConfigError;
use crate::proxy::hbone::{HbonePool, InboundStats, PoolConfig};

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Spiffe(#[from] SpiffeError),
    #[error("authorization: {0}")]
    Authz(#[from] AuthzConfigError),
}

pub struct Security {
    /// Counters of this agent's HBONE listener.
    pub inbound: Arc<InboundStats>,
    pub identities: IdentityManager,
    /// Failed requests to the CA service (`nodemesh_ca_renewal_failures_total`), when one is
    /// configured.
    pub ca_failures: Option<prometheus::IntCounter>,
    pub authz: ReloadableAuthorizer,
    pub pool: HbonePool,
    trust_domain: String,
    client_configs: Mutex<HashMap<(SpiffeId, String), Arc<ClientConfig>>>,
}

/// The identity this node's agent presents on its HBONE listener.
pub fn agent_identity(trust_domain: &str, node: &str) -> Result<SpiffeId, SpiffeError> {
    SpiffeId::new(trust_domain, AGENT_NAMESPACE, &agent_service_account(node))
}

/// How often the trust bundle file of `identity.ca_service` is re-read (root rotation).
const TRUST_BUNDLE_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// The identity manager of this node: issuing through the CA service when one is configured
/// (no CA key here; validation refuses `ca_cert`/`ca_key` beside it), else with the local CA.
/// With a CA service, also the counter of its failed requests.
pub fn identity_manager(
    config: &Config,
) -> Result<(IdentityManager, Option<prometheus::IntCounter>), SecurityError> {
    let rotation = RotationConfig {
        ttl: config.identity.cert_ttl,
        ..Default::default()
    };
    let Some(remote) = &config.identity.ca_service else {
        return Ok((IdentityManager::new(load_ca(config)?, rotation)?, None));
    };
    let node_id = agent_identity(&config.node.trust_domain, &config.node.name)?;
    let trust = TrustBundle::from_file(&remote.trust_bundle)?;
    watch_trust_bundle(&trust, remote.trust_bundle.clone());
    let store = CertStore::new();
    store.insert(load_node_cert(
        &remote.node_cert,
        &remote.node_key,
        &node_id,
    )?)?;
    let store = Arc::new(store);
    let issuer = RemoteCa::new(
        remote.address,
        &trust,
        store.clone(),
        node_id,
        remote.timeout,
    )?;
    let failures = issuer.failures();
    // This node's own leaf certificates (never a CA key), so a restart while the CA service is
    // down serves with the ones still valid.
    let persisted = CertDir::new(config.identity.state_dir.join("certs"));
    let manager =
        IdentityManager::with_issuer(Arc::new(issuer), trust, store, rotation, Some(persisted));
    Ok((manager, Some(failures)))
}

/// Re-reads the bundle file every [`TRUST_BUNDLE_POLL`] while `trust` is in use, so roots added
/// or removed by the operator apply to new handshakes without a restart.
fn watch_trust_bundle(trust: &Arc<TrustBundle>, path: std::path::PathBuf) {
    let weak = Arc::downgrade(trust);
    tokio::spawn(async move {
        let mut last_error = None;
        loop {
            tokio::time::sleep(TRUST_BUNDLE_POLL).await;
            let Some(trust) = weak.upgrade() else { return };
            match trust.reload(&path) {
                Ok(true) => {
                    tracing::info!(path = %path.display(), roots = trust.certs().len(), "trust bundle reloaded");
                    last_error = None;
                }
                Ok(false) => last_error = None,
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_ref() != Some(&text) {
                        tracing::error!(path = %path.display(), error = %text, "trust bundle reload refused; keeping the current roots");
                    }
                    last_error = Some(text);
                }
            }
        }
    });
}

/// Loads the CA from the configured files (a mounted Secret), else from the state directory,
/// generating it there at first start.
pub fn load_ca(config: &Config) -> Result<MeshCa, IdentityError> {
    let id = &config.identity;
    match (&id.ca_cert, &id.ca_key) {
        (Some(cert), Some(key)) => {
            MeshCa::from_pem_files_with_trust_domain(cert, key, &config.node.trust_domain)
        }
        _ => MeshCa::load_or_generate(&id.state_dir, &config.node.trust_domain),
    }
}

/// Every identity this agent holds a certificate for: its workloads' and its own.
pub fn wanted_identities(config: &Config) -> Result<Vec<WorkloadSpec>, SpiffeError> {
    let td = &config.node.trust_domain;
    let mut specs = vec![WorkloadSpec {
        id: agent_identity(td, &config.node.name)?,
        service: crate::ca_service::server::NODE_SERVICE.into(),
    }];
    for w in &config.workloads {
        let id = SpiffeId::new(td, &w.namespace, &w.service_account)?;
        if !specs.iter().any(|s| s.id == id) {
            specs.push(WorkloadSpec {
                id,
                service: w.service_name().to_owned(),
            });
        }
    }
    Ok(specs)
}

impl Security {
    pub fn new(config: &Config) -> Result<Security, SecurityError> {
        let (identities, ca_failures) = identity_manager(config)?;
        identities.reconcile(&wanted_identities(config)?)?;
        let authz = ReloadableAuthorizer::new(&config.authz())?;
        // Half the certificate lifetime: a new tunnel never rides a connection whose handshake
        // used a certificate that has since been renewed.
        let pool = HbonePool::new(PoolConfig {
            connect_timeout: config.proxy.connect_timeout,
            max_reuse_age: config.identity.cert_ttl / 2,
            ..Default::default()
        });
        Ok(Security {
            inbound: Arc::default(),
            identities,
            ca_failures,
            authz,
            pool,
            trust_domain: config.node.trust_domain.clone(),
            client_configs: Mutex::new(HashMap::new()),
        })
    }

    /// TLS for the HBONE listener: presents this agent's identity, requires mesh client certs.
    pub fn server_tls(&self, config: &Config) -> Result<Arc<rustls::ServerConfig>, SecurityError> {
        let id = agent_identity(&config.node.trust_domain, &config.node.name)?;
        Ok(server_config(
            self.identities.trust(),
            self.identities.store(),
            id,
        )?)
    }

    /// TLS for calls from `source` to the agent of `node`, which must present that node's identity.
    pub fn client_tls(
        &self,
        source: &SpiffeId,
        node: &str,
    ) -> Result<Arc<ClientConfig>, SecurityError> {
        let key = (source.clone(), node.to_owned());
        let mut cache = self
            .client_configs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(&key) {
            return Ok(Arc::clone(c));
        }
        let expected = agent_identity(&self.trust_domain, node)?;
        let tls = client_config(
            self.identities.trust(),
            self.identities.store(),
            source.clone(),
            Some(expected),
        )?;
        cache.insert(key, Arc::clone(&tls));
        Ok(tls)
    }

    /// Applies the identity and authorization parts of a new config.
    pub fn reload(&self, config: &Config) -> Result<(), SecurityError> {
        self.identities.reconcile(&wanted_identities(config)?)?;
        Ok(self.authz.reload(&config.authz())?)
    }

    pub fn shutdown(&self) {
        self.identities.shutdown();
    }
}
