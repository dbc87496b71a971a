//! Attachment of the capture programs to workload cgroups, reconciled on every config change.
//! Every link is pinned under `<pin dir>/links/cg<cgroup id>-<program>` so it stays attached when
//! the agent stops or crashes (fail closed); a restarted agent adopts the pins. Only
//! [`uninstall`] (or a cgroup leaving the config) removes them.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::programs::{links::FdLink, CgroupAttachMode, CgroupSkb, CgroupSockAddr, SockOps};
use mesh_common::program_names;

use super::{links, traffic_links, EbpfError};

/// The programs attached to every workload cgroup.
const PROGRAMS: [&str; 8] = [
    program_names::CONNECT4,
    program_names::CONNECT6,
    program_names::SENDMSG4,
    program_names::SENDMSG6,
    program_names::SOCKOPS,
    program_names::INGRESS,
    program_names::COUNT_EGRESS,
    program_names::COUNT_INGRESS,
];

/// The cgroup/sock_addr programs (their attach type comes from their section name).
fn is_sock_addr(name: &str) -> bool {
    matches!(
        name,
        program_names::CONNECT4
            | program_names::CONNECT6
            | program_names::SENDMSG4
            | program_names::SENDMSG6
    )
}

/// Which cgroups the programs are attached to (through pinned links).
pub struct Attachments {
    links_dir: PathBuf,
    /// cgroup directory -> cgroup id, for the cgroups this agent pinned or adopted links of.
    links: BTreeMap<PathBuf, u64>,
    /// Pins left by an earlier agent for cgroups no longer configured are removed once.
    swept: bool,
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
    pub fn new(pin_dir: &Path) -> Attachments {
        Attachments {
            links_dir: pin_dir.join("links"),
            links: BTreeMap::new(),
            swept: false,
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = &Path> {
        self.links.keys().map(PathBuf::as_path)
    }

    /// Attaches (or adopts the pinned links of) every cgroup in `wanted`, then unpins the ones no
    /// longer wanted. If any attach fails, the links created by this call are removed again and
    /// the previous set stays as it was; adopted links are never removed on failure, so an
    /// earlier agent's enforcement stays in force.
    pub fn reconcile(
        &mut self,
        bpf: &mut aya::Ebpf,
        wanted: &[(PathBuf, u64)],
    ) -> Result<(), EbpfError> {
        std::fs::create_dir_all(&self.links_dir).map_err(|source| EbpfError::Io {
            path: self.links_dir.clone(),
            source,
        })?;
        let mut created: Vec<PathBuf> = Vec::new();
        let mut added = Vec::new();
        for (path, id) in wanted {
            if self.links.get(path) == Some(id) || added.iter().any(|(p, _)| p == path) {
                continue;
            }
            match self.ensure_one(bpf, path, *id, &mut created) {
                Ok(()) => added.push((path.clone(), *id)),
                Err(e) => {
                    for pin in created {
                        report_unpin(&pin);
                    }
                    return Err(e);
                }
            }
        }
        for (path, id) in added {
            if let Some(old) = self.links.insert(path, id) {
                if old != id {
                    self.unpin_cgroup(old);
                }
            }
        }
        let stale: Vec<PathBuf> = self
            .links
            .keys()
            .filter(|p| !wanted.iter().any(|(w, _)| w == *p))
            .cloned()
            .collect();
        for path in stale {
            if let Some(id) = self.links.remove(&path) {
                self.unpin_cgroup(id);
            }
        }
        if !self.swept {
            self.sweep(wanted);
            self.swept = true;
        }
        Ok(())
    }

    /// Attaches all programs to one cgroup, adopting a pin where one exists. Pins this call
    /// created are recorded in `created` so that the caller can undo them.
    fn ensure_one(
        &self,
        bpf: &mut aya::Ebpf,
        path: &Path,
        cgroup: u64,
        created: &mut Vec<PathBuf>,
    ) -> Result<(), EbpfError> {
        let dir = File::open(path).map_err(|source| EbpfError::Cgroup {
            path: path.to_owned(),
            source,
        })?;
        for name in PROGRAMS {
            let pin = self.pin_path(cgroup, name);
            if pin.exists() {
                match adopt(bpf, name, &pin) {
                    Ok(()) => continue,
                    // A link whose cgroup went away (ENOLINK) or that cannot take this program:
                    // replace it with a fresh one.
                    Err(e) => {
                        tracing::warn!(pin = %pin.display(), error = %e, "pinned link not adoptable; attaching anew");
                        report_unpin(&pin);
                    }
                }
            }
            attach_pinned(bpf, name, &dir, path, &pin)?;
            created.push(pin);
        }
        Ok(())
    }

    /// Attaches (or adopts) the agent-flow recorder on the agent's own cgroup. Its pin is named
    /// `agent-cg<id>-...`, outside the workload sweep: a draining predecessor in another cgroup
    /// keeps its own until uninstall (or until its cgroup goes away, which detaches the link).
    pub fn attach_agent(
        &mut self,
        bpf: &mut aya::Ebpf,
        path: &Path,
        cgroup: u64,
    ) -> Result<(), EbpfError> {
        std::fs::create_dir_all(&self.links_dir).map_err(|source| EbpfError::Io {
            path: self.links_dir.clone(),
            source,
        })?;
        let name = program_names::AGENT_SOCKOPS;
        let pin = self.links_dir.join(format!("agent-cg{cgroup}-{name}"));
        if pin.exists() {
            match adopt(bpf, name, &pin) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(pin = %pin.display(), error = %e, "pinned link not adoptable; attaching anew");
                    report_unpin(&pin);
                }
            }
        }
        let dir = File::open(path).map_err(|source| EbpfError::Cgroup {
            path: path.to_owned(),
            source,
        })?;
        attach_pinned(bpf, name, &dir, path, &pin)
    }

