//! Packet captures with tcpdump inside a node's network namespace.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use crate::{Node, Topology};

/// Captures TCP packets on one interface of a node into a pcap until [`Capture::finish`].
pub struct Capture<'a> {
    topo: &'a Topology,
    pid: u32,
    pub pcap: PathBuf,
}

impl<'a> Capture<'a> {
    /// Starts tcpdump on `iface` in `node`'s namespace and waits until it listens.
    pub fn start(topo: &'a Topology, node: &Node, iface: &str) -> Result<Capture<'a>> {
        let pcap = topo.workdir.join(format!("{iface}.pcap"));
        let log = topo.workdir.join(format!("tcpdump-{iface}.log"));
        // `ip netns exec` also remounts /sys for the namespace, which tcpdump's capture needs.
        let mut command = Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                &node.netns,
                "tcpdump",
                "-Z",
                "root",
                "--immediate-mode",
            ])
            .args(["-i", iface, "-nn", "-U", "-s", "0", "-w"])
            .arg(&pcap)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let pid = topo.spawn_in_node(node, &mut command)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening on")
        {
            ensure!(
                Instant::now() < deadline,
                "tcpdump did not start: {}",
                std::fs::read_to_string(&log)?
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Capture { topo, pid, pcap })
    }

    /// Stops the capture and returns the raw pcap bytes.
    pub fn finish(self) -> Result<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(200));
        self.topo.signal(self.pid, libc::SIGINT)?;
        self.topo.wait(self.pid, Duration::from_secs(5))?;
        Ok(std::fs::read(&self.pcap)?)
    }
}

/// Whether `needle` occurs anywhere in the captured bytes.
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// `tcpdump -nn -r <pcap> tcp port <port>`: one line per packet.
pub fn packets_on_port(pcap: &Path, port: u16) -> Result<Vec<String>> {
    let out = crate::cmd::run(
        "tcpdump",
        &[
            "-nn",
            "-r",
            &pcap.to_string_lossy(),
            &format!("tcp port {port}"),
        ],
    )?;
    Ok(out.lines().map(str::to_owned).collect())
}
