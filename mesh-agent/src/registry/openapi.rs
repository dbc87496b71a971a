//! The published contracts: docs/registry-openapi.json (served at /v1/openapi.json) and
//! docs/registry-instance.schema.json (served at /v1/schema/instance.json). Tests keep both equal
//! to what the code generates, so clients generated from them cannot drift from the agent.

/// The JSON Schema document as written to docs/ (pretty, trailing newline).
pub fn instance_schema_text() -> String {
    let mut text =
        serde_json::to_string_pretty(&super::instance::instance_schema()).unwrap_or_default();
    text.push('\n');
    text
}

/// `components.schemas` of the OpenAPI document: the model with references under
/// `#/components/schemas/`.
pub fn components() -> serde_json::Value {
    let mut generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    let mut instance =
        serde_json::to_value(generator.root_schema_for::<super::instance::Instance>())
            .unwrap_or_default();
    let mut node = serde_json::to_value(generator.root_schema_for::<super::instance::NodeRecord>())
        .unwrap_or_default();
    for s in [&mut instance, &mut node] {
        if let Some(o) = s.as_object_mut() {
            o.remove("$schema");
        }
    }
    let mut out = serde_json::Map::new();
    for (k, v) in generator.take_definitions(true) {
        out.insert(k, v);
    }
    out.insert("Instance".into(), instance);
    out.insert("NodeRecord".into(), node);
    serde_json::Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA_FILE: &str = include_str!("../../../docs/registry-instance.schema.json");

    #[test]
    fn schema_file_matches_the_model() {
        if std::env::var_os("NODEMESH_BLESS").is_some() {
            let path = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../docs/registry-instance.schema.json"
            );
            std::fs::write(path, instance_schema_text()).expect("write schema");
            return;
        }
        assert_eq!(
            SCHEMA_FILE,
            instance_schema_text(),
            "docs/registry-instance.schema.json is stale: rerun with NODEMESH_BLESS=1"
        );
    }

    #[test]
    fn openapi_embeds_the_same_instance_schema() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/registry-openapi.json");
        let mut doc: serde_json::Value =
            serde_json::from_str(crate::registry::api::OPENAPI).expect("openapi is JSON");
        if std::env::var_os("NODEMESH_BLESS").is_some() {
            doc["components"]["schemas"] = components();
            let mut text = serde_json::to_string_pretty(&doc).expect("json");
            text.push('\n');
            std::fs::write(path, text).expect("write openapi");
            return;
        }
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(
            doc["components"]["schemas"],
            components(),
            "docs/registry-openapi.json schemas drifted from the model: rerun with NODEMESH_BLESS=1"
        );
        for path in [
            "/v1/agent/service/register",
            "/v1/agent/service/deregister/{id}",
            "/v1/agent/check/pass/{check_id}",
            "/v1/health/service/{service}",
            "/v1/catalog/services",
            "/v1/catalog/service/{service}",
            "/v1/agent/services",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} documented");
        }
    }
}
