use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EbpfError {
    #[error("nodemesh agent must run as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); effective uid is {0}")]
    NotRoot(u32),
    #[error("kernel BTF not found at {0}: the kernel must be built with CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf(PathBuf),
    #[error("no cgroup v2 mount found in {0}: nodemesh attaches to cgroup v2 (unified or hybrid layout)")]
    NoCgroup2(PathBuf),
    #[error("cannot mount bpffs at {path}: {source}")]
    BpffsMount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("eBPF object not available: {0}; build the agent after `cargo xtask build-ebpf`, or set node.ebpf_object")]
    ObjectMissing(String),
    #[error("{0} is not an ELF file (node.ebpf_object must be the object `cargo xtask build-ebpf` produces)")]
    NotElf(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("workload cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinned link {path}: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("attaching to cgroup {path}: {source}")]
    Attach {
        path: PathBuf,
        source: aya::programs::ProgramError,
    },
}

impl EbpfError {
    /// `map_err` adapter naming the program a [`aya::programs::ProgramError`] came from.
    pub fn program(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError {
        move |source| EbpfError::Program { name, source }
    }
}
