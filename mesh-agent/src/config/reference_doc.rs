//! docs/REFERENCE.md must have one row per config field, environment variable and admin endpoint,
//! and no row for one that does not exist (metrics are checked against a live agent in
//! tests/tests/quickstart.rs).

use std::collections::BTreeSet;

const REFERENCE: &str = include_str!("../../../docs/REFERENCE.md");

/// First-column names (`| \`name\` |`) of the rows of one `## section`.
fn rows(section: &str) -> BTreeSet<String> {
    let start = REFERENCE
        .find(&format!("\n## {section}\n"))
        .unwrap_or_else(|| panic!("docs/REFERENCE.md has no `## {section}` section"));
    let body = &REFERENCE[start + section.len() + 5..];
    let body = &body[..body.find("\n## ").unwrap_or(body.len())];
    body.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` |").map(|(name, _)| name.to_owned()))
        .collect()
}

fn compare(section: &str, code: BTreeSet<String>) {
    let documented = rows(section);
    let missing: Vec<_> = code.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&code).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/REFERENCE.md `{section}`: without a row: {missing:?}; rows for nothing: {stale:?}"
    );
}

#[test]
fn every_config_field_has_a_row() {
    compare(
        "Config fields",
        super::fields::field_paths().into_iter().collect(),
    );
}

#[test]
fn every_ca_service_config_field_has_a_row() {
    compare(
        "CA service config",
        super::fields::field_paths_of::<crate::ca_service::CaServiceConfig>()
            .into_iter()
            .collect(),
    );
}

#[test]
fn every_environment_variable_has_a_row() {
    let vars = super::OVERRIDES
        .iter()
        .map(|(var, _, _)| *var)
        .chain(super::PROCESS_VARS.iter().copied())
        .map(str::to_owned)
        .collect();
    compare("Environment variables", vars);
}

#[test]
fn every_endpoint_has_a_row() {
    use crate::app::{ADMIN_ROUTES, HEALTH_ROUTES, METRICS_ROUTES};
    let routes = ADMIN_ROUTES
        .iter()
        .chain(HEALTH_ROUTES)
        .chain(METRICS_ROUTES)
        .map(|r| (*r).to_owned())
        .collect();
    compare("Admin endpoints", routes);
}

#[test]
fn the_row_parser_sees_rows() {
    assert!(rows("Config fields").contains("services[].vip"));
    assert!(rows("Metrics").contains("nodemesh_config_reloads_total"));
}

/// Metric names written as string literals anywhere in the agent's source, including families that
/// have no sample yet (and so are missing from a scrape).
fn metric_literals(dir: &std::path::Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("source dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            metric_literals(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("source file");
            for piece in text.split("\"nodemesh_").skip(1) {
                let name: String = piece
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if piece[name.len()..].starts_with('"') && !name.is_empty() {
                    out.insert(format!("nodemesh_{name}"));
                }
            }
        }
    }
}

#[test]
fn every_metric_named_in_the_source_has_a_row() {
    let mut names = BTreeSet::new();
    metric_literals(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut names,
    );
    assert!(names.contains("nodemesh_config_reloads_total"), "{names:?}");
    let documented = rows("Metrics");
    let missing: Vec<_> = names.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "docs/REFERENCE.md `Metrics`: without a row: {missing:?}"
    );
}
