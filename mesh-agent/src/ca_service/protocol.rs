//! One request and one response per connection, each a JSON line.

use serde::{Deserialize, Serialize};

/// Requests larger than this are refused unread (a CSR is well under 1 KiB).
pub const MAX_MESSAGE: u64 = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    /// The SPIFFE ID asked for.
    pub id: String,
    /// The workload's service name (CN and DNS SAN).
    pub service: String,
    /// PEM CSR carrying the public key; the private key never leaves the node.
    pub csr: String,
    pub ttl_secs: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignResponse {
    /// PEM leaf certificate, when signed.
    #[serde(default)]
    pub cert: Option<String>,
    /// PEM trust bundle (the CA certificate).
    #[serde(default)]
    pub bundle: Option<String>,
    /// Why the request was refused.
    #[serde(default)]
    pub error: Option<String>,
}
