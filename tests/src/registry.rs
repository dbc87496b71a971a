//! Helpers for registry tests and the registry demo: HTTP calls made from inside pods (so the
//! agent sees the pod's workload identity) and probe servers that can be stopped one by one.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{Pod, Topology};

static STARTED: AtomicU32 = AtomicU32::new(0);

impl Topology {
    /// `curl` run in a pod; returns (status, body).
    pub fn curl_in_pod(
        &self,
        pod: &Pod,
        method: &str,
        url: &str,
        body: &str,
    ) -> Result<(u16, String)> {
        let mut args = vec!["-s", "-m", "5", "-X", method, "-w", "\n%{http_code}", url];
        if !body.is_empty() {
            args.extend(["--data", body]);
        }
        let out = self.run_in_pod(pod, "curl", &args)?;
        let (body, code) = out.rsplit_once('\n').context("curl output")?;
        Ok((code.trim().parse()?, body.to_owned()))
    }

    /// Starts `meshprobe serve <port> <name>` in a pod; returns its pid (to stop it later).
    pub fn serve_probe(&self, pod: &Pod, port: u16, name: &str) -> Result<u32> {
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let out = self
            .workdir
            .join(format!("probe-{}-{port}-{n}.out", pod.name));
        let mut command = Command::new(crate::topology::probe_binary()?);
        command
            .args(["serve", &port.to_string(), name])
            .stdout(std::fs::File::create(&out)?);
        let pid = self.spawn_in_pod(pod, &mut command)?;
        self.wait_for("probe server listening", Duration::from_secs(10), || {
            Ok(std::fs::read_to_string(&out)
                .unwrap_or_default()
                .contains("listening"))
        })?;
        Ok(pid)
    }

    /// GET from a node's network namespace (no workload identity: an operator's view).
    pub fn get_in_netns(
        &self,
        netns: &str,
        addr: std::net::SocketAddr,
        path: &str,
    ) -> Result<(u16, String)> {
        self.in_netns(netns, || crate::http::get(addr, path))
    }
}
