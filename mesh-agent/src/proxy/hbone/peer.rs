//! The identity of the agent-side peer, read from its client certificate.

use crate::identity::{SpiffeError, SpiffeId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub id: SpiffeId,
    /// The caller's service, from the certificate CN (workload certs carry CN=<service>).
    pub service: Option<String>,
}

impl PeerIdentity {
    pub fn from_cert_der(der: &[u8]) -> Result<Self, SpiffeError> {
        use x509_parser::prelude::*;
        let id = SpiffeId::from_cert_der(der)?;
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| SpiffeError::Certificate(e.to_string()))?;
        let service = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .filter(|cn| !cn.is_empty())
            .map(str::to_owned);
        Ok(Self { id, service })
    }
}
