//! Certificates issued by a remote CA kept on disk (one PEM file per identity: chain and key,
//! mode 0600), so an agent restarted while the CA service is down serves with the certificates
//! it still holds. Only leaf keys of this node's own identities are written; no CA key.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::PrivateKeyDer;

use super::files::{
    invalid, parse_cert_pem, parse_private_key_pem, pem_block, read_to_string, write_atomically,
};
use super::{CertIssuer, IdentityError, SpiffeId, WorkloadCert, WorkloadSpec};

/// The directory of persisted certificates.
#[derive(Clone, Debug)]
pub struct CertDir {
    dir: PathBuf,
}

impl CertDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `<namespace>.<service-account>.pem`: a namespace is a DNS label (no dot), so the name
    /// is unique per identity of the trust domain.
    pub fn path_of(&self, id: &SpiffeId) -> PathBuf {
        self.dir
            .join(format!("{}.{}.pem", id.namespace, id.service_account))
    }

    /// The persisted certificate of `id` if it is still valid now; a missing, unreadable or
    /// expired file is none (the caller then asks the CA).
    pub fn load_valid(&self, id: &SpiffeId) -> Option<WorkloadCert> {
        let path = self.path_of(id);
        if !path.exists() {
            return None;
        }
        match load_pem_pair(&path, &path, id) {
            Ok(cert) if cert.is_valid_at(SystemTime::now()) => Some(cert),
            Ok(_) => {
                tracing::info!(%id, path = %path.display(), "persisted certificate expired");
                None
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "persisted certificate unusable");
                None
            }
        }
    }

    pub fn save(&self, cert: &WorkloadCert) -> Result<(), IdentityError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| IdentityError::Write {
            path: self.dir.clone(),
            source,
        })?;
        let mut text = String::new();
        for der in &cert.chain {
            text.push_str(&pem_block("CERTIFICATE", der.as_ref()));
        }
        text.push_str(&pem_block("PRIVATE KEY", cert.key.secret_der()));
        write_atomically(&self.path_of(&cert.spiffe_id), text.as_bytes(), 0o600)
    }

    pub fn remove(&self, id: &SpiffeId) {
        let _ = std::fs::remove_file(self.path_of(id));
    }
}

/// An issuer whose every certificate is also written to a [`CertDir`]. A failed write is logged
/// and the certificate still used: serving beats persisting.
pub struct Persisting {
    pub inner: Arc<dyn CertIssuer>,
    pub dir: CertDir,
}

impl CertIssuer for Persisting {
    fn issue(&self, spec: &WorkloadSpec, ttl: Duration) -> Result<WorkloadCert, IdentityError> {
        let cert = self.inner.issue(spec, ttl)?;
        if let Err(e) = self.dir.save(&cert) {
            tracing::error!(id = %spec.id, error = %e, "persisting the certificate");
        }
        Ok(cert)
    }
}

/// A certificate (PEM at `cert`, first block the leaf) and its key (PEM at `key`; may be the
/// same file), checked to carry `expected`.
pub fn load_pem_pair(
    cert: &Path,
    key: &Path,
    expected: &SpiffeId,
) -> Result<WorkloadCert, IdentityError> {
    let pem = read_to_string(cert)?;
    let key_pem = if key == cert {
        pem.clone()
    } else {
        read_to_string(key)?
    };
    let key = parse_private_key_pem(key, &key_pem)?;
    certificate_from(cert, &pem, key, expected)
}

/// A [`WorkloadCert`] from a PEM leaf and its key, with the validity read from the leaf.
pub fn certificate_from(
    origin: &Path,
    pem: &str,
    key: PrivateKeyDer<'static>,
    expected: &SpiffeId,
) -> Result<WorkloadCert, IdentityError> {
    let der = parse_cert_pem(origin, pem)?;
    let id = SpiffeId::from_cert_der(&der)?;
    if &id != expected {
        return Err(IdentityError::PeerMismatch {
            expected: expected.to_string(),
            found: id.to_string(),
        });
    }
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| invalid(origin, e))?;
    let at = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    let validity = cert.validity();
    Ok(WorkloadCert {
        not_before: at(validity.not_before),
        not_after: at(validity.not_after),
        chain: vec![der],
        key,
        spiffe_id: id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::MeshCa;

    #[test]
    fn a_saved_certificate_loads_back_while_valid() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = MeshCa::generate("cluster.local").expect("ca");
        let spec = WorkloadSpec {
            id: SpiffeId::new("cluster.local", "shop", "client").expect("id"),
            service: "client".into(),
        };
        let store = CertDir::new(dir.path().join("certs"));
        assert!(store.load_valid(&spec.id).is_none());
        let issuer = Persisting {
            inner: Arc::new(ca),
            dir: store.clone(),
        };
        let cert = issuer
            .issue(&spec, Duration::from_secs(3600))
            .expect("issued");
        let loaded = store.load_valid(&spec.id).expect("loaded");
        assert_eq!(loaded.chain, cert.chain);
        assert_eq!(loaded.key.secret_der(), cert.key.secret_der());
        let other = SpiffeId::new("cluster.local", "shop", "server").expect("id");
        assert!(store.load_valid(&other).is_none());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.path_of(&spec.id))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        store.remove(&spec.id);
        assert!(store.load_valid(&spec.id).is_none());
    }
}
