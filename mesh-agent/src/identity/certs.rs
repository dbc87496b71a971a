//! Workload certificate types shared by the CA, the store, rotation and the TLS configs.

use std::fmt;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::spiffe::SpiffeId;

/// What the CA needs to know to issue a workload certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadSpec {
    pub id: SpiffeId,
    /// Kubernetes service name: becomes the CN and the DNS SAN `<service>.<namespace>.svc`.
    pub service: String,
}

/// A private key with its certificate chain (leaf first, CA not included: peers hold it as the
/// trust anchor).
pub struct WorkloadCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub spiffe_id: SpiffeId,
}

impl WorkloadCert {
    /// Total validity window, including the clock-skew backdating.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO)
    }

    /// When rotation should replace this certificate: half-way through its lifetime, which
    /// leaves the other half to retry if the CA is unavailable.
    pub fn renew_at(&self) -> SystemTime {
        self.not_before + self.lifetime() / 2
    }

    /// Whether `now` lies inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.chain.first()
    }
}

impl Clone for WorkloadCert {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
            spiffe_id: self.spiffe_id.clone(),
        }
    }
}

// Hand-written so the private key can never end up in a log line.
impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}
