//! The agent's side of the CA service: a [`CertIssuer`] that generates the key on the node,
//! sends a CSR over mTLS (presenting the node's current identity certificate) and returns the
//! signed certificate. Blocking with timeouts on connect, read and write; rotation calls it off
//! the async workers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use super::protocol::{SignRequest, SignResponse, MAX_MESSAGE};
use super::CA_SERVICE_ACCOUNT;
use crate::config::AGENT_NAMESPACE;
use crate::identity::persisted::certificate_from;
use crate::identity::{
    client_config, CertIssuer, CertStore, IdentityError, SpiffeId, TrustBundle, WorkloadCert,
    WorkloadSpec,
};

pub struct RemoteCa {
    address: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    failures: prometheus::IntCounter,
}

impl RemoteCa {
    /// Talks to the CA service at `address` as `node_id`, whose certificate `store` holds (the
    /// bootstrap certificate, then its renewals); the service must present its own identity
    /// chained to a root of `trust`.
    pub fn new(
        address: SocketAddr,
        trust: &Arc<TrustBundle>,
        store: Arc<CertStore>,
        node_id: SpiffeId,
        timeout: Duration,
    ) -> Result<Self, IdentityError> {
        let server = SpiffeId::new(&node_id.trust_domain, AGENT_NAMESPACE, CA_SERVICE_ACCOUNT)?;
        let tls = client_config(trust, store, node_id, Some(server))?;
        let failures = prometheus::IntCounter::new(
            "nodemesh_ca_renewal_failures_total",
            "failed certificate requests to the CA service (unreachable, timed out or refused); renewal retries with backoff",
        )
        .map_err(|e| IdentityError::Issuer(e.to_string()))?;
        Ok(Self {
            address,
            tls,
            timeout,
            failures,
        })
    }

    /// The counter of failed requests (register it to export it).
    pub fn failures(&self) -> prometheus::IntCounter {
        self.failures.clone()
    }

    fn exchange(&self, request: &SignRequest) -> Result<SignResponse, IdentityError> {
        let io = |e: std::io::Error| IdentityError::Issuer(format!("{}: {e}", self.address));
        let tcp = TcpStream::connect_timeout(&self.address, self.timeout).map_err(io)?;
        tcp.set_read_timeout(Some(self.timeout)).map_err(io)?;
        tcp.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let name = ServerName::try_from("nodemesh-ca")
            .map_err(|e| IdentityError::Issuer(e.to_string()))?;
        let conn = rustls::ClientConnection::new(self.tls.clone(), name)
            .map_err(|e| IdentityError::Issuer(e.to_string()))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut line =
            serde_json::to_vec(request).map_err(|e| IdentityError::Issuer(e.to_string()))?;
        line.push(b'\n');
        tls.write_all(&line).map_err(io)?;
        tls.flush().map_err(io)?;
        let mut reply = String::new();
        BufReader::new(tls.take(MAX_MESSAGE))
            .read_line(&mut reply)
            .map_err(io)?;
        serde_json::from_str(&reply)
            .map_err(|e| IdentityError::Issuer(format!("{}: bad response: {e}", self.address)))
    }
}

impl CertIssuer for RemoteCa {
    fn issue(&self, spec: &WorkloadSpec, ttl: Duration) -> Result<WorkloadCert, IdentityError> {
        let issued = self.request(spec, ttl);
        if issued.is_err() {
            self.failures.inc();
        }
        issued
    }
}

impl RemoteCa {
    fn request(&self, spec: &WorkloadSpec, ttl: Duration) -> Result<WorkloadCert, IdentityError> {
        let err = |source| IdentityError::Issue {
            id: spec.id.to_string(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(err)?;
        let response = self.exchange(&SignRequest {
            id: spec.id.to_string(),
            service: spec.service.clone(),
            csr,
            ttl_secs: ttl.as_secs(),
        })?;
        if let Some(reason) = response.error {
            return Err(IdentityError::Issuer(format!("refused: {reason}")));
        }
        let pem = response
            .cert
            .ok_or_else(|| IdentityError::Issuer("response without a certificate".into()))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        certificate_from(Path::new(&self.address.to_string()), &pem, key, &spec.id)
    }
}

/// The node's bootstrap certificate (`mesh-agent ca issue-node`) from its files.
pub fn load_node_cert(
    cert: &Path,
    key: &Path,
    expected: &SpiffeId,
) -> Result<WorkloadCert, IdentityError> {
    crate::identity::persisted::load_pem_pair(cert, key, expected)
}
