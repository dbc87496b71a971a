//! The mesh certificate authority: generated and persisted at first start (embedded mode) or
//! loaded from PEM files (a mounted Kubernetes Secret), and used to issue workload certificates.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::certs::{WorkloadCert, WorkloadSpec};
use super::error::IdentityError;
use super::files::{invalid, parse_cert_pem, parse_key_pem, read_to_string, write_atomically};
use super::spiffe::SpiffeId;

pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
/// Generated CAs outlive any deployment we expect; rotation of the CA itself is out of scope.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaf certificates are backdated so a peer whose clock is slightly behind accepts them.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);
const CA_CN_PREFIX: &str = "nodemesh CA ";

pub struct MeshCa {
    trust_domain: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    // Re-created from the CA certificate; rcgen only reads its subject and key identifier
    // when signing, so it is equivalent to the original for issuance.
    issuer: rcgen::Certificate,
    key: KeyPair,
    clock_skew: Duration,
}

// Hand-written so the CA key never ends up in a log line.
impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .field("clock_skew", &self.clock_skew)
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    /// Loads `ca.crt`/`ca.key` from `state_dir`, or generates and persists a new CA there.
    pub fn load_or_generate(state_dir: &Path, trust_domain: &str) -> Result<Self, IdentityError> {
        check_trust_domain(trust_domain)?;
        let cert_path = state_dir.join(CA_CERT_FILE);
        let key_path = state_dir.join(CA_KEY_FILE);
        // The certificate is written last, so its presence marks a complete CA.
        if cert_path.exists() {
            let ca = Self::from_pem_files_with_trust_domain(&cert_path, &key_path, trust_domain)?;
            tracing::info!(path = %cert_path.display(), trust_domain, "loaded mesh CA");
            return Ok(ca);
        }
        let ca = Self::generate(trust_domain)?;
        fs::create_dir_all(state_dir).map_err(|source| IdentityError::Write {
            path: state_dir.to_owned(),
            source,
        })?;
        write_atomically(&key_path, ca.key.serialize_pem().as_bytes(), 0o600)?;
        write_atomically(&cert_path, ca.cert_pem.as_bytes(), 0o644)?;
        tracing::info!(path = %cert_path.display(), trust_domain, "generated mesh CA");
        Ok(ca)
    }

    /// Generates a new in-memory CA (ECDSA P-256, CN "nodemesh CA <trust-domain>", 10 years).
    pub fn generate(trust_domain: &str) -> Result<Self, IdentityError> {
        check_trust_domain(trust_domain)?;
        let err = |source| IdentityError::GenerateCa {
            trust_domain: trust_domain.to_owned(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{CA_CN_PREFIX}{trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let now = now_seconds();
        params.not_before = now - DEFAULT_CLOCK_SKEW;
        params.not_after = now + CA_VALIDITY;
        let issuer = params.self_signed(&key).map_err(err)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            cert_der: issuer.der().clone(),
            cert_pem: issuer.pem(),
            issuer,
            key,
            clock_skew: DEFAULT_CLOCK_SKEW,
        })
    }

    /// Loads a CA from a PEM certificate and a PKCS#8 or SEC1 PEM private key. The trust domain
    /// is taken from the CN "nodemesh CA <trust-domain>" or a `spiffe://<trust-domain>` URI SAN.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, IdentityError> {
        Self::load_pem(cert, key, None)
    }

    /// Like [`MeshCa::from_pem_files`] for a CA whose certificate need not name the trust
    /// domain (e.g. one made by cert-manager); refused if it names a different one.
    pub fn from_pem_files_with_trust_domain(
        cert: &Path,
        key: &Path,
        trust_domain: &str,
    ) -> Result<Self, IdentityError> {
        check_trust_domain(trust_domain)?;
        Self::load_pem(cert, key, Some(trust_domain))
    }

    fn load_pem(cert: &Path, key: &Path, configured: Option<&str>) -> Result<Self, IdentityError> {
        let cert_pem = read_to_string(cert)?;
        let cert_der = parse_cert_pem(cert, &cert_pem)?;
        let key_pair = parse_key_pem(key, &read_to_string(key)?)?;

        let (named, spki) = inspect_ca_cert(cert, &cert_der)?;
        if spki != key_pair.public_key_der() {
            return Err(IdentityError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            });
        }
        let trust_domain = match (named, configured) {
            (Some(found), Some(expected)) if found != expected => {
                return Err(IdentityError::TrustDomainMismatch {
                    path: cert.to_owned(),
                    expected: expected.to_owned(),
                    found,
                })
            }
            (_, Some(expected)) => expected.to_owned(),
            (Some(found), None) => found,
            (None, None) => {
                return Err(IdentityError::UnknownTrustDomain {
                    path: cert.to_owned(),
                })
            }
        };
        let params =
            CertificateParams::from_ca_cert_der(&cert_der).map_err(|e| invalid(cert, e))?;
        let issuer = params
            .self_signed(&key_pair)
            .map_err(|e| invalid(cert, e))?;
        Ok(Self {
            trust_domain,
            cert_der,
            cert_pem,
            issuer,
            key: key_pair,
            clock_skew: DEFAULT_CLOCK_SKEW,
        })
    }

    /// Changes how far leaf certificates are backdated (default 60 s).
    pub fn with_clock_skew(mut self, skew: Duration) -> Self {
        self.clock_skew = skew;
        self
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf valid from now minus the clock skew until now plus `ttl`.
    pub fn issue(&self, spec: &WorkloadSpec, ttl: Duration) -> Result<WorkloadCert, IdentityError> {
        let now = SystemTime::now();
        let not_before = now
            .checked_sub(self.clock_skew)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.issue_with_validity(spec, not_before, now + ttl)
    }

    /// Issues a leaf with an explicit validity window (seconds precision, as in X.509). Meant for
    /// tests and tooling, e.g. to produce an already expired certificate.
    pub fn issue_with_validity(
        &self,
        spec: &WorkloadSpec,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, IdentityError> {
        let params = self.leaf_params(spec, not_before, not_after)?;
        let err = |source| IdentityError::Issue {
            id: spec.id.to_string(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(err)?;
        Ok(WorkloadCert {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: truncate_to_seconds(not_before),
            not_after: truncate_to_seconds(not_after),
            spiffe_id: spec.id.clone(),
        })
    }

    /// Signs the public key of a PEM CSR for `spec` (returns the PEM leaf) (valid from now minus the clock skew for
    /// `ttl`). Only the key is taken from the CSR: names and usages are the CA's, so a
    /// requester cannot ask for more than `spec`.
    pub fn sign_csr(
        &self,
        spec: &WorkloadSpec,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<String, IdentityError> {
        let err = |source| IdentityError::Issue {
            id: spec.id.to_string(),
            source,
        };
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(err)?;
        let now = SystemTime::now();
        let not_before = now
            .checked_sub(self.clock_skew)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        csr.params = self.leaf_params(spec, not_before, now + ttl)?;
        let cert = csr.signed_by(&self.issuer, &self.key).map_err(err)?;
        Ok(cert.pem())
    }

    /// The names, usages and validity of a workload leaf.
    fn leaf_params(
        &self,
        spec: &WorkloadSpec,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertificateParams, IdentityError> {
        let id = spec.id.to_string();
        if spec.id.trust_domain != self.trust_domain {
            return Err(IdentityError::ForeignTrustDomain {
                id,
                expected: self.trust_domain.clone(),
                found: spec.id.trust_domain.clone(),
            });
        }
        if !valid_dns_label(&spec.service) {
            return Err(IdentityError::InvalidService {
                id,
                service: spec.service.clone(),
            });
        }
        let not_before = truncate_to_seconds(not_before);
        let not_after = truncate_to_seconds(not_after);
        if not_after <= not_before {
            return Err(IdentityError::InvalidValidity {
                id,
                field: "not_after",
                reason: "must be later than not_before".to_owned(),
            });
        }

        let err = |source| IdentityError::Issue {
            id: id.clone(),
            source,
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.service.clone());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::URI(id.clone().try_into().map_err(err)?),
            SanType::DnsName(
                format!("{}.{}.svc", spec.service, spec.id.namespace)
                    .try_into()
                    .map_err(err)?,
            ),
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        Ok(params)
    }
}

fn check_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    // SpiffeId::new applies the segment rules; namespace and account are placeholders.
    SpiffeId::new(trust_domain, "ns", "sa")
        .map(|_| ())
        .map_err(|_| IdentityError::InvalidTrustDomain(trust_domain.to_owned()))
}

fn valid_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Keep the DER INTEGER positive and non-zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn now_seconds() -> OffsetDateTime {
    OffsetDateTime::from(truncate_to_seconds(SystemTime::now()))
}

// X.509 times have whole seconds; truncating first keeps WorkloadCert's times equal to the
// certificate's.
fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

/// Returns the trust domain the CA certificate names, if any, and its DER SubjectPublicKeyInfo.
fn inspect_ca_cert(path: &Path, der: &[u8]) -> Result<(Option<String>, Vec<u8>), IdentityError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| invalid(path, e))?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(invalid(
            path,
            "not a CA certificate (basicConstraints CA:TRUE missing)",
        ));
    }
    let spki = cert.public_key().raw.to_vec();
    let from_cn = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .find_map(|cn| cn.strip_prefix(CA_CN_PREFIX).map(str::to_owned));
    let from_san = || {
        let san = cert.subject_alternative_name().ok().flatten()?;
        san.value.general_names.iter().find_map(|name| match name {
            GeneralName::URI(uri) => uri
                .strip_prefix("spiffe://")
                .map(|td| td.trim_end_matches('/'))
                .filter(|td| !td.contains('/'))
                .map(str::to_owned),
            _ => None,
        })
    };
    let named = from_cn.or_else(from_san);
    if let Some(td) = &named {
        check_trust_domain(td)?;
    }
    Ok((named, spki))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use x509_parser::prelude::*;

    use super::*;

    fn spec(ca: &MeshCa) -> WorkloadSpec {
        let id = SpiffeId::new(ca.trust_domain(), "shop", "web-sa").expect("valid id");
        WorkloadSpec {
            id,
            service: "web".to_owned(),
        }
    }

    fn unix(t: SystemTime) -> i64 {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .expect("after 1970")
    }

    #[test]
    fn generated_ca_is_persisted_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let first = MeshCa::load_or_generate(&state, "cluster.local").expect("generate");
        let second = MeshCa::load_or_generate(&state, "cluster.local").expect("reload");
        assert_eq!(first.cert_der(), second.cert_der());
        assert_eq!(first.cert_pem(), second.cert_pem());
        assert_eq!(second.trust_domain(), "cluster.local");

        let mode = fs::metadata(state.join(CA_KEY_FILE))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "ca.key must be private");
        let names: Vec<_> = fs::read_dir(&state)
            .expect("state dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names.len(),
            2,
            "only ca.crt and ca.key, no temporary files: {names:?}"
        );

        let (_, cert) = X509Certificate::from_der(first.cert_der()).expect("parse CA");
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|c| c.as_str().ok())
            .collect();
        assert_eq!(cn, [Some("nodemesh CA cluster.local")]);
        assert!(cert.is_ca());
        let years = (cert.validity().not_after.timestamp()
            - cert.validity().not_before.timestamp())
            / (365 * 24 * 3600);
        assert_eq!(years, 10);

        // The reloaded CA signs with the persisted key: its leaves verify against the first CA.
        let leaf = second
            .issue(&spec(&second), Duration::from_secs(3600))
            .expect("issue");
        let (_, leaf) = X509Certificate::from_der(&leaf.chain[0]).expect("parse leaf");
        leaf.verify_signature(Some(cert.public_key()))
            .expect("signed by the persisted CA key");
    }

    #[test]
    fn reload_with_another_trust_domain_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        MeshCa::load_or_generate(dir.path(), "cluster.local").expect("generate");
        let err = MeshCa::load_or_generate(dir.path(), "other.local").expect_err("mismatch");
        assert!(
            matches!(err, IdentityError::TrustDomainMismatch { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("ca.crt"), "{err}");
    }

    #[test]
    fn from_pem_files_names_missing_and_garbage_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        MeshCa::load_or_generate(dir.path(), "cluster.local").expect("generate");
        let cert = dir.path().join(CA_CERT_FILE);
        let key = dir.path().join(CA_KEY_FILE);
        let missing = dir.path().join("absent.crt");
        let garbage = dir.path().join("garbage.pem");
        fs::write(&garbage, "not a PEM file\n").expect("write");

        let cases = [(&missing, &key, &missing), (&cert, &missing, &missing)];
        for (c, k, named) in cases {
            let err = MeshCa::from_pem_files(c, k).expect_err("missing file");
            assert!(matches!(err, IdentityError::Read { .. }), "{err}");
            assert!(
                err.to_string().contains(&named.display().to_string()),
                "{err}"
            );
        }
        let cases = [(&garbage, &key), (&cert, &garbage)];
        for (c, k) in cases {
            let err = MeshCa::from_pem_files(c, k).expect_err("garbage file");
            assert!(matches!(err, IdentityError::InvalidPem { .. }), "{err}");
            assert!(err.to_string().contains("garbage.pem"), "{err}");
        }
        MeshCa::from_pem_files(&cert, &key).expect("the real files load");
    }

    #[test]
    fn from_pem_files_refuses_a_key_of_another_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = tempfile::tempdir().expect("tempdir");
        MeshCa::load_or_generate(dir.path(), "cluster.local").expect("generate");
        MeshCa::load_or_generate(other.path(), "cluster.local").expect("generate");
        let err = MeshCa::from_pem_files(
            &dir.path().join(CA_CERT_FILE),
            &other.path().join(CA_KEY_FILE),
        )
        .expect_err("key mismatch");
        assert!(matches!(err, IdentityError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn issued_cert_has_exact_names_usages_and_validity() {
        let ca = MeshCa::generate("cluster.local").expect("ca");
        let ttl = Duration::from_secs(24 * 3600);
        let before = unix(SystemTime::now());
        let issued = ca.issue(&spec(&ca), ttl).expect("issue");
        let after = unix(SystemTime::now());
        assert_eq!(issued.chain.len(), 1);
        assert_eq!(
            issued.spiffe_id.to_string(),
            "spiffe://cluster.local/ns/shop/sa/web-sa"
        );

        let (_, cert) = X509Certificate::from_der(&issued.chain[0]).expect("parse leaf");
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|c| c.as_str().ok())
            .collect();
        assert_eq!(cn, [Some("web")]);
        let san = cert
            .subject_alternative_name()
            .expect("san ok")
            .expect("san present");
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "URI(spiffe://cluster.local/ns/shop/sa/web-sa)",
                "DNSName(web.shop.svc)"
            ],
            "exact SANs"
        );
        let ku = cert.key_usage().expect("ku ok").expect("ku present").value;
        assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.key_encipherment());
        let eku = cert
            .extended_key_usage()
            .expect("eku ok")
            .expect("eku present")
            .value;
        assert!(eku.server_auth && eku.client_auth && !eku.code_signing);
        assert!(!cert.is_ca());

        let (_, ca_cert) = X509Certificate::from_der(ca.cert_der()).expect("parse CA");
        assert_eq!(cert.issuer(), ca_cert.subject());
        cert.verify_signature(Some(ca_cert.public_key()))
            .expect("signed by the CA");

        let nb = cert.validity().not_before.timestamp();
        let na = cert.validity().not_after.timestamp();
        assert!(
            (before - 60..=after - 60).contains(&nb),
            "not_before = now - 1 min: {nb}"
        );
        assert!(
            (before + 86400..=after + 86400).contains(&na),
            "not_after = now + ttl: {na}"
        );
        assert_eq!(unix(issued.not_before), nb);
        assert_eq!(unix(issued.not_after), na);
        assert_eq!(unix(issued.renew_at()), nb + (na - nb) / 2);

        let second = ca.issue(&spec(&ca), ttl).expect("issue again");
        assert_ne!(
            second.chain[0], issued.chain[0],
            "fresh key and serial per issuance"
        );
    }

    #[test]
    fn issue_refuses_foreign_trust_domain_bad_service_and_empty_validity() {
        let ca = MeshCa::generate("cluster.local").expect("ca");
        let mut foreign = spec(&ca);
        foreign.id.trust_domain = "evil.local".to_owned();
        let err = ca
            .issue(&foreign, Duration::from_secs(60))
            .expect_err("foreign");
        assert!(err.to_string().contains("evil.local"), "{err}");

        let mut bad = spec(&ca);
        bad.service = "Web_1".to_owned();
        let err = ca
            .issue(&bad, Duration::from_secs(60))
            .expect_err("bad service");
        assert!(err.to_string().contains("\"Web_1\""), "{err}");

        let now = SystemTime::now();
        let err = ca
            .issue_with_validity(&spec(&ca), now, now)
            .expect_err("empty validity");
        assert!(err.to_string().contains("not_after"), "{err}");
    }

    // Made with `openssl ecparam -genkey -noout` (SEC1 "EC PRIVATE KEY") and `openssl req -x509`,
    // as a Kubernetes Secret would hold them.
    const OPENSSL_SEC1_KEY: &str = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIKwJ8NOj0K2g/BTJ7uTKuiBqQuYWTl8bilHphpKXLpBqoAoGCCqGSM49\nAwEHoUQDQgAE/wtekJSkFPzKyanCaKnssAKnsy3n65OypY7/DP7eUh752jRmQrqo\nnHIp2ugAFRp4X6rGS1PtVSh98jiHRguTcA==\n-----END EC PRIVATE KEY-----\n";
    const OPENSSL_CA_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB0TCCAXegAwIBAgIUf7vMWwHehzhiYD0gBimpP3NJzGswCgYIKoZIzj0EAwIw\nNjEQMA4GA1UECgwHRXhhbXBsZTEiMCAGA1UEAwwZbm9kZW1lc2ggQ0EgY2x1c3Rl\nci5sb2NhbDAeFw0yNjExMjMxMzU2MzBaFw0zNjExMjAxMzU2MzBaMDYxEDAOBgNV\nBAoMB0V4YW1wbGUxIjAgBgNVBAMMGW5vZGVtZXNoIENBIGNsdXN0ZXIubG9jYWww\nWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAT/C16QlKQU/MrJqcJoqeywAqezLefr\nk7Kljv8M/t5SHvnaNGZCuqiccina6AAVGnhfqsZLU+1VKH3yOIdGC5Nwo2MwYTAd\nBgNVHQ4EFgQUgBQ7kLjDqwulMzaPZLd3Y3S92V8wHwYDVR0jBBgwFoAUgBQ7kLjD\nqwulMzaPZLd3Y3S92V8wDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYw\nCgYIKoZIzj0EAwIDSAAwRQIhALhteIb5iUOxhPBJC+07Tu+0ZPsaz4SYhPVV57aB\nA6q6AiBL6jdn/kCO9Q7rABr9taEojU/TLCRxnw9i1iONi1KrFQ==\n-----END CERTIFICATE-----\n";

    #[test]
    fn loads_an_openssl_ca_with_a_sec1_key_and_issues_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        fs::write(&cert, OPENSSL_CA_CERT).expect("write");
        fs::write(&key, OPENSSL_SEC1_KEY).expect("write");
        let ca = MeshCa::from_pem_files(&cert, &key).expect("load openssl CA");
        assert_eq!(ca.trust_domain(), "cluster.local");
        let leaf = ca
            .issue(&spec(&ca), Duration::from_secs(60))
            .expect("issue");
        let (_, leaf) = X509Certificate::from_der(&leaf.chain[0]).expect("parse leaf");
        let (_, ca_cert) = X509Certificate::from_der(ca.cert_der()).expect("parse CA");
        assert_eq!(
            leaf.issuer(),
            ca_cert.subject(),
            "issuer DN copied exactly (O + CN)"
        );
        leaf.verify_signature(Some(ca_cert.public_key()))
            .expect("signed by the SEC1 key");

        let err = MeshCa::from_pem_files_with_trust_domain(&cert, &key, "other.local")
            .expect_err("CN names cluster.local");
        assert!(
            matches!(err, IdentityError::TrustDomainMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn a_ca_that_names_no_trust_domain_needs_one_configured() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Example Root");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).expect("root");
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert_path, key_path) = (dir.path().join("root.crt"), dir.path().join("root.key"));
        fs::write(&cert_path, root.pem()).expect("write");
        fs::write(&key_path, key.serialize_pem()).expect("write");

        let err = MeshCa::from_pem_files(&cert_path, &key_path).expect_err("no trust domain");
        assert!(
            matches!(err, IdentityError::UnknownTrustDomain { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("root.crt"), "{err}");
        let ca = MeshCa::from_pem_files_with_trust_domain(&cert_path, &key_path, "prod.example")
            .expect("configured trust domain");
        assert_eq!(ca.trust_domain(), "prod.example");
    }

    #[test]
    fn leftovers_of_an_interrupted_first_start_are_replaced() {
        // A crash after the key rename but before the certificate's leaves a key, no ca.crt
        // and maybe a temporary file: the CA counts as absent and is generated again.
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(CA_KEY_FILE), "stale half-written key").expect("write");
        fs::write(dir.path().join(".ca.crt.tmp"), "partial").expect("write");
        let ca = MeshCa::load_or_generate(dir.path(), "cluster.local").expect("generate");
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [CA_CERT_FILE, CA_KEY_FILE],
            "temporary file renamed into place"
        );
        let again = MeshCa::load_or_generate(dir.path(), "cluster.local").expect("reload");
        assert_eq!(again.cert_der(), ca.cert_der());
    }
}
