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
    client_config, server_config, CertStore, IdentityError, IdentityManager, MeshCa,
    RotationConfig, SpiffeError, SpiffeId, WorkloadSpec,
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
    pub authz: ReloadableAuthorizer,
    pub pool: HbonePool,
    trust_domain: String,
    client_configs: Mutex<HashMap<(SpiffeId, String), Arc<ClientConfig>>>,
}

/// The identity this node's agent presents on its HBONE listener.
pub fn agent_identity(trust_domain: &str, node: &str) -> Result<SpiffeId, SpiffeError> {
    SpiffeId::new(trust_domain, AGENT_NAMESPACE, &agent_service_account(node))
}

/// The identity manager of this node: issuing through the CA service when one is configured
/// (no CA key here), else with the local CA.
pub fn identity_manager(config: &Config) -> Result<IdentityManager, SecurityError> {
    let rotation = RotationConfig {
        ttl: config.identity.cert_ttl,
        ..Default::default()
    };
    let Some(remote) = &config.identity.ca_service else {
        return Ok(IdentityManager::new(load_ca(config)?, rotation));
    };
    let node_id = agent_identity(&config.node.trust_domain, &config.node.name)?;
    let bundle = crate::identity::files::read_to_string(&remote.trust_bundle)?;
    let anchor = crate::identity::files::parse_cert_pem(&remote.trust_bundle, &bundle)?;
    let store = CertStore::new();
    store.insert(load_node_cert(
        &remote.node_cert,
        &remote.node_key,
        &node_id,
    )?)?;
    let store = Arc::new(store);
    let issuer = RemoteCa::new(
        remote.address,
        &anchor,
        store.clone(),
        node_id,
        remote.timeout,
    )?;
    Ok(IdentityManager::with_issuer(
        Arc::new(issuer),
        anchor,
        store,
        rotation,
    ))
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
        service: "nodemesh-agent".into(),
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
        let identities = identity_manager(config)?;
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
            self.identities.trust_anchor(),
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
            self.identities.trust_anchor(),
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
