//! The trust bundle: the root certificates peers' chains must verify against. Usually one (the
//! mesh CA); two while a root is rotated (new beside old). Replaceable at runtime: every new
//! handshake verifies against the bundle in force then, established connections are untouched.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::error::IdentityError;
use super::files;

/// One version of the bundle with the verifiers built from it.
pub(crate) struct Roots {
    pub certs: Vec<CertificateDer<'static>>,
    pub store: Arc<RootCertStore>,
    pub client_verifier: Arc<dyn ClientCertVerifier>,
}

pub struct TrustBundle {
    roots: ArcSwap<Roots>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots.load().certs.len())
            .finish()
    }
}

impl TrustBundle {
    pub fn new(certs: Vec<CertificateDer<'static>>) -> Result<Arc<Self>, IdentityError> {
        Ok(Arc::new(Self {
            roots: ArcSwap::from_pointee(build(certs)?),
        }))
    }

    /// The bundle of a PEM file (every CERTIFICATE block in it).
    pub fn from_file(path: &Path) -> Result<Arc<Self>, IdentityError> {
        Self::new(read_certs(path)?)
    }

    /// Replaces the roots by those of `path` if they differ; returns whether they did. A file
    /// that does not parse keeps the current roots (the error says why).
    pub fn reload(&self, path: &Path) -> Result<bool, IdentityError> {
        self.replace(read_certs(path)?)
    }

    /// Replaces the roots by `certs` if they differ; returns whether they did.
    pub fn replace(&self, certs: Vec<CertificateDer<'static>>) -> Result<bool, IdentityError> {
        if certs == self.roots.load().certs {
            return Ok(false);
        }
        self.roots.store(Arc::new(build(certs)?));
        Ok(true)
    }

    pub fn certs(&self) -> Vec<CertificateDer<'static>> {
        self.roots.load().certs.clone()
    }

    /// The roots as a PEM bundle (one CERTIFICATE block each).
    pub fn to_pem(&self) -> String {
        self.roots
            .load()
            .certs
            .iter()
            .map(|c| files::pem_block("CERTIFICATE", c.as_ref()))
            .collect()
    }

    /// Whether `leaf` (a client/server leaf signed directly by a root) chains to a root of the
    /// bundle in force now and is valid now: a certificate from a removed root is no longer
    /// worth serving with.
    pub fn verifies(&self, leaf: &CertificateDer<'_>) -> bool {
        self.roots
            .load()
            .client_verifier
            .verify_client_cert(leaf, &[], rustls::pki_types::UnixTime::now())
            .is_ok()
    }

    pub(crate) fn current(&self) -> Arc<Roots> {
        self.roots.load_full()
    }
}

/// Every certificate of a PEM bundle file; at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem = files::read_to_string(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| files::invalid(path, e))?;
    if certs.is_empty() {
        return Err(files::invalid(path, "no CERTIFICATE PEM block"));
    }
    Ok(certs)
}

fn build(certs: Vec<CertificateDer<'static>>) -> Result<Roots, IdentityError> {
    if certs.is_empty() {
        return Err(IdentityError::TrustAnchor("empty trust bundle".into()));
    }
    let mut store = RootCertStore::empty();
    for cert in &certs {
        store
            .add(cert.clone())
            .map_err(|e| IdentityError::TrustAnchor(e.to_string()))?;
    }
    let store = Arc::new(store);
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(store.clone(), super::tls::crypto_provider())
            .build()
            .map_err(|e| IdentityError::TlsConfig(e.to_string()))?;
    Ok(Roots {
        certs,
        store,
        client_verifier,
    })
}

/// What TLS configs accept as their roots: a fixed CA certificate or a live bundle.
pub trait IntoTrustBundle {
    fn into_bundle(self) -> Result<Arc<TrustBundle>, IdentityError>;
}

impl IntoTrustBundle for &CertificateDer<'_> {
    fn into_bundle(self) -> Result<Arc<TrustBundle>, IdentityError> {
        TrustBundle::new(vec![self.clone().into_owned()])
    }
}

impl IntoTrustBundle for &Arc<TrustBundle> {
    fn into_bundle(self) -> Result<Arc<TrustBundle>, IdentityError> {
        Ok(self.clone())
    }
}
