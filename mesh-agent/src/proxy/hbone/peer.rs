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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn cert(cn: Option<&str>, uri: &str) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("ia5"))];
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn reads_spiffe_id_and_service_from_cn() {
        let peer = PeerIdentity::from_cert_der(&cert(
            Some("checkout"),
            "spiffe://cluster.local/ns/shop/sa/checkout-sa",
        ))
        .expect("peer");
        assert_eq!(
            peer.id.to_string(),
            "spiffe://cluster.local/ns/shop/sa/checkout-sa"
        );
        assert_eq!(peer.service.as_deref(), Some("checkout"));
    }

    #[test]
    fn missing_cn_means_no_service_and_missing_uri_is_an_error() {
        let peer = PeerIdentity::from_cert_der(&cert(None, "spiffe://cluster.local/ns/a/sa/b"))
            .expect("peer");
        assert_eq!(peer.service, None);
        let err = PeerIdentity::from_cert_der(&cert(Some("x"), "https://example.com/"))
            .expect_err("no SPIFFE URI");
        assert_eq!(err, SpiffeError::MissingUriSan);
    }
}
