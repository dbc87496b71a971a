//! Pinned bpf_links: a link pinned in bpffs stays attached after the agent exits or crashes, so
//! capture, deny/allow-lists and strict mode keep being enforced while no agent runs (fail
//! closed). A restarted agent adopts a pinned link by swapping its own freshly loaded program into
//! it (BPF_LINK_UPDATE, atomic: the cgroup never runs without a program). Removing the pin file
//! detaches the link once no process holds it open.
//!
//! aya 0.14 does not expose a link's fd nor link updates, so these two calls are made directly.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// Size of the attr buffer passed to bpf(2); unused trailing bytes stay zero as the kernel wants.
const ATTR_WORDS: usize = 16;

fn sys_bpf(cmd: libc::c_long, attr: &mut [u32; ATTR_WORDS]) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a zeroed, properly sized bpf_attr for `cmd`; the kernel only reads it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned bpf object (here: a link) by its bpffs path.
fn open_pinned(path: &Path) -> std::io::Result<OwnedFd> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut attr = [0u32; ATTR_WORDS];
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let ptr = name.as_ptr() as u64;
    attr[0] = ptr as u32;
    attr[1] = (ptr >> 32) as u32;
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Points the link pinned at `path` to `program` (the same program type and attach type).
pub fn adopt(path: &Path, program: BorrowedFd<'_>) -> std::io::Result<()> {
    let link = open_pinned(path)?;
    let mut attr = [0u32; ATTR_WORDS];
    // struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = program.as_raw_fd() as u32;
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Removes a pin; the link detaches when the last fd on it closes (this agent holds none).
pub fn unpin(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
