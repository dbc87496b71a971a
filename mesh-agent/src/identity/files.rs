//! Reading PEM material from disk and writing it back atomically. Errors name the file.

use std::fs;
use std::path::Path;

use rcgen::KeyPair;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::error::IdentityError;

pub(crate) fn invalid(path: &Path, reason: impl ToString) -> IdentityError {
    IdentityError::InvalidPem {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

pub(crate) fn read_to_string(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The first certificate of a PEM file.
pub(crate) fn parse_cert_pem(
    path: &Path,
    pem: &str,
) -> Result<CertificateDer<'static>, IdentityError> {
    match rustls_pemfile::certs(&mut pem.as_bytes()).next() {
        Some(Ok(der)) => Ok(der),
        Some(Err(e)) => Err(invalid(path, e)),
        None => Err(invalid(path, "no CERTIFICATE PEM block")),
    }
}

/// The first private key block of a PEM file, as it is (PKCS#8, SEC1 or PKCS#1).
pub(crate) fn parse_private_key_pem(
    path: &Path,
    pem: &str,
) -> Result<PrivateKeyDer<'static>, IdentityError> {
    match rustls_pemfile::private_key(&mut pem.as_bytes()) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(invalid(path, "no PRIVATE KEY PEM block")),
        Err(e) => Err(invalid(path, e)),
    }
}

/// One PEM block of `der` under `tag` (`CERTIFICATE`, `PRIVATE KEY`).
pub(crate) fn pem_block(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der))
}

/// A signing key from a PKCS#8 ("PRIVATE KEY") or SEC1 ("EC PRIVATE KEY") PEM file.
pub(crate) fn parse_key_pem(path: &Path, pem: &str) -> Result<KeyPair, IdentityError> {
    let key = parse_private_key_pem(path, pem)?;
    match &key {
        // ring only reads PKCS#8, but openssl and cert-manager commonly write SEC1 EC keys.
        PrivateKeyDer::Sec1(sec1) => sec1_to_pkcs8_candidates(sec1.secret_sec1_der())
            .into_iter()
            .find_map(|pkcs8| KeyPair::try_from(&PrivateKeyDer::Pkcs8(pkcs8)).ok())
            .ok_or_else(|| invalid(path, "EC PRIVATE KEY is not a P-256 or P-384 key")),
        PrivateKeyDer::Pkcs1(_) => Err(invalid(
            path,
            "RSA PRIVATE KEY (PKCS#1) is not supported; convert with `openssl pkcs8 -topk8 -nocrypt`",
        )),
        _ => KeyPair::try_from(&key).map_err(|e| invalid(path, e)),
    }
}

const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

/// Wraps a SEC1 ECPrivateKey into PKCS#8 for each supported curve; ring rejects the wrappers
/// whose curve does not match the key, which saves parsing the SEC1 parameters here.
fn sec1_to_pkcs8_candidates(sec1: &[u8]) -> Vec<PrivatePkcs8KeyDer<'static>> {
    [OID_P256, OID_P384]
        .into_iter()
        .map(|curve| {
            let algorithm = [der(0x06, OID_EC_PUBLIC_KEY), der(0x06, curve)].concat();
            let body = [der(0x02, &[0]), der(0x30, &algorithm), der(0x04, sec1)].concat();
            PrivatePkcs8KeyDer::from(der(0x30, &body))
        })
        .collect()
}

/// One DER TLV (definite length; keys are far below 64 KiB).
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xff {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

/// [`crate::atomic_file::write_atomically`] with the error naming the file as an identity error.
pub(crate) fn write_atomically(
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), IdentityError> {
    crate::atomic_file::write_atomically(path, contents, mode).map_err(|e| IdentityError::Write {
        path: e.path,
        source: e.source,
    })
}
