//! deploy/Dockerfile, .dockerignore, `cargo xtask image` and deploy/daemonset.yaml agree: the image
//! holds the one binary xtask builds, runs it, and is the image the DaemonSet names. (docker itself
//! may not run where the tests do, so the recipe is checked as text.)

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The string value of `const NAME: &str = "..."` in a Rust source.
fn const_str(source: &str, name: &str) -> String {
    let at = source
        .find(&format!("const {name}: &str = "))
        .unwrap_or_else(|| panic!("{name} not found"));
    let rest = &source[at..];
    let start = rest.find('"').expect("opening quote") + 1;
    let end = start + rest[start..].find('"').expect("closing quote");
    rest[start..end].to_owned()
}

fn instructions<'a>(dockerfile: &'a str, keyword: &str) -> Vec<&'a str> {
    dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix(keyword))
        .filter(|rest| rest.starts_with(' '))
        .map(str::trim)
        .collect()
}

#[test]
fn the_image_recipe_copies_only_the_agent_xtask_builds() {
    let dockerfile = read("deploy/Dockerfile");
    let xtask = read("xtask/src/image.rs");
    let binary = const_str(&xtask, "IMAGE_BINARY");

    let copies = instructions(&dockerfile, "COPY");
    assert_eq!(
        copies.len(),
        1,
        "the image holds the agent binary only: {copies:?}"
    );
    let (source, dest) = copies[0].split_once(' ').expect("COPY src dest");
    assert_eq!(
        source, binary,
        "Dockerfile copies what `cargo xtask image` builds"
    );
    let entrypoint = instructions(&dockerfile, "ENTRYPOINT");
    assert_eq!(
        entrypoint,
        vec![format!("[\"{dest}\"]")],
        "the entrypoint runs the copied agent"
    );
    assert_eq!(instructions(&dockerfile, "FROM").len(), 1);

    let ignore = read(".dockerignore");
    assert!(
        ignore.lines().any(|l| l == "*"),
        ".dockerignore must exclude everything else"
    );
    assert!(
        ignore.lines().any(|l| l == format!("!{binary}")),
        ".dockerignore must let {binary} in"
    );
}

#[test]
fn the_daemonset_runs_the_image_xtask_builds_with_documented_settings() {
    let xtask = read("xtask/src/image.rs");
    assert!(
        xtask.contains("concat!(\"ghcr.io/nodemesh/mesh-agent:\", env!(\"CARGO_PKG_VERSION\"))")
    );
    let image = format!("ghcr.io/nodemesh/mesh-agent:{}", env!("CARGO_PKG_VERSION"));
    let daemonset = read("deploy/daemonset.yaml");
    assert!(
        daemonset.contains(&format!("image: {image}\n")),
        "deploy/daemonset.yaml does not run {image}"
    );
    assert!(read("deploy/Dockerfile").contains(&format!("-t {image} .")));

    let reference = read("docs/REFERENCE.md");
    let dockerfile = read("deploy/Dockerfile");
    let vars: Vec<&str> = daemonset
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- name: NODEMESH_"))
        .chain(
            instructions(&dockerfile, "ENV")
                .into_iter()
                .filter_map(|e| e.strip_prefix("NODEMESH_")),
        )
        .map(|v| v.split('=').next().unwrap_or(v))
        .collect();
    assert!(vars.contains(&"LOG_FORMAT"), "{vars:?}");
    for var in vars {
        assert!(
            reference.contains(&format!("| `NODEMESH_{var}` |")),
            "NODEMESH_{var} has no row in docs/REFERENCE.md"
        );
    }
}
