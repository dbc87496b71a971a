//! Renews workload certificates at half their lifetime. A failed renewal keeps the current (still
//! valid) certificate and retries with exponential backoff, so a CA outage shorter than half the
//! TTL is invisible to traffic.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ca::MeshCa;
use super::certs::{WorkloadCert, WorkloadSpec};
use super::error::IdentityError;
use super::store::CertStore;

/// Something that issues workload certificates; the mesh CA in production.
pub trait CertIssuer: Send + Sync {
    fn issue(&self, spec: &WorkloadSpec, ttl: Duration) -> Result<WorkloadCert, IdentityError>;
}

impl CertIssuer for MeshCa {
    fn issue(&self, spec: &WorkloadSpec, ttl: Duration) -> Result<WorkloadCert, IdentityError> {
        MeshCa::issue(self, spec, ttl)
    }
}

/// Retry delays after a failed issuance: `initial`, doubling up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    pub fn next(&self, current: Duration) -> Duration {
        current.saturating_mul(2).min(self.max)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationConfig {
    /// Requested lifetime of each issued certificate.
    pub ttl: Duration,
    pub backoff: Backoff,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 3600),
            backoff: Backoff::default(),
        }
    }
}

/// Keeps `store` holding a fresh certificate for `spec` until `shutdown` becomes true or its
/// sender is dropped. Issues immediately if the store has no certificate for the workload.
pub fn spawn_rotation(
    issuer: Arc<dyn CertIssuer>,
    store: Arc<CertStore>,
    spec: WorkloadSpec,
    config: RotationConfig,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    spawn_rotation_renewing(issuer, store, spec, config, shutdown, false)
}

/// [`spawn_rotation`]; with `renew_now` the first renewal starts at once whatever the store
/// holds (a node's bootstrap certificate is replaced by one from the CA's current root).
pub fn spawn_rotation_renewing(
    issuer: Arc<dyn CertIssuer>,
    store: Arc<CertStore>,
    spec: WorkloadSpec,
    config: RotationConfig,
    shutdown: watch::Receiver<bool>,
    renew_now: bool,
) -> JoinHandle<()> {
    tokio::spawn(rotate(issuer, store, spec, config, shutdown, renew_now))
}

async fn rotate(
    issuer: Arc<dyn CertIssuer>,
    store: Arc<CertStore>,
    spec: WorkloadSpec,
    config: RotationConfig,
    mut shutdown: watch::Receiver<bool>,
    mut renew_now: bool,
) {
    let mut just_renewed = false;
    loop {
        let mut wait = match std::mem::take(&mut renew_now) {
            true => Duration::ZERO,
            false => store
                .get(&spec.id)
                .map_or(Duration::ZERO, |c| until(c.renew_at())),
        };
        if just_renewed {
            // A TTL shorter than the CA's clock skew puts renew_at in the past; never spin.
            wait = wait.max(config.backoff.initial);
        }
        if !sleep_or_shutdown(wait, &mut shutdown).await {
            break;
        }
        if !renew(&issuer, &store, &spec, &config, &mut shutdown).await {
            break;
        }
        just_renewed = true;
    }
    tracing::debug!(id = %spec.id, "certificate rotation stopped");
}

/// Issues until it succeeds; returns false if shut down first.
async fn renew(
    issuer: &Arc<dyn CertIssuer>,
    store: &CertStore,
    spec: &WorkloadSpec,
    config: &RotationConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut delay = config.backoff.initial;
    loop {
        // Off the async workers: a remote issuer blocks on the network (with timeouts).
        let (issuing, wanted, ttl) = (issuer.clone(), spec.clone(), config.ttl);
        let issued = tokio::task::spawn_blocking(move || issuing.issue(&wanted, ttl))
            .await
            .unwrap_or_else(|e| Err(IdentityError::Issuer(format!("task failed: {e}"))));
        match issued.and_then(|cert| {
            let (not_after, renew_at) = (cert.not_after, cert.renew_at());
            store.insert(cert).map(|_| (not_after, renew_at))
        }) {
            Ok((not_after, renew_at)) => {
                tracing::info!(id = %spec.id, ?not_after, ?renew_at, "workload certificate issued");
                return true;
            }
            Err(error) => {
                let current = store.get(&spec.id);
                match current.filter(|c| c.is_valid_at(SystemTime::now())) {
                    Some(c) => tracing::warn!(id = %spec.id, %error, retry_in = ?delay,
                        valid_until = ?c.not_after, "certificate renewal failed, keeping current"),
                    None => tracing::error!(id = %spec.id, %error, retry_in = ?delay,
                        "certificate issuance failed and no valid certificate is held"),
                }
                if !sleep_or_shutdown(delay, shutdown).await {
                    return false;
                }
                delay = config.backoff.next(delay);
            }
        }
    }
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

/// Sleeps for `d`; returns false instead if shutdown was requested (or its sender dropped).
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        _ = shutdown.wait_for(|stop| *stop) => false,
    }
}
