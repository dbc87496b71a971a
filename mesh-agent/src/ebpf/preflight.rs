//! Checks that turn an obscure verifier or syscall failure into an error an operator can act on.

use std::path::{Path, PathBuf};

use super::EbpfError;

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
pub const MOUNTS_PATH: &str = "/proc/self/mounts";
pub const BPFFS_PATH: &str = "/sys/fs/bpf";

pub fn check_root() -> Result<(), EbpfError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Ok(())
    } else {
        Err(EbpfError::NotRoot(euid))
    }
}

pub fn check_btf(path: &Path) -> Result<(), EbpfError> {
    if path.exists() {
        Ok(())
    } else {
        Err(EbpfError::NoBtf(path.to_owned()))
    }
}

/// Finds the cgroup v2 mount point in /proc/self/mounts text (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones). Never hard-coded: layouts differ between nodes.
pub fn find_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

fn is_bpffs_mounted(mounts: &str, path: &Path) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let target = fields.nth(1);
        let fstype = fields.next();
        fstype == Some("bpf") && target.map(unescape_mount_path).as_deref() == path.to_str()
    })
}

/// /proc/self/mounts escapes spaces and a few other bytes as octal `\040`.
fn unescape_mount_path(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest
            .get(pos + 1..pos + 4)
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[pos + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

pub fn read_mounts() -> Result<String, EbpfError> {
    std::fs::read_to_string(MOUNTS_PATH).map_err(|source| EbpfError::Io {
        path: MOUNTS_PATH.into(),
        source,
    })
}

pub fn cgroup2_root(mounts: &str) -> Result<PathBuf, EbpfError> {
    find_cgroup2_mount(mounts).ok_or_else(|| EbpfError::NoCgroup2(MOUNTS_PATH.into()))
}

/// Mounts bpffs at `path` when nothing is mounted there, so maps can be pinned.
pub fn ensure_bpffs(mounts: &str, path: &Path) -> Result<(), EbpfError> {
    if is_bpffs_mounted(mounts, path) {
        return Ok(());
    }
    std::fs::create_dir_all(path).map_err(|source| EbpfError::BpffsMount {
        path: path.to_owned(),
        source,
    })?;
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| {
        EbpfError::BpffsMount {
            path: path.to_owned(),
            source: std::io::Error::other(e),
        }
    })?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(EbpfError::BpffsMount {
            path: path.to_owned(),
            source: std::io::Error::last_os_error(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
        cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
        cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
        bpf /sys/fs/bpf bpf rw 0 0\n";

    #[test]
    fn finds_hybrid_and_unified_cgroup2_mounts() {
        assert_eq!(
            find_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            find_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            find_cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }

    #[test]
    fn unescapes_octal_in_mount_paths() {
        let mounts = "cgroup2 /mnt/my\\040cgroups cgroup2 rw 0 0\n";
        assert_eq!(
            find_cgroup2_mount(mounts),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    #[test]
    fn detects_bpffs_only_at_the_given_path() {
        assert!(is_bpffs_mounted(HYBRID, Path::new("/sys/fs/bpf")));
        assert!(!is_bpffs_mounted(HYBRID, Path::new("/sys/fs/cgroup")));
    }

    #[test]
    fn missing_btf_names_the_path() {
        let err = check_btf(Path::new("/nonexistent/vmlinux")).expect_err("no such file");
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }
}
