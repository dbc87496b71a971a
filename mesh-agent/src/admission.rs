//! Admission: bounds on what the agent takes on, so that one caller cannot exhaust the fds,
//! memory or handshakes every other caller needs. Listeners and the proxy call into this module;
//! it holds no I/O of its own apart from the relay helper.

use std::collections::HashMap;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Pending (not yet completed) TLS handshakes on the HBONE port, in total and per source IP.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;
pub const MAX_PENDING_HANDSHAKES_PER_SOURCE: usize = 64;
/// Concurrent connections on each plain HTTP port (metrics, health, admin).
pub const MAX_HTTP_CONNECTIONS: usize = 256;
/// Time a plain HTTP client has to send its request headers.
pub const HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Raises the soft RLIMIT_NOFILE to the hard limit: every proxied connection takes two fds.
/// Returns (old soft limit, new soft limit).
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let old = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((old, limit.rlim_cur))
}

/// How often [`return_memory`] checks whether connections have drained.
const TRIM_EVERY: Duration = Duration::from_secs(2);
/// RSS growth since the last trim that makes a drain worth trimming for.
const TRIM_AFTER_GROWTH_KIB: u64 = 4 << 10;

/// Hands memory freed by closed connections back to the OS. glibc's malloc keeps freed pages
/// in its per-thread arenas: after a soak of 10,000 connections the agent stayed at the peak
/// (27 MB -> 75 MB; mimalloc did worse). So the arenas are trimmed once connections have
/// drained and RSS has grown since the last trim.
pub async fn return_memory(open_connections: impl Fn() -> u64) {
    let mut policy = TrimPolicy::new(rss_kib().unwrap_or(0));
    loop {
        tokio::time::sleep(TRIM_EVERY).await;
        let Some(rss) = rss_kib() else { continue };
        if policy.should_trim(open_connections(), rss) {
            trim();
            let after = rss_kib().unwrap_or(rss);
            tracing::debug!(
                rss_kib = rss,
                after_kib = after,
                "returned freed memory to the OS"
            );
            policy.trimmed(open_connections(), after);
        }
    }
}

/// When to trim: the open connections have fallen to half of the most seen since the last trim,
/// and RSS has grown by [`TRIM_AFTER_GROWTH_KIB`], either since the last trim or, after a drain
/// of at least [`TRIM_AFTER_DRAIN`] connections, above the lowest RSS a trim ever reached. The
/// first test covers a burst that opened and closed between two checks (never seen as open); the
/// second a drain that follows a trim made while part of a load was still open (that trim's RSS
/// is no baseline). Both keep memory still in use from being trimmed over and over.
struct TrimPolicy {
    high: u64,
    rss_after_trim: u64,
    rss_floor: u64,
}

/// Connections that must have closed since the last trim for a trim down to the floor.
const TRIM_AFTER_DRAIN: u64 = 100;

impl TrimPolicy {
    fn new(rss: u64) -> Self {
        Self {
            high: 0,
            rss_after_trim: rss,
            rss_floor: rss,
        }
    }

    fn should_trim(&mut self, open: u64, rss: u64) -> bool {
        self.high = self.high.max(open);
        let halved = open <= self.high / 2;
        let grew = rss >= self.rss_after_trim + TRIM_AFTER_GROWTH_KIB;
        let drained = self.high - open >= TRIM_AFTER_DRAIN;
        let above_floor = rss >= self.rss_floor + TRIM_AFTER_GROWTH_KIB;
        halved && (grew || (drained && above_floor))
    }

    fn trimmed(&mut self, open: u64, rss: u64) {
        self.high = open;
        self.rss_after_trim = rss;
        self.rss_floor = self.rss_floor.min(rss);
    }
}

/// This process's resident set in KiB.
fn rss_kib() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()? / 1024)
}

