//! Plain-text tables for `mesh-agent ctl`: one row per JSON object, chosen columns, aligned.

use serde_json::Value;

/// Renders `rows` with the given (header, field) columns; a field may be a dotted path.
pub fn render(rows: &[Value], columns: &[(&str, &str)]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            columns
                .iter()
                .map(|(_, field)| cell(lookup(row, field)))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (header, _))| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([header.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let headers: Vec<String> = columns.iter().map(|(h, _)| (*h).to_owned()).collect();
    for line in std::iter::once(&headers).chain(cells.iter()) {
        let padded: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Every field of an object as `key: value` lines (for single objects such as /status).
pub fn key_values(object: &Value) -> String {
    let Some(map) = object.as_object() else {
        return format!("{object}\n");
    };
    let width = map.keys().map(String::len).max().unwrap_or(0);
    map.iter()
        .map(|(k, v)| format!("{k:<width$}  {}\n", cell(Some(v))))
        .collect()
}

fn lookup<'a>(row: &'a Value, field: &str) -> Option<&'a Value> {
    field.split('.').try_fold(row, |v, key| v.get(key))
}

/// A value as one cell: strings bare, null/absent as "-", lists comma-separated.
pub fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) if items.is_empty() => "-".to_owned(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| cell(Some(v)))
            .collect::<Vec<_>>()
            .join(","),
        Some(v) => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn columns_are_aligned_and_missing_values_dashed() {
        let rows = [
            json!({"name": "echo", "vip": "10.96.0.10:80", "eps": ["a", "b"]}),
            json!({"name": "wallet-long", "vip": null, "eps": []}),
        ];
        let text = render(
            &rows,
            &[("NAME", "name"), ("VIP", "vip"), ("ENDPOINTS", "eps")],
        );
        assert_eq!(
            text,
            "NAME         VIP            ENDPOINTS\n\
             echo         10.96.0.10:80  a,b\n\
             wallet-long  -              -\n"
        );
    }

    #[test]
    fn dotted_fields_reach_into_objects() {
        let rows = [json!({"a": {"b": 7}})];
        assert_eq!(render(&rows, &[("B", "a.b")]), "B\n7\n");
    }
}
