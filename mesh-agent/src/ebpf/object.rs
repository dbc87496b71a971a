//! Where the eBPF object's bytes come from: the copy embedded at build time, or a file named by
//! `node.ebpf_object` / `NODEMESH_EBPF_OBJECT` (to run a different build without rebuilding the agent).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use super::EbpfError;

/// The object compiled into this binary (see build.rs), if it was built with `embed-ebpf`.
#[cfg(feature = "embed-ebpf")]
pub const EMBEDDED: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/mesh-ebpf.o"
)));
#[cfg(not(feature = "embed-ebpf"))]
pub const EMBEDDED: Option<&[u8]> = None;

/// The object's bytes and where they came from (for the log).
pub struct ObjectBytes {
    pub bytes: Cow<'static, [u8]>,
    pub source: String,
}

/// The configured override if set, else the embedded object.
pub fn object_bytes(configured: Option<&Path>) -> Result<ObjectBytes, EbpfError> {
    match (configured, EMBEDDED) {
        (Some(path), _) => {
            let bytes = read_elf(path)?;
            Ok(ObjectBytes {
                bytes: Cow::Owned(bytes),
                source: path.display().to_string(),
            })
        }
        (None, Some(bytes)) => Ok(ObjectBytes {
            bytes: Cow::Borrowed(bytes),
            source: "embedded".to_owned(),
        }),
        (None, None) => Err(EbpfError::ObjectMissing(
            "this agent was built without the embedded object (feature `embed-ebpf` off)"
                .to_owned(),
        )),
    }
}

/// Reads an override object and checks it is an ELF file, so a wrong path fails with a clear reason.
pub fn read_elf(path: &Path) -> Result<Vec<u8>, EbpfError> {
    let bytes = std::fs::read(path).map_err(|source| EbpfError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !bytes.starts_with(b"\x7fELF") {
        return Err(EbpfError::NotElf(PathBuf::from(path)));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "embed-ebpf")]
    #[test]
    fn the_embedded_object_is_an_elf_with_the_mesh_programs() {
        let object = object_bytes(None).expect("embedded");
        assert_eq!(object.source, "embedded");
        assert!(object.bytes.starts_with(b"\x7fELF"));
        let text = String::from_utf8_lossy(&object.bytes);
        for program in [
            mesh_common::program_names::CONNECT4,
            mesh_common::program_names::SOCKOPS,
        ] {
            assert!(
                text.contains(program),
                "{program} not in the embedded object"
            );
        }
    }

    #[test]
    fn an_override_must_exist_and_be_elf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.o");
        assert!(matches!(
            object_bytes(Some(&missing)),
            Err(EbpfError::Io { .. })
        ));
        let text = dir.path().join("text.o");
        std::fs::write(&text, "not an object").expect("write");
        let err = object_bytes(Some(&text)).err().expect("refused");
        assert!(err.to_string().contains("not an ELF"), "{err}");
        let elf = dir.path().join("ok.o");
        std::fs::write(&elf, b"\x7fELF\x02\x01").expect("write");
        let ok = object_bytes(Some(&elf)).expect("accepted");
        assert_eq!(ok.source, elf.display().to_string());
    }
}
