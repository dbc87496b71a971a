//! SPIFFE IDs of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpiffeError {
    #[error("SPIFFE ID {0:?} must start with spiffe://")]
    Scheme(String),
    #[error("SPIFFE ID {0:?} must have the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
    #[error("SPIFFE ID {id:?}: {part} {value:?} must be non-empty lowercase letters, digits, '-', '.' or '_'")]
    Segment {
        id: String,
        part: &'static str,
        value: String,
    },
    #[error("certificate could not be parsed: {0}")]
    Certificate(String),
    #[error("certificate has no spiffe:// URI SAN")]
    MissingUriSan,
}

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeError> {
        let id = Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let shown = id.to_string();
        for (part, value) in [
            ("trust domain", trust_domain),
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if !valid_segment(value) {
                return Err(SpiffeError::Segment {
                    id: shown,
                    part,
                    value: value.to_owned(),
                });
            }
        }
        Ok(id)
    }

    /// Reads the SPIFFE ID from the URI SAN of a DER certificate.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, SpiffeError> {
        use x509_parser::prelude::*;
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| SpiffeError::Certificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| SpiffeError::Certificate(e.to_string()))?
            .ok_or(SpiffeError::MissingUriSan)?;
        san.value
            .general_names
            .iter()
            .find_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(uri.parse()),
                _ => None,
            })
            .unwrap_or(Err(SpiffeError::MissingUriSan))
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        })
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::Scheme(s.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa),
            _ => Err(SpiffeError::Shape(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web"
            .parse()
            .expect("valid id");
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.service_account, "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    }

    #[test]
    fn rejects_malformed_ids_naming_the_problem() {
        assert!(matches!(
            "http://x/ns/a/sa/b".parse::<SpiffeId>(),
            Err(SpiffeError::Scheme(_))
        ));
        assert!(matches!(
            "spiffe://x/ns/a".parse::<SpiffeId>(),
            Err(SpiffeError::Shape(_))
        ));
        let err = "spiffe://x/ns/A/sa/b"
            .parse::<SpiffeId>()
            .expect_err("uppercase namespace");
        assert!(err.to_string().contains("namespace \"A\""), "{err}");
    }
}
