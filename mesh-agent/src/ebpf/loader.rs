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
    /// Whether the pins existed before this start: an earlier agent's state is being adopted.
    adopted: bool,
}

/// Where an instance pins its maps and links.
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(preflight::BPFFS_PATH)
        .join("nodemesh")
        .join(instance)
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
        let pin_dir = pin_dir(instance);
        let adopted = pin_dir.exists();
        std::fs::create_dir_all(&pin_dir).map_err(|source| EbpfError::Io {
            path: pin_dir.clone(),
            source,
        })?;

        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(object)?;
        start_kernel_logger(&mut bpf);
        for name in [
            program_names::CONNECT4,
            program_names::CONNECT6,
            program_names::SENDMSG4,
            program_names::SENDMSG6,
        ] {
            program_mut::<CgroupSockAddr>(&mut bpf, name)?
                .load()
                .map_err(EbpfError::program(name))?;
        }
        for name in [program_names::SOCKOPS, program_names::AGENT_SOCKOPS] {
            program_mut::<SockOps>(&mut bpf, name)?
                .load()
                .map_err(EbpfError::program(name))?;
        }
        // Section cgroup_skb/ingress gives it the expected attach type the kernel checks on attach.
        program_mut::<CgroupSkb>(&mut bpf, program_names::INGRESS)?
            .load()
            .map_err(EbpfError::program(program_names::INGRESS))?;
        super::traffic_links::load(&mut bpf)?;
        let (maps, orig) = KernelMaps::take_from(&mut bpf)?;
        let ebpf = MeshEbpf {
            bpf,
            attachments: Attachments::new(&pin_dir),
            cgroup_root,
            pin_dir,
            adopted,
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

    /// Whether this start found an earlier agent's pinned state and adopted it.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Attaches the program that records this agent's own connects (strict mode trusts exactly
    /// those) to the agent's cgroup. Run by the agent process itself.
    pub fn trust_own_cgroup(&mut self, instance: &str) -> Result<PathBuf, EbpfError> {
        let dir = super::own_cgroup::own_cgroup(&self.cgroup_root, instance)?;
        let id = cgroup_id(&dir)?;
        self.attachments.attach_agent(&mut self.bpf, &dir, id)?;
        Ok(dir)
    }

    pub fn attach_to(&mut self, cgroups: &[(PathBuf, u64)]) -> Result<(), EbpfError> {
        self.attachments.reconcile(&mut self.bpf, cgroups)
    }

    pub fn attached(&self) -> Vec<PathBuf> {
        self.attachments.attached().map(Path::to_owned).collect()
    }

    /// Detaches from every cgroup and removes the pinned maps and links: nothing of this agent
    /// stays in the kernel. Only for an explicit uninstall, or a first start that failed.
    pub fn uninstall(self) {
        let MeshEbpf { bpf, pin_dir, .. } = self;
        drop(bpf);
        if let Err(e) = super::attach::uninstall(&pin_dir) {
            tracing::warn!(path = %pin_dir.display(), error = %e, "removing pinned maps and links");
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
