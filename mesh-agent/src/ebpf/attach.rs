//! Attachment of the capture programs to workload cgroups, reconciled on every config change.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::programs::{
    cgroup_skb::CgroupSkbLinkId, cgroup_sock_addr::CgroupSockAddrLinkId, sock_ops::SockOpsLinkId,
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SockOps,
};
use mesh_common::program_names;

use super::traffic_links::{self, TrafficLinks};
use super::EbpfError;

struct Link {
    connect: CgroupSockAddrLinkId,
    sockops: SockOpsLinkId,
    ingress: CgroupSkbLinkId,
    traffic: TrafficLinks,
}

/// Which cgroups the programs are attached to.
#[derive(Default)]
pub struct Attachments {
    links: BTreeMap<PathBuf, Link>,
}

/// Resolves a configured cgroup path: absolute under the mount as given, else relative to it.
pub fn resolve_cgroup(cgroup_root: &Path, configured: &Path) -> PathBuf {
    if configured.starts_with(cgroup_root) {
        configured.to_owned()
    } else {
        cgroup_root.join(configured.strip_prefix("/").unwrap_or(configured))
    }
}

/// The cgroup id `bpf_get_current_cgroup_id` reports is the cgroup directory's inode number.
pub fn cgroup_id(path: &Path) -> Result<u64, EbpfError> {
    let meta = std::fs::metadata(path).map_err(|source| EbpfError::Cgroup {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(EbpfError::Cgroup {
            path: path.to_owned(),
            source: std::io::Error::other("not a cgroup directory"),
        });
    }
    Ok(meta.ino())
}

pub(super) fn program_mut<'a, T>(
    bpf: &'a mut aya::Ebpf,
    name: &'static str,
) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = bpf.program_mut(name).ok_or(EbpfError::Missing {
        kind: "program",
        name,
    })?;
    program.try_into().map_err(EbpfError::program(name))
}

impl Attachments {
    pub fn attached(&self) -> impl Iterator<Item = &Path> {
        self.links.keys().map(PathBuf::as_path)
    }

    /// Attaches to every cgroup in `wanted` not yet attached, then detaches the ones no longer
    /// wanted. If any attach fails, the ones attached by this call are detached again and the
    /// previous set stays as it was.
    pub fn reconcile(&mut self, bpf: &mut aya::Ebpf, wanted: &[PathBuf]) -> Result<(), EbpfError> {
        let mut added = Vec::new();
        for path in wanted {
            if self.links.contains_key(path) || added.iter().any(|(p, _)| p == path) {
                continue;
            }
            match attach_one(bpf, path) {
                Ok(link) => added.push((path.clone(), link)),
                Err(e) => {
                    for (_, link) in added {
                        detach_one(bpf, link);
                    }
                    return Err(e);
                }
            }
        }
        self.links.extend(added);
        let stale: Vec<PathBuf> = self
            .links
            .keys()
            .filter(|p| !wanted.contains(p))
            .cloned()
            .collect();
        for path in stale {
            if let Some(link) = self.links.remove(&path) {
                detach_one(bpf, link);
            }
        }
        Ok(())
    }

    pub fn detach_all(&mut self, bpf: &mut aya::Ebpf) {
        for (_, link) in std::mem::take(&mut self.links) {
            detach_one(bpf, link);
        }
    }
}

fn connect_prog(bpf: &mut aya::Ebpf) -> Result<&mut CgroupSockAddr, EbpfError> {
    program_mut(bpf, program_names::CONNECT4)
}

fn sockops_prog(bpf: &mut aya::Ebpf) -> Result<&mut SockOps, EbpfError> {
    program_mut(bpf, program_names::SOCKOPS)
}

fn ingress_prog(bpf: &mut aya::Ebpf) -> Result<&mut CgroupSkb, EbpfError> {
    program_mut(bpf, program_names::INGRESS)
}

/// Attaches all programs to one cgroup, or none: a failure detaches what this call attached.
fn attach_one(bpf: &mut aya::Ebpf, path: &Path) -> Result<Link, EbpfError> {
    let dir = File::open(path).map_err(|source| EbpfError::Cgroup {
        path: path.to_owned(),
        source,
    })?;
    let attach_err = |source| EbpfError::Attach {
        path: path.to_owned(),
        source,
    };
    // bpf_link attachments (kernel >= 5.7) already coexist with other programs on the cgroup and
    // the kernel rejects attach flags for them, so the mode must be Single (flags 0).
    let connect = connect_prog(bpf)?
        .attach(&dir, CgroupAttachMode::Single)
        .map_err(attach_err)?;
    let sockops = match sockops_prog(bpf)
        .and_then(|p| p.attach(&dir, CgroupAttachMode::Single).map_err(attach_err))
    {
        Ok(link) => link,
        Err(e) => {
            detach_connect(bpf, connect);
            return Err(e);
        }
    };
    match ingress_prog(bpf).and_then(|p| {
        p.attach(&dir, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
            .map_err(attach_err)
    }) {
        Ok(ingress) => match traffic_links::attach(bpf, &dir, path) {
            Ok(traffic) => Ok(Link {
                connect,
                sockops,
                ingress,
                traffic,
            }),
            Err(e) => {
                detach_connect(bpf, connect);
                detach_sockops(bpf, sockops);
                detach_ingress(bpf, ingress);
                Err(e)
            }
        },
        Err(e) => {
            detach_connect(bpf, connect);
            detach_sockops(bpf, sockops);
            Err(e)
        }
    }
}

fn detach_one(bpf: &mut aya::Ebpf, link: Link) {
    detach_connect(bpf, link.connect);
    detach_sockops(bpf, link.sockops);
    detach_ingress(bpf, link.ingress);
    traffic_links::detach(bpf, link.traffic);
}

fn detach_connect(bpf: &mut aya::Ebpf, link: CgroupSockAddrLinkId) {
    let name = program_names::CONNECT4;
    report_detach(connect_prog(bpf).and_then(|p| p.detach(link).map_err(EbpfError::program(name))));
}

fn detach_sockops(bpf: &mut aya::Ebpf, link: SockOpsLinkId) {
    let name = program_names::SOCKOPS;
    report_detach(sockops_prog(bpf).and_then(|p| p.detach(link).map_err(EbpfError::program(name))));
}

fn detach_ingress(bpf: &mut aya::Ebpf, link: CgroupSkbLinkId) {
    let name = program_names::INGRESS;
    report_detach(ingress_prog(bpf).and_then(|p| p.detach(link).map_err(EbpfError::program(name))));
}

/// Detaching is best effort: a failure is logged (the error names the program) and the other
/// links are still detached.
fn report_detach(result: Result<(), EbpfError>) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "detaching");
    }
}
