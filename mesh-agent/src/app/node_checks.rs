//! Checks of a config against the machine it runs on, without touching the kernel: used by
//! `--check` and at start-up before any side effect (CA generation, eBPF load).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;

use crate::config::Config;
use crate::ebpf::attach::resolve_cgroup;
use crate::ebpf::object::{read_elf, EMBEDDED};
use crate::ebpf::preflight;

/// What was checked, what was not (and why), and what is wrong.
#[derive(Debug, Default)]
pub struct NodeReport {
    pub passed: Vec<String>,
    pub skipped: Vec<String>,
    pub failed: Vec<String>,
}

impl NodeReport {
    /// As YAML comments, to follow the effective config printed by `--check`.
    pub fn as_comments(&self) -> String {
        let mut out = String::new();
        for (label, items) in [("ok", &self.passed), ("skipped", &self.skipped)] {
            for item in items {
                out.push_str(&format!("# check {label}: {item}\n"));
            }
        }
        out
    }
}

/// An address this machine (this network namespace) owns: binding to it succeeds.
fn is_local(ip: IpAddr) -> bool {
    ip.is_unspecified() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// `on_node: false` (`--check --off-node`, e.g. in CI) skips what depends on the machine.
pub fn node_checks(config: &Config, on_node: bool) -> NodeReport {
    let mut r = NodeReport::default();
    r.skipped.push(
        "kernel: eBPF program load, map pinning and cgroup attach need the running agent (root)"
            .to_owned(),
    );
    match (&config.node.ebpf_object, EMBEDDED) {
        (None, Some(bytes)) => r.passed.push(format!(
            "node.ebpf_object: embedded object ({} bytes)",
            bytes.len()
        )),
        (None, None) => r.failed.push(
            "node.ebpf_object: not set and this agent was built without the embedded object"
                .to_owned(),
        ),
        (Some(path), _) if on_node => match read_elf(path) {
            Ok(bytes) => r.passed.push(format!(
                "node.ebpf_object: {} is an ELF object ({} bytes)",
                path.display(),
                bytes.len()
            )),
            Err(e) => r.failed.push(format!("node.ebpf_object: {e}")),
        },
        (Some(path), _) => r.skipped.push(format!(
            "node.ebpf_object: {} (off the node)",
            path.display()
        )),
    }
    if !on_node {
        r.skipped.push(
            "cgroups, local addresses, CA files, kernel BTF: --off-node (they are checked on the node)"
                .to_owned(),
        );
        return r;
    }
    addresses(config, &mut r);
    cgroups(config, &mut r);
    ca_files(config, &mut r);
    match preflight::check_btf(Path::new(preflight::BTF_PATH)) {
        Ok(()) => r
            .passed
            .push(format!("kernel BTF: {}", preflight::BTF_PATH)),
        Err(e) => r.failed.push(e.to_string()),
    }
    r
}

fn addresses(config: &Config, r: &mut NodeReport) {
    let agent_ip = IpAddr::V4(config.node.agent_ip);
    if is_local(agent_ip) {
        r.passed.push(format!("node.agent_ip: {agent_ip} is local"));
    } else {
        r.failed.push(format!(
            "node.agent_ip: {agent_ip} is not an address of this machine (network namespace); captured connects are redirected to it, so the agent must own it"
        ));
    }
    let listen = &config.listen;
    for (field, addr) in [
        ("listen.outbound", listen.outbound),
        ("listen.hbone", listen.hbone),
        ("listen.metrics", listen.metrics),
        ("listen.health", listen.health),
        ("listen.admin", listen.admin),
    ] {
        if is_local(addr.ip()) {
            r.passed.push(format!("{field}: {} is local", addr.ip()));
        } else {
            r.failed.push(format!(
                "{field}: {} is not an address of this machine",
                addr.ip()
            ));
        }
    }
}

fn cgroups(config: &Config, r: &mut NodeReport) {
    if config.workloads.is_empty() {
        return;
    }
    let root = preflight::read_mounts()
        .ok()
        .and_then(|m| preflight::find_cgroup2_mount(&m));
    let Some(root) = root else {
        r.failed.push("workloads[].cgroup: no cgroup v2 mount in /proc/self/mounts (`ip netns exec` remounts /sys and hides it; use `nsenter --net=`)".to_owned());
        return;
    };
    for (i, w) in config.workloads.iter().enumerate() {
        let dir = resolve_cgroup(&root, &w.cgroup);
        if dir.is_dir() {
            r.passed
                .push(format!("workloads[{i}].cgroup: {} exists", dir.display()));
        } else {
            r.failed.push(format!(
                "workloads[{i}].cgroup: {} does not exist (cgroup v2 mount: {})",
                dir.display(),
                root.display()
            ));
        }
    }
}

fn ca_files(config: &Config, r: &mut NodeReport) {
    let id = &config.identity;
    let remote = id.ca_service.as_ref();
    for (field, path) in [
        ("identity.ca_cert", id.ca_cert.as_ref()),
        ("identity.ca_key", id.ca_key.as_ref()),
        (
            "identity.ca_service.node_cert",
            remote.map(|s| &s.node_cert),
        ),
        ("identity.ca_service.node_key", remote.map(|s| &s.node_key)),
        (
            "identity.ca_service.trust_bundle",
            remote.map(|s| &s.trust_bundle),
        ),
    ] {
        let Some(path) = path else { continue };
        match std::fs::read_to_string(path) {
            Ok(text) if text.contains("-----BEGIN ") => r.passed.push(format!(
                "{field}: {} is a readable PEM file",
                path.display()
            )),
            Ok(_) => r
                .failed
                .push(format!("{field}: {} is not PEM", path.display())),
            Err(e) => r
                .failed
                .push(format!("{field}: cannot read {}: {e}", path.display())),
        }
    }
    if id.ca_cert.is_none() && id.ca_key.is_none() && remote.is_none() {
        r.skipped.push(format!(
            "identity: no ca_cert/ca_key; the CA in {} is generated or read at start",
            id.state_dir.display()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!("node: {{name: n1, agent_ip: 10.1.255.1}}\n{extra}");
        let mut config = crate::config::parse(&text, "test", &|_| None).expect("valid config");
        // Validation refuses a loopback agent_ip (pods cannot reach it); these checks only need
        // an address that is surely local to the test process.
        config.node.agent_ip = "127.0.0.1".parse().expect("ip");
        config
    }

    #[test]
    fn a_missing_cgroup_and_a_foreign_address_fail_naming_the_field() {
        let mut c = config(
            "workloads:\n  - {name: w, service_account: w, cgroup: nodemesh-no-such-cgroup/w}\n",
        );
        c.node.agent_ip = "192.0.2.1".parse().expect("ip");
        let report = node_checks(&c, true);
        let failed = report.failed.join("\n");
        assert!(
            failed.contains("node.agent_ip: 192.0.2.1 is not an address"),
            "{failed}"
        );
        assert!(
            failed.contains("workloads[0].cgroup:") && failed.contains("does not exist"),
            "{failed}"
        );
        // Off the node the same config passes, and says what it skipped.
        let off = node_checks(&c, false);
        assert!(off.failed.is_empty(), "{:?}", off.failed);
        assert!(
            off.as_comments().contains("# check skipped: cgroups"),
            "{}",
            off.as_comments()
        );
    }

    #[test]
    fn unreadable_ca_and_non_elf_object_fail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let not_pem = dir.path().join("ca.crt");
        std::fs::write(&not_pem, "hello").expect("write");
        let mut c = config("");
        c.identity.ca_cert = Some(not_pem);
        c.identity.ca_key = Some(dir.path().join("missing.key"));
        c.node.ebpf_object = Some(dir.path().join("ca.crt"));
        let failed = node_checks(&c, true).failed.join("\n");
        assert!(
            failed.contains("identity.ca_cert:") && failed.contains("is not PEM"),
            "{failed}"
        );
        assert!(failed.contains("identity.ca_key: cannot read"), "{failed}");
        assert!(
            failed.contains("node.ebpf_object:") && failed.contains("not an ELF"),
            "{failed}"
        );
    }

    #[test]
    fn unreadable_ca_service_files_fail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = dir.path().join("node.crt");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\n").expect("write");
        let c = config(&format!(
            "identity:\n  ca_service: {{address: \"10.0.0.1:15012\", node_cert: {}, node_key: {}, trust_bundle: {}}}\n",
            pem.display(),
            dir.path().join("missing.key").display(),
            pem.display()
        ));
        let report = node_checks(&c, true);
        let failed = report.failed.join("\n");
        assert!(
            failed.contains("identity.ca_service.node_key: cannot read"),
            "{failed}"
        );
        assert!(
            report
                .passed
                .iter()
                .any(|p| p.starts_with("identity.ca_service.trust_bundle:")),
            "{:?}",
            report.passed
        );
    }

    #[test]
    fn a_local_config_passes_and_reports_what_it_checked() {
        let report = node_checks(&config(""), true);
        assert!(report
            .passed
            .iter()
            .any(|p| p.starts_with("node.agent_ip: 127.0.0.1 is local")));
        assert!(report.skipped.iter().any(|s| s.starts_with("kernel:")));
    }
}