#[cfg(target_env = "gnu")]
fn trim() {
    // SAFETY: malloc_trim has no preconditions; it only releases free memory.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(target_env = "gnu"))]
fn trim() {}

/// Handles accept() errors for one listener: backs off (exponentially, up to 1 s) while the
/// process is out of fds or memory, instead of spinning, and logs at most once a second with the
/// number of errors it did not log.
pub struct AcceptErrors {
    listener: &'static str,
    backoff: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(1);

impl AcceptErrors {
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            backoff: BACKOFF_MIN,
            last_log: None,
            unlogged: 0,
        }
    }

    /// Out of a resource that only frees up when connections close.
    pub fn is_exhaustion(e: &std::io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
    }

    pub fn accepted(&mut self) {
        self.backoff = BACKOFF_MIN;
    }

    /// Logs (rate-limited) and waits before the next accept.
    pub async fn failed(&mut self, e: &std::io::Error) {
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
        {
            tracing::warn!(listener = self.listener, error = %e, suppressed = self.unlogged, backoff = ?self.backoff, "accept failed; backing off");
            self.last_log = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        let wait = if Self::is_exhaustion(e) {
            let wait = self.backoff;
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            wait
        } else {
            BACKOFF_MIN
        };
        tokio::time::sleep(wait).await;
    }
}

/// Concurrent connections in total and per key (calling identity, source address): a key is
/// capped below the total, so the rest of the total stays for everyone else.
pub struct ConnLimiter<K> {
    max_total: usize,
    max_per_key: usize,
    total: AtomicUsize,
    /// Taken once per connection (not per request or byte).
    per_key: Mutex<HashMap<K, usize>>,
    refused: AtomicU64,
}

/// Held for a connection's lifetime; releases its slots on drop.
pub struct Permit<K: Hash + Eq + Clone> {
    limiter: Arc<ConnLimiter<K>>,
    key: K,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Total,
    PerKey,
}

impl<K: Hash + Eq + Clone> ConnLimiter<K> {
    pub fn new(max_total: usize, max_per_key: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_key,
            total: AtomicUsize::new(0),
            per_key: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
        })
    }

    pub fn try_acquire(self: &Arc<Self>, key: K) -> Result<Permit<K>, Refused> {
        let mut per_key = self.per_key.lock().unwrap_or_else(PoisonError::into_inner);
        let held = per_key.get(&key).copied().unwrap_or(0);
        let refusal = if held >= self.max_per_key {
            Some(Refused::PerKey)
        } else if self.total.load(Ordering::Relaxed) >= self.max_total {
            Some(Refused::Total)
        } else {
            None
        };
        if let Some(r) = refusal {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(r);
        }
        per_key.insert(key.clone(), held + 1);
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(Permit {
            limiter: self.clone(),
            key,
        })
    }

    pub fn active(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl<K: Hash + Eq + Clone> Drop for Permit<K> {
    fn drop(&mut self) {
        let mut per_key = self
            .limiter
            .per_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = per_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                // Keys come and go with callers; an empty entry would be kept forever.
                per_key.remove(&self.key);
            }
        }
        self.limiter.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Copies both ways like [`tokio::io::copy_bidirectional`], giving up when no byte has moved in
/// either direction for `idle` (an abandoned peer must not pin two fds forever).
pub async fn relay_with_idle_timeout<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Duration,
) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let activity = Activity::new();
    let (mut a, mut b) = (activity.track(a), activity.track(b));
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut a, &mut b) => result,
        () = activity.idle_for(idle) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("idle for {idle:?}"),
        )),
    }
}

/// When bytes last moved through any of the streams it tracks, for an idle watchdog; one
/// atomic max per read or write, no timer per byte.
#[derive(Clone)]
pub struct Activity {
    /// Milliseconds since `start`.
    last: Arc<AtomicU64>,
    start: tokio::time::Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    pub fn new() -> Self {
        // tokio's clock (not std's), so the watchdog and the activity stamps agree.
        Self {
            last: Arc::new(AtomicU64::new(0)),
            start: tokio::time::Instant::now(),
        }
    }

    /// Wraps `inner` so its reads and writes count as activity.
    pub fn track<S>(&self, inner: S) -> Tracked<S> {
        Tracked {
            inner,
            activity: self.clone(),
        }
    }

    /// Resolves once no tracked stream has moved a byte for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let since = Duration::from_millis(self.last.load(Ordering::Relaxed));
            tokio::time::sleep_until(self.start + since + idle).await;
            if Duration::from_millis(self.last.load(Ordering::Relaxed)) == since {
                return;
            }
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.fetch_max(ms, Ordering::Relaxed);
    }
}

