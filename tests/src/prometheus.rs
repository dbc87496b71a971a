//! A real Prometheus server (Debian's `prometheus`) inside a node's network namespace, scraping
//! agents there with a fast interval; queried through its HTTP API. Killed on drop.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{Node, Topology};

/// Where the server listens inside the node namespace (its own loopback, so parallel tests never
/// collide).
const LISTEN: &str = "127.0.0.1:9090";
/// Fast enough that a test waits about a second for fresh samples.
const SCRAPE_INTERVAL: &str = "250ms";

pub struct Prometheus<'a> {
    topo: &'a Topology,
    child: Child,
    netns: String,
    addr: SocketAddr,
    pub log: PathBuf,
}

/// One sample of an instant vector: its labels and value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: serde_json::Map<String, serde_json::Value>,
    pub value: f64,
}

impl<'a> Prometheus<'a> {
    /// Starts Prometheus in `node`'s namespace scraping `/metrics` of each target (job
    /// `nodemesh`), with a config and data directory of its own under the topology's workdir, and
    /// waits until it is ready.
    pub fn start(
        topo: &'a Topology,
        node: &Node,
        targets: &[SocketAddr],
    ) -> Result<Prometheus<'a>> {
        let dir = topo.workdir.join(format!("prometheus-{}", node.instance));
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  scrape_timeout: {SCRAPE_INTERVAL}\n\
                 scrape_configs:\n  - job_name: nodemesh\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )?;
        let log = dir.join("prometheus.log");
        let ns = File::open(format!("/run/netns/{}", node.netns))
            .with_context(|| format!("opening netns {}", node.netns))?;
        let ns_fd = ns.as_raw_fd();
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={LISTEN}"))
            .arg("--log.level=warn")
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        // SAFETY: setns is async-signal-safe and the fd was opened before fork.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .context("starting prometheus (install it with `cargo xtask setup`)")?;
        let mut server = Prometheus {
            topo,
            child,
            netns: node.netns.clone(),
            addr: LISTEN.parse()?,
            log,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self.get("/-/ready");
            if matches!(ready, Ok((200, _))) {
                return Ok(());
            }
            if self.child.try_wait()?.is_some() || Instant::now() > deadline {
                bail!(
                    "prometheus did not become ready ({ready:?}); log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Result<(u16, String)> {
        let addr = self.addr;
        self.topo
            .in_netns(&self.netns, || crate::http::get(addr, path))
    }

    /// Evaluates a PromQL instant query through /api/v1/query.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let (status, body) = self.get(&format!("/api/v1/query?query={}", url_encode(promql)))?;
        let json: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("query {promql:?}: answer {status} is not JSON: {body}"))?;
        if status != 200 || json["status"] != "success" {
            bail!("query {promql:?} failed ({status}): {body}");
        }
        let result = json["data"]["result"]
            .as_array()
            .with_context(|| format!("query {promql:?}: no vector result: {body}"))?;
        result
            .iter()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("query {promql:?}: bad sample {r}"))?;
                let labels = r["metric"].as_object().cloned().unwrap_or_default();
                Ok(Sample { labels, value })
            })
            .collect()
    }

    /// The single value of a query, or None when the result is empty.
    pub fn value(&self, promql: &str) -> Result<Option<f64>> {
        let samples = self.query(promql)?;
        match samples.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.value)),
            many => bail!("query {promql:?} returned {} series: {many:?}", many.len()),
        }
    }

    /// Polls `promql` until `check` accepts its value (fresh scrapes arrive every 250 ms),
    /// failing after `timeout` with the last value seen.
    pub fn wait_for_value(
        &self,
        promql: &str,
        timeout: Duration,
        check: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.value(promql)?;
            if let Some(v) = value.filter(|v| check(*v)) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?}: {promql} = {value:?}; prometheus log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters stay as they are).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs `promtool check metrics` on an exposition text; Err with promtool's complaints if any
/// (except the one expected finding on Istio's duration name, see [`crate::http::promtool_check`]).
pub fn promtool_check_metrics(text: &str) -> Result<()> {
    crate::http::promtool_check(text)
}

#[cfg(test)]
mod tests {
    #[test]
    fn url_encode_escapes_promql() {
        assert_eq!(
            super::url_encode("sum(x{a=\"b c\"})"),
            "sum%28x%7Ba%3D%22b%20c%22%7D%29"
        );
    }
}
