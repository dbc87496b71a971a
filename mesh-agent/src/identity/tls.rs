//! rustls configurations for mesh mTLS: TLS 1.3 only, ring provider, ALPN h2, both sides
//! authenticated by certificates chaining to the mesh CA and identified by SPIFFE ID.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, SignatureScheme,
};

use super::error::IdentityError;
use super::spiffe::SpiffeId;
use super::store::CertStore;
use super::trust::{IntoTrustBundle, TrustBundle};

pub const ALPN_H2: &[u8] = b"h2";

/// The ring provider, built once: the workspace does not enable aws-lc-rs.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// Server side of mesh mTLS. Presents the current certificate of `local` from `store` (read at
/// each handshake, so renewals apply to new connections) and requires a client certificate that
/// chains to a root of `trust` (as it is at each handshake) and carries a SPIFFE ID in the same
/// trust domain.
pub fn server_config(
    trust: impl IntoTrustBundle,
    store: Arc<CertStore>,
    local: SpiffeId,
) -> Result<Arc<ServerConfig>, IdentityError> {
    let provider = crypto_provider();
    let verifier = Arc::new(SpiffeClientVerifier {
        trust: trust.into_bundle()?,
        trust_domain: local.trust_domain.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::TlsConfig(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(StoreResolver { store, id: local }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: a resumed session reuses the identity of the original handshake without
    // re-verifying it, so expiry and renewal would go unnoticed. Connections are pooled and
    // long-lived, so full handshakes cost little.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side of mesh mTLS. Presents the current certificate of `local` from `store` and
/// accepts a server whose chain verifies against a root of `trust` and whose SPIFFE ID equals
/// `expected_server` (or, when `None`, any SPIFFE ID in `local`'s trust domain).
///
/// Mesh peers are dialled by IP and certificates carry no IP SANs, so the `ServerName` given to
/// the connector is not checked; the SPIFFE ID is the name that is authenticated.
pub fn client_config(
    trust: impl IntoTrustBundle,
    store: Arc<CertStore>,
    local: SpiffeId,
    expected_server: Option<SpiffeId>,
) -> Result<Arc<ClientConfig>, IdentityError> {
    let provider = crypto_provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        trust: trust.into_bundle()?,
        provider: Arc::clone(&provider),
        trust_domain: local.trust_domain.clone(),
        expected: expected_server,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::TlsConfig(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(StoreResolver { store, id: local }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // See server_config: every connection authenticates with a full handshake.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SPIFFE ID of the peer's leaf certificate, once the handshake has completed.
pub fn peer_spiffe_id(conn: &CommonState) -> Result<SpiffeId, IdentityError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(IdentityError::NoPeerCertificate)?;
    Ok(SpiffeId::from_cert_der(leaf)?)
}

fn identity_failure(err: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// Checks the SPIFFE ID of a peer leaf that already passed chain verification.
fn check_peer_id(
    leaf: &CertificateDer<'_>,
    trust_domain: &str,
    expected: Option<&SpiffeId>,
) -> Result<(), rustls::Error> {
    let found = SpiffeId::from_cert_der(leaf).map_err(|e| identity_failure(e.into()))?;
    match expected {
        Some(expected) if *expected != found => {
            Err(identity_failure(IdentityError::PeerMismatch {
                expected: expected.to_string(),
                found: found.to_string(),
            }))
        }
        None if found.trust_domain != trust_domain => {
            Err(identity_failure(IdentityError::PeerForeignTrustDomain {
                expected: trust_domain.to_owned(),
                found: found.to_string(),
            }))
        }
        _ => Ok(()),
    }
}

/// Serves one workload's certificate from the store, on either side of the handshake.
#[derive(Debug)]
struct StoreResolver {
    store: Arc<CertStore>,
    id: SpiffeId,
}

impl StoreResolver {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let key = self.store.certified_key(&self.id);
        if key.is_none() {
            tracing::warn!(id = %self.id, "no certificate in store for TLS handshake");
        }
        key
    }
}

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    // The store may be filled after the config is built, so always offer to authenticate.
    fn has_certs(&self) -> bool {
        true
    }
}

/// WebPKI client verification plus a SPIFFE ID in our trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    trust: Arc<TrustBundle>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    // No hints: the bundle can change under a built config, and clients present their one
    // certificate whatever the hints say.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.trust.current().client_verifier.verify_client_cert(
            end_entity,
            intermediates,
            now,
        )?;
        check_peer_id(end_entity, &self.trust_domain, None)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust
            .current()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust
            .current()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust
            .current()
            .client_verifier
            .supported_verify_schemes()
    }
}

/// Chain, validity and serverAuth EKU against the mesh CA, then the SPIFFE ID instead of the
/// DNS/IP name (see `client_config`).
#[derive(Debug)]
struct SpiffeServerVerifier {
    trust: Arc<TrustBundle>,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
    expected: Option<SpiffeId>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.trust.current().store,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        check_peer_id(end_entity, &self.trust_domain, self.expected.as_ref())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