/// A stream whose reads and writes stamp an [`Activity`].
pub struct Tracked<S> {
    inner: S,
    activity: Activity,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn trims_after_a_drain_only_when_rss_grew_or_stayed_above_the_floor() {
        const MIB: u64 = 1 << 10;
        let mut policy = TrimPolicy::new(30 * MIB);
        // A burst that opened and closed between two checks: never seen open, RSS grew.
        assert!(policy.should_trim(0, 45 * MIB));
        policy.trimmed(0, 32 * MIB);
        // Idle at the trimmed size: nothing to do, however often it is asked.
        assert!(!policy.should_trim(0, 33 * MIB));
        // A steady load that grows memory is not trimmed while it runs...
        assert!(!policy.should_trim(1000, 80 * MIB));
        assert!(!policy.should_trim(900, 82 * MIB));
        // ...but is once it has halved.
        assert!(policy.should_trim(400, 82 * MIB));
        // That trim ran with 400 still open: once they close, it trims again although RSS
        // has not grown since.
        policy.trimmed(400, 70 * MIB);
        assert!(!policy.should_trim(350, 71 * MIB));
        assert!(policy.should_trim(0, 71 * MIB));
        // Memory the trim could not return does not trigger it again.
        policy.trimmed(0, 70 * MIB);
        assert!(!policy.should_trim(0, 71 * MIB));
        assert!(!policy.should_trim(60, 71 * MIB));
        assert!(!policy.should_trim(0, 71 * MIB));
        assert!(rss_kib().is_some_and(|kib| kib > 0));
    }

    #[test]
    fn per_key_cap_keeps_a_share_of_the_total_for_others() {
        let limiter = ConnLimiter::new(4, 2);
        let a1 = limiter.try_acquire("a").expect("a1");
        let _a2 = limiter.try_acquire("a").expect("a2");
        assert_eq!(limiter.try_acquire("a").err(), Some(Refused::PerKey));
        let _b1 = limiter.try_acquire("b").expect("b still gets in");
        let _c1 = limiter.try_acquire("c").expect("c1");
        assert_eq!(limiter.try_acquire("d").err(), Some(Refused::Total));
        drop(a1);
        let _d = limiter.try_acquire("d").expect("a slot came back");
        assert_eq!(limiter.refused(), 2);
        assert_eq!(limiter.active(), 4);
    }

    #[test]
    fn released_keys_leave_no_entries_behind() {
        let limiter = ConnLimiter::new(100, 10);
        for i in 0..50 {
            drop(limiter.try_acquire(i).expect("permit"));
        }
        assert!(limiter.per_key.lock().expect("lock").is_empty());
        assert_eq!(limiter.active(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn relay_gives_up_on_an_idle_pair_but_not_on_a_busy_one() {
        let (mut a, mut a_peer) = tokio::io::duplex(64);
        let (mut b, mut b_peer) = tokio::io::duplex(64);
        let relay = tokio::spawn(async move {
            relay_with_idle_timeout(&mut a, &mut b, Duration::from_secs(10)).await
        });
        // Traffic every 6 s keeps it alive past 10 s.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            a_peer.write_all(b"x").await.expect("write");
            let mut byte = [0u8; 1];
            b_peer.read_exact(&mut byte).await.expect("relayed");
        }
        assert!(!relay.is_finished());
        tokio::time::sleep(Duration::from_secs(11)).await;
        let result = relay.await.expect("task");
        assert_eq!(
            result.expect_err("idle").kind(),
            std::io::ErrorKind::TimedOut
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fd_exhaustion_backs_off_exponentially_and_logs_once_a_second() {
        let mut errors = AcceptErrors::new("test");
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let start = tokio::time::Instant::now();
        for _ in 0..8 {
            errors.failed(&emfile).await;
        }
        // 10 + 20 + 40 + ... + 1000 (capped) ms instead of a busy loop.
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(10 + 20 + 40 + 80 + 160 + 320 + 640 + 1000));
        assert_eq!(errors.backoff, BACKOFF_MAX);
        // 8 errors in ~2.3 s: about one log line a second, the rest counted as suppressed.
        assert!(errors.unlogged >= 4, "{}", errors.unlogged);
        errors.accepted();
        assert_eq!(errors.backoff, BACKOFF_MIN);
    }

    #[test]
    fn exhaustion_errors_are_recognised() {
        assert!(AcceptErrors::is_exhaustion(
            &std::io::Error::from_raw_os_error(libc::EMFILE)
        ));
        assert!(!AcceptErrors::is_exhaustion(
            &std::io::Error::from_raw_os_error(libc::ECONNABORTED)
        ));
    }
}
