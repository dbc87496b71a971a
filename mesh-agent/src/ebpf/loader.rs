//! Loads the eBPF object with maps pinned per agent instance and the programs ready to attach.

use std::path::{Path, PathBuf};

use aya::programs::{CgroupSkb, CgroupSockAddr, SockOps};
use aya::EbpfLoader;
use mesh_common::program_names;

use super::attach::{cgroup_id, program_mut, resolve_cgroup};
use super::{preflight, Attachments, EbpfError, KernelMaps, OrigDstTable};

/// The loaded programs plus the cgroups they are attached to.
pub struct MeshEbpf {
    bpf: aya::Ebpf,
    attachments: Attachments,
    cgroup_root: PathBuf,
    pin_dir: PathBuf,
}

impl MeshEbpf {
    /// Runs the preflight checks, then loads `object` (ELF bytes) with maps pinned in `<bpffs>/nodemesh/<instance>`.
    pub fn load(
        object: &[u8],
        instance: &str,
    ) -> Result<(MeshEbpf, KernelMaps, OrigDstTable), EbpfError> {
        preflight::check_root()?;
        preflight::check_btf(Path::new(preflight::BTF_PATH))?;
        let mounts = preflight::read_mounts()?;
        let cgroup_root = preflight::cgroup2_root(&mounts)?;
        let bpffs = Path::new(preflight::BPFFS_PATH);
        preflight::ensure_bpffs(&mounts, bpffs)?;
        let pin_dir = bpffs.join("nodemesh").join(instance);
        std::fs::create_dir_all(&pin_dir).map_err(|source| EbpfError::Io {
            path: pin_dir.clone(),
            source,
        })?;

        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(object)?;
        start_kernel_logger(&mut bpf);
        program_mut::<CgroupSockAddr>(&mut bpf, program_names::CONNECT4)?
            .load()
            .map_err(EbpfError::program(program_names::CONNECT4))?;
        program_mut::<SockOps>(&mut bpf, program_names::SOCKOPS)?
            .load()
            .map_err(EbpfError::program(program_names::SOCKOPS))?;
        // Section cgroup_skb/ingress gives it the expected attach type the kernel checks on attach.
        program_mut::<CgroupSkb>(&mut bpf, program_names::INGRESS)?
            .load()
            .map_err(EbpfError::program(program_names::INGRESS))?;
        super::traffic_links::load(&mut bpf)?;
        let (maps, orig) = KernelMaps::take_from(&mut bpf)?;
        let ebpf = MeshEbpf {
            bpf,
            attachments: Attachments::default(),
            cgroup_root,
            pin_dir,
        };
        Ok((ebpf, maps, orig))
    }

    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Resolves a configured cgroup path to its directory and cgroup id.
    pub fn resolve_cgroup(&self, configured: &Path) -> Result<(PathBuf, u64), EbpfError> {
        let dir = resolve_cgroup(&self.cgroup_root, configured);
        cgroup_id(&dir).map(|id| (dir, id))
    }

    pub fn attach_to(&mut self, cgroups: &[PathBuf]) -> Result<(), EbpfError> {
        self.attachments.reconcile(&mut self.bpf, cgroups)
    }

    pub fn attached(&self) -> Vec<PathBuf> {
        self.attachments.attached().map(Path::to_owned).collect()
    }

    /// Detaches from every cgroup and removes the pinned maps: nothing of this agent stays in the kernel.
    pub fn shutdown(mut self) {
        self.attachments.detach_all(&mut self.bpf);
        if let Err(e) = std::fs::remove_dir_all(&self.pin_dir) {
            tracing::warn!(path = %self.pin_dir.display(), error = %e, "removing pinned maps");
        }
    }
}

/// Forwards aya-log records from the programs to our log (debug level) until the agent exits.
fn start_kernel_logger(bpf: &mut aya::Ebpf) {
    let logger = match aya_log::EbpfLogger::init(bpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "kernel debug log not available");
            return;
        }
    };
    // SAFETY: the logger owns its perf/ring buffer fd for its whole life and never swaps it.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut logger) = registered else {
        tracing::warn!("kernel debug log: cannot poll its buffer");
        return;
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
