//! Crash-safe file replacement: write a temporary file in the same directory, sync it, rename it
//! over the target and sync the directory, so a crash leaves the old file, no file, or the
//! complete new one. Used for keys, certificates and the registry's state files.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
#[error("writing {}: {source}", path.display())]
pub struct WriteError {
    /// The file (temporary, target or directory) whose step failed.
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Replaces `path` with `contents` (created with `mode`); creates the parent directory.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), WriteError> {
    let werr = |path: &Path| {
        let path = path.to_owned();
        move |source| WriteError { path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(werr(dir))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{file_name}.tmp"));
    // A previous crash may have left the temporary file behind; create_new below needs it gone.
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(werr(&tmp))?;
    file.write_all(contents).map_err(werr(&tmp))?;
    file.sync_all().map_err(werr(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(werr(path))?;
    // Persist the rename itself.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(werr(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = std::env::temp_dir().join(format!("nodemesh-atomic-{}", std::process::id()));
        let path = dir.join("sub").join("state.json");
        write_atomically(&path, b"one", 0o600).expect("first write");
        write_atomically(&path, b"two", 0o600).expect("second write");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        let names: Vec<_> = fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["state.json"], "no temporary file left");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
