//! The config file's field paths (`services[].vip` notation), from the JSON schema of [`Config`], so
//! docs/REFERENCE.md can be checked against the code.

use serde_json::Value;

use super::Config;

/// Every field path of the config file, blocks included (`node`, `node.name`, `services[].vip`).
pub fn field_paths() -> Vec<String> {
    field_paths_of::<Config>()
}

/// The field paths of any config document with a JSON schema (e.g. the CA service's).
pub fn field_paths_of<T: schemars::JsonSchema>() -> Vec<String> {
    let schema = schemars::schema_for!(T);
    let root = schema.as_value();
    let mut out = Vec::new();
    walk(root, root, "", &mut out);
    out.sort();
    out.dedup();
    out
}

fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(r) => r
            .strip_prefix("#/$defs/")
            .and_then(|name| root.get("$defs").and_then(|d| d.get(name)))
            .map_or(node, |target| resolve(root, target)),
        None => node,
    }
}

fn walk(root: &Value, node: &Value, path: &str, out: &mut Vec<String>) {
    let node = resolve(root, node);
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            let child_path = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            out.push(child_path.clone());
            walk(root, child, &child_path, out);
        }
    }
    if let Some(items) = node.get("items") {
        walk(root, items, &format!("{path}[]"), out);
    }
    // Options and untagged enums: every variant's fields belong to the same path.
    for key in ["anyOf", "oneOf", "allOf"] {
        for variant in node
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            walk(root, variant, path, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_nested_list_and_option_fields() {
        let paths = field_paths();
        for expected in [
            "node.agent_ip",
            "services[].vip",
            "services[].endpoints[].node",
            "proxy.connect_timeout",
            "identity.ca_cert",
            "authorization[].allow[].from_service",
            "authorization[].capabilities.required",
        ] {
            assert!(
                paths.iter().any(|p| p == expected),
                "{expected} not in {paths:?}"
            );
        }
    }
}
