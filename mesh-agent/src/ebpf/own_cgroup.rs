//! The agent's own cgroup, where the program recording the agent's connects is attached. Strict
//! mode trusts every connect made from it, so it must hold only the agent: a pod or a systemd
//! unit does. An agent started in the root cgroup moves itself to a dedicated child first
//! (attaching there would trust every process on the host).

use std::path::{Path, PathBuf};

use super::EbpfError;

const SELF_CGROUP: &str = "/proc/self/cgroup";

/// The cgroup v2 path of this process, from the `0::<path>` line of /proc/self/cgroup.
pub fn parse_self_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

pub fn own_cgroup(cgroup_root: &Path, instance: &str) -> Result<PathBuf, EbpfError> {
    let text = std::fs::read_to_string(SELF_CGROUP).map_err(|source| EbpfError::Io {
        path: SELF_CGROUP.into(),
        source,
    })?;
    let rel = parse_self_cgroup(&text).unwrap_or("/").trim();
    if rel != "/" {
        return Ok(cgroup_root.join(rel.trim_start_matches('/')));
    }
    let dir = cgroup_root.join(format!("nodemesh-agent.{instance}"));
    let io = |source| EbpfError::Cgroup {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    // Writing our pid to cgroup.procs moves the whole process (every thread).
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).map_err(io)?;
    tracing::info!(cgroup = %dir.display(), "agent moved out of the root cgroup into its own");
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::parse_self_cgroup;

    #[test]
    fn finds_the_unified_hierarchy_line() {
        let hybrid = "12:cpu:/x\n0::/kubepods/pod1/agent\n";
        assert_eq!(parse_self_cgroup(hybrid), Some("/kubepods/pod1/agent"));
        assert_eq!(parse_self_cgroup("0::/\n"), Some("/"));
        assert_eq!(parse_self_cgroup("3:memory:/a\n"), None);
    }
}
