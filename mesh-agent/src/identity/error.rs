//! Errors of the identity module. Every variant names the file, field or value involved so an
//! operator can act on the message alone.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::spiffe::SpiffeError;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    InvalidPem { path: PathBuf, reason: String },
    #[error("private key {key} does not belong to the CA certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("CA certificate {path} belongs to trust domain {found:?}, expected {expected:?}")]
    TrustDomainMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("CA certificate {path}: cannot determine the trust domain (expected CN \"nodemesh CA <trust-domain>\" or a spiffe://<trust-domain> URI SAN)")]
    UnknownTrustDomain { path: PathBuf },
    #[error("trust domain {0:?} must be non-empty lowercase letters, digits, '-', '.' or '_'")]
    InvalidTrustDomain(String),
    #[error("workload {id}: service name {service:?} must be a DNS label (lowercase letters, digits, '-')")]
    InvalidService { id: String, service: String },
    #[error("workload {id}: trust domain {found:?} differs from the CA's {expected:?}")]
    ForeignTrustDomain {
        id: String,
        expected: String,
        found: String,
    },
    #[error("workload {id}: validity {field} {reason}")]
    InvalidValidity {
        id: String,
        field: &'static str,
        reason: String,
    },
    #[error("generating the mesh CA for trust domain {trust_domain:?}: {source}")]
    GenerateCa {
        trust_domain: String,
        source: rcgen::Error,
    },
    #[error("issuing a certificate for {id}: {source}")]
    Issue { id: String, source: rcgen::Error },
    #[error("certificate for {id} cannot be used by rustls: {source}")]
    UnusableCert { id: String, source: rustls::Error },
    #[error("CA certificate cannot be used as a trust anchor: {0}")]
    TrustAnchor(String),
    #[error("building the TLS configuration: {0}")]
    TlsConfig(String),
    #[error("peer certificate has SPIFFE ID {found}, expected {expected}")]
    PeerMismatch { expected: String, found: String },
    #[error("peer certificate has SPIFFE ID {found}, outside trust domain {expected:?}")]
    PeerForeignTrustDomain { expected: String, found: String },
    #[error("certificate issuer: {0}")]
    Issuer(String),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error(transparent)]
    Spiffe(#[from] SpiffeError),
}
