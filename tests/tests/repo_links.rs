//! Every link in the repository's docs and sources stays inside the repository and points at a file
//! that exists, so docs work in any clone (no `../shared/...` links to a checkout-specific place).

use std::path::{Component, Path, PathBuf};

const SCANNED: &[&str] = &["md", "rs", "toml", "yaml", "yml", "sh", "json"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                files(&path, out);
            }
        } else if name == "Dockerfile"
            || path
                .extension()
                .is_some_and(|e| SCANNED.contains(&e.to_string_lossy().as_ref()))
        {
            out.push(path);
        }
    }
}

/// Lexically normalises `base/relative` (no symlinks followed, so the check is about the text).
fn resolve(base: &Path, relative: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in base.join(relative).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Markdown link targets: `](target)`.
fn markdown_links(text: &str) -> Vec<String> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .map(|t| t.split_whitespace().next().unwrap_or("").to_owned())
        .collect()
}

/// Relative paths written anywhere that start with `../`.
fn parent_paths(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("../") {
        let start = i + at;
        let preceded_ok = start == 0
            || !matches!(bytes[start - 1], b'.' | b'/' | b'_' | b'-')
                && !bytes[start - 1].is_ascii_alphanumeric();
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || "./_-#".contains(c)))
            .map_or(text.len(), |e| start + e);
        if preceded_ok {
            found.push(text[start..end].to_owned());
        }
        i = end.max(start + 3);
    }
    found
}

/// Directories a relative path in `file` may be relative to: the file's own, and for Rust sources and
/// manifests the crate's (`env!("CARGO_MANIFEST_DIR")`, cargo paths).
fn bases(root: &Path, file: &Path) -> Vec<PathBuf> {
    let dir = file.parent().expect("file has a directory").to_owned();
    let crate_dir = dir
        .ancestors()
        .take_while(|d| d.starts_with(root))
        .find(|d| d.join("Cargo.toml").is_file())
        .map(Path::to_owned);
    let is_rust = file.extension().is_some_and(|e| e == "rs" || e == "toml");
    let mut out = vec![dir];
    if let Some(c) = crate_dir.filter(|_| is_rust) {
        out.push(c);
    }
    out
}

fn problems_in(root: &Path, file: &Path, text: &str) -> Vec<String> {
    let is_markdown = file.extension().is_some_and(|e| e == "md");
    let mut targets = parent_paths(text);
    if is_markdown {
        targets.extend(markdown_links(text));
    }
    let bases = bases(root, file);
    let mut targets: Vec<String> = targets
        .into_iter()
        .map(|t| t.trim_end_matches('.').to_owned())
        .collect();
    targets.sort();
    targets.dedup();
    targets
        .into_iter()
        .filter(|t| {
            !t.is_empty() && !t.contains("://") && !t.starts_with('#') && !t.starts_with("mailto:")
        })
        .filter_map(|target| {
            let path_part = target.split('#').next().unwrap_or("");
            let resolved: Vec<PathBuf> = bases.iter().map(|b| resolve(b, path_part)).collect();
            let shown = file.strip_prefix(root).unwrap_or(file).display();
            if resolved.iter().any(|r| r.starts_with(root) && r.exists()) {
                None
            } else if resolved.iter().all(|r| !r.starts_with(root)) {
                Some(format!("{shown}: `{target}` leaves the repository"))
            } else {
                Some(format!(
                    "{shown}: `{target}` does not exist in the repository"
                ))
            }
        })
        .collect()
}

#[test]
fn no_doc_or_source_links_outside_the_repository() {
    let root = repo_root();
    let mut all = Vec::new();
    files(&root, &mut all);
    assert!(
        all.iter().any(|f| f.ends_with("README.md")),
        "scan found no README.md under {}",
        root.display()
    );
    // This file quotes bad links on purpose.
    let problems: Vec<String> = all
        .iter()
        .filter(|f| !f.ends_with("tests/tests/repo_links.rs"))
        .filter_map(|f| std::fs::read_to_string(f).ok().map(|t| (f, t)))
        .flat_map(|(f, t)| problems_in(&root, f, &t))
        .collect();
    assert!(
        problems.is_empty(),
        "broken or outside links:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_catches_an_outside_link() {
    let root = repo_root();
    let readme = root.join("README.md");
    let bad = "See [design](../shared/DESIGN.md) and ../shared/DESIGN.md.";
    let found = problems_in(&root, &readme, bad);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("leaves the repository"), "{found:?}");
    let lib = root.join("mesh-agent/src/lib.rs");
    assert_eq!(
        problems_in(&root, &lib, "//! See ../shared/DESIGN.md").len(),
        1
    );
    assert!(problems_in(&root, &readme, "[arch](docs/ARCHITECTURE.md)").is_empty());
}