    fn pin_path(&self, cgroup: u64, program: &str) -> PathBuf {
        self.links_dir.join(format!("cg{cgroup}-{program}"))
    }

    fn unpin_cgroup(&self, cgroup: u64) {
        for name in PROGRAMS {
            report_unpin(&self.pin_path(cgroup, name));
        }
    }

    /// Removes pins of cgroups that are not wanted (left by an agent that ran an older config).
    fn sweep(&self, wanted: &[(PathBuf, u64)]) {
        let Ok(entries) = std::fs::read_dir(&self.links_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            // Only workload pins (`cg<id>-<program>`); the agent's own (`agent-cg...`) stay.
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("cg")) else {
                continue;
            };
            let id = rest
                .split_once('-')
                .and_then(|(id, _)| id.parse::<u64>().ok());
            if id.is_none_or(|id| !wanted.iter().any(|(_, w)| *w == id)) {
                report_unpin(&entry.path());
            }
        }
    }
}

/// Removes everything this instance left in the kernel: pinned links (which detaches the
/// programs once no agent holds them) and pinned maps. `mesh-agent --uninstall` runs this.
pub fn uninstall(pin_dir: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_dir_all(pin_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(EbpfError::Io {
            path: pin_dir.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn program_fd<'a>(
    bpf: &'a mut aya::Ebpf,
    name: &'static str,
) -> Result<std::os::fd::BorrowedFd<'a>, EbpfError> {
    let fd = match name {
        n if is_sock_addr(n) => program_mut::<CgroupSockAddr>(bpf, name)?.fd(),
        program_names::SOCKOPS | program_names::AGENT_SOCKOPS => {
            program_mut::<SockOps>(bpf, name)?.fd()
        }
        _ => program_mut::<CgroupSkb>(bpf, name)?.fd(),
    };
    Ok(fd.map_err(EbpfError::program(name))?.as_fd())
}

fn adopt(bpf: &mut aya::Ebpf, name: &'static str, pin: &Path) -> Result<(), EbpfError> {
    let fd = program_fd(bpf, name)?;
    links::adopt(pin, fd).map_err(|source| EbpfError::Pin {
        path: pin.to_owned(),
        source,
    })
}

/// Attaches one program to a cgroup and pins the link; the fd is closed right away (the pin
/// keeps the link attached).
fn attach_pinned(
    bpf: &mut aya::Ebpf,
    name: &'static str,
    dir: &File,
    path: &Path,
    pin: &Path,
) -> Result<(), EbpfError> {
    let attach_err = |source| EbpfError::Attach {
        path: path.to_owned(),
        source,
    };
    let pin_err = |e: &dyn std::fmt::Display| EbpfError::Pin {
        path: pin.to_owned(),
        source: std::io::Error::other(e.to_string()),
    };
    // bpf_link attachments (kernel >= 5.7) already coexist with other programs on the cgroup and
    // the kernel rejects attach flags for them, so the mode must be Single (flags 0).
    let link: FdLink = match name {
        n if is_sock_addr(n) => {
            let p = program_mut::<CgroupSockAddr>(bpf, name)?;
            let id = p
                .attach(dir, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = p.take_link(id).map_err(EbpfError::program(name))?;
            link.try_into().map_err(|e| pin_err(&e))?
        }
        program_names::SOCKOPS | program_names::AGENT_SOCKOPS => {
            let p = program_mut::<SockOps>(bpf, name)?;
            let id = p
                .attach(dir, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = p.take_link(id).map_err(EbpfError::program(name))?;
            link.try_into().map_err(|e| pin_err(&e))?
        }
        _ => {
            let p = program_mut::<CgroupSkb>(bpf, name)?;
            let id = p
                .attach(
                    dir,
                    traffic_links::attach_type(name),
                    CgroupAttachMode::Single,
                )
                .map_err(attach_err)?;
            let link = p.take_link(id).map_err(EbpfError::program(name))?;
            link.try_into().map_err(|e| pin_err(&e))?
        }
    };
    link.pin(pin).map(drop).map_err(|e| pin_err(&e))
}

/// Unpinning is best effort: a failure is logged (naming the pin) and the others still go.
fn report_unpin(pin: &Path) {
    if let Err(e) = links::unpin(pin) {
        tracing::warn!(pin = %pin.display(), error = %e, "removing pinned link");
    }
}
