//! `mesh-agent ctl`: a command-line client of a running agent's admin port. Tables for people by
//! default, `-o json` for scripts (the admin endpoint's JSON as it is).

mod client;
mod table;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CtlError {
    #[error("cannot reach the agent's admin port at {admin} (is the agent running? see --admin): {source}")]
    Connect {
        admin: SocketAddr,
        source: std::io::Error,
    },
    #[error("{path} answered {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("{path}: unexpected answer: {detail}")]
    Malformed { path: String, detail: String },
}

#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// Admin address of the agent (listen.admin; the agent's own override variable applies, so
    /// `ctl` run in the agent's environment finds it).
    #[arg(long, env = "NODEMESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum CtlCommand {
    /// Node, readiness, config generation and counts.
    Status,
    /// Workloads, their identities and whether capture is attached.
    Workloads,
    /// Services, VIPs and endpoints.
    Services,
    /// Endpoints of every service.
    Endpoints,
    /// Kernel deny-list, authorization policies and decision counts.
    Policy,
    /// Workload certificates and their expiry.
    Certs,
    /// Active proxied connections (outbound and inbound HBONE) with identities and bytes.
    Flows,
    /// The effective config (YAML; JSON with -o json).
    Config,
    /// Shows the log filter, or replaces it (e.g. `debug`, `info,mesh_agent=debug`).
    LogLevel { filter: Option<String> },
    /// Services, workloads, authorization policies and the mesh-wide default defined in the
    /// registry (shared by every agent on the backend).
    Mesh,
    /// Writes a mesh document (services; workloads under their node's name; authorization;
    /// default) to the registry.
    Apply {
        /// YAML or JSON file (`-` reads standard input).
        #[arg(short = 'f', long = "file")]
        file: std::path::PathBuf,
    },
    /// Removes one registry-defined object: `service <name>` (with the registry authorization
    /// policies whose `service` it is), `workload <node>/<name>`, `authorization <name>` or
    /// `default` (the mesh-wide default).
    Delete {
        #[arg(value_enum)]
        kind: MeshKind,
        #[arg(required_if_eq_any([("kind", "service"), ("kind", "workload"), ("kind", "authorization")]))]
        name: Option<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshKind {
    Service,
    Workload,
    Authorization,
    Default,
}

/// Runs one command against the agent and returns what to print.
pub fn run(args: &CtlArgs) -> Result<String, CtlError> {
    let admin = args.admin;
    let json_out = args.output == Output::Json;
    let pretty = |v: &Value| format!("{v:#}\n");
    match &args.command {
        CtlCommand::Status => {
            let v = get(admin, "/status")?;
            Ok(if json_out {
                pretty(&v)
            } else {
                table::key_values(&v)
            })
        }
        CtlCommand::Workloads => {
            let v = get(admin, "/workloads")?;
            if json_out {
                return Ok(pretty(&v));
            }
            Ok(table::render(
                list(&v, "workloads"),
                &[
                    ("NAME", "name"),
                    ("NAMESPACE", "namespace"),
                    ("IDENTITY", "identity"),
                    ("ID", "identity_id"),
                    ("SERVICE", "service"),
                    ("STRICT", "strict"),
                    ("CAPTURED", "capture_attached"),
                    ("CGROUP", "cgroup"),
                ],
            ))
        }
        CtlCommand::Services => {
            let v = get(admin, "/services")?;
            if json_out {
                return Ok(pretty(&v));
            }
            let rows: Vec<Value> = list(&v, "services")
                .iter()
                .map(|s| {
                    let endpoints: Vec<Value> = list(s, "endpoints")
                        .iter()
                        .map(|e| Value::String(endpoint_text(e)))
                        .collect();
                    let mut s = s.clone();
                    s["endpoints"] = Value::Array(endpoints);
                    s
                })
                .collect();
            Ok(table::render(
                &rows,
                &[
                    ("NAME", "name"),
                    ("NAMESPACE", "namespace"),
                    ("ID", "id"),
                    ("VIP", "vip"),
                    ("ENDPOINTS", "endpoints"),
                ],
            ))
        }
        CtlCommand::Endpoints => endpoints(admin, json_out),
        CtlCommand::Policy => {
            let v = get(admin, "/policy")?;
            if json_out {
                return Ok(pretty(&v));
            }
            Ok(policy_tables(&v))
        }
        CtlCommand::Certs => {
            let v = get(admin, "/certs")?;
            if json_out {
                return Ok(pretty(&v));
            }
            let now = unix_now();
            let rows: Vec<Value> = list(&v, "certificates")
                .iter()
                .map(|c| {
                    let left = |field: &str| {
                        c[field]
                            .as_u64()
                            .map_or("-".to_owned(), |t| duration_text(t as i64 - now as i64))
                    };
                    json!({
                        "spiffe_id": c["spiffe_id"],
                        "expires_in": left("not_after"),
                        "renews_in": left("renew_at"),
                        "not_after": c["not_after"],
                    })
                })
                .collect();
            Ok(table::render(
                &rows,
                &[
                    ("SPIFFE ID", "spiffe_id"),
                    ("EXPIRES IN", "expires_in"),
                    ("RENEWS IN", "renews_in"),
                    ("NOT AFTER (UNIX)", "not_after"),
                ],
            ))
        }
        CtlCommand::Flows => {
            let v = get(admin, "/flows")?;
            if json_out {
                return Ok(pretty(&v));
            }
            let rows: Vec<Value> = list(&v, "flows")
                .iter()
                .map(|f| {
                    let mut f = f.clone();
                    let age = f["age_ms"].as_u64().unwrap_or(0);
                    f["age"] = Value::String(format!("{:.1}s", age as f64 / 1000.0));
                    f
                })
                .collect();
            Ok(table::render(
                &rows,
                &[
                    ("ID", "id"),
                    ("DIRECTION", "direction"),
                    ("SOURCE", "source"),
                    ("SERVICE", "service"),
                    ("ENDPOINT", "endpoint"),
                    ("NODE", "node"),
                    ("AGE", "age"),
                    ("BYTES OUT", "bytes_to_endpoint"),
                    ("BYTES IN", "bytes_from_endpoint"),
                ],
            ))
        }
        CtlCommand::Config => {
            let v = get(admin, "/config_dump")?;
            if json_out {
                return Ok(pretty(&v));
            }
            serde_yaml::to_string(&v).map_err(|e| CtlError::Malformed {
                path: "/config_dump".to_owned(),
                detail: e.to_string(),
            })
        }
        CtlCommand::LogLevel { filter } => {
            let v = match filter {
                None => get(admin, "/logging")?,
                Some(f) => call(
                    admin,
                    "PUT",
                    &format!("/logging?level={}", client::encode(f)),
                )?,
            };
            Ok(if json_out {
                pretty(&v)
            } else {
                format!("log level: {}\n", table::cell(v.get("level")))
            })
        }
        CtlCommand::Mesh => mesh_table(&get(admin, "/mesh")?, json_out),
        CtlCommand::Apply { file } => {
            let text = read_document(file)?;
            mesh_table(&send(admin, "PUT", "/mesh", text.as_bytes())?, json_out)
        }
        CtlCommand::Delete { kind, name } => {
            let name = name.as_deref().unwrap_or_default();
            let path = match kind {
                MeshKind::Service => format!("/mesh/services/{name}"),
                MeshKind::Workload => format!("/mesh/workloads/{name}"),
                MeshKind::Authorization => format!("/mesh/authorization/{name}"),
                MeshKind::Default => "/mesh/default".to_owned(),
            };
            mesh_table(&call(admin, "DELETE", &path)?, json_out)
        }
    }
}

fn read_document(file: &std::path::Path) -> Result<String, CtlError> {
    let read = if file == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    };
    read.map_err(|e| CtlError::Malformed {
        path: file.display().to_string(),
        detail: e.to_string(),
    })
}

/// Registry mesh objects as tables and the mesh-wide default (or the admin JSON).
fn mesh_table(v: &Value, json_out: bool) -> Result<String, CtlError> {
    if json_out {
        return Ok(format!("{v:#}\n"));
    }
    let services = table::render(
        list(v, "services"),
        &[("NAME", "name"), ("NAMESPACE", "namespace"), ("VIP", "vip")],
    );
    let workloads = table::render(
        list(v, "workloads"),
        &[
            ("NODE", "node"),
            ("NAME", "workload.name"),
            ("NAMESPACE", "workload.namespace"),
            ("SERVICE ACCOUNT", "workload.service_account"),
            ("CGROUP", "workload.cgroup"),
        ],
    );
    let authorization = table::render(
        list(v, "authorization"),
        &[
            ("POLICY", "name"),
            ("SERVICE", "service"),
            ("DEFAULT", "default"),
            ("MODE", "mode"),
            ("ALLOW", "allow"),
            ("DENY", "deny"),
        ],
    );
    let default = table::cell(v.get("default"));
    Ok(format!(
        "{services}\n{workloads}\n{authorization}\nmesh default: {default}\n"
    ))
}

fn get(admin: SocketAddr, path: &str) -> Result<Value, CtlError> {
    call(admin, "GET", path)
}

fn call(admin: SocketAddr, method: &str, path: &str) -> Result<Value, CtlError> {
    send(admin, method, path, b"")
}

fn send(admin: SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<Value, CtlError> {
    let (status, body) = client::request(admin, method, path, body)?;
    if status != 200 {
        return Err(CtlError::Status {
            path: path.to_owned(),
            status,
            body: body.trim().to_owned(),
        });
    }
    serde_json::from_str(&body).map_err(|e| CtlError::Malformed {
        path: path.to_owned(),
        detail: format!("not JSON ({e}): {body}"),
    })
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn endpoint_text(e: &Value) -> String {
    let address = table::cell(e.get("address"));
    match e.get("node").and_then(Value::as_str) {
        Some(node) => format!("{address}@{node}"),
        None => address,
    }
}

/// One row per endpoint from `/endpoints` (per service: endpoints with breaker state, EWMA
/// latency, in-flight requests, ejection).
fn endpoints(admin: SocketAddr, json_out: bool) -> Result<String, CtlError> {
    let v = get(admin, "/endpoints")?;
    if json_out {
        return Ok(format!("{v:#}\n"));
    }
    Ok(table::render(
        &endpoint_rows(&v),
        &[
            ("SERVICE", "service"),
            ("ADDRESS", "address"),
            ("NODE", "node"),
            ("ZONE", "zone"),
            ("WEIGHT", "weight"),
            ("BREAKER", "breaker"),
            ("EWMA MS", "ewma_ms"),
            ("IN FLIGHT", "in_flight"),
            ("EJECTED FOR S", "ejected_for_s"),
        ],
    ))
}

fn endpoint_rows(v: &Value) -> Vec<Value> {
    list(v, "services")
        .iter()
        .flat_map(|s| {
            list(s, "endpoints").iter().map(move |e| {
                let mut row = e.clone();
                row["service"] = s["service"].clone();
                if row["node"].is_null() {
                    row["node"] = Value::String("local".to_owned());
                }
                row
            })
        })
        .collect()
}

fn policy_tables(v: &Value) -> String {
    let rule_text = |rules: &Value| -> Value {
        let texts: Vec<Value> = rules
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let parts: Vec<String> = r
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| format!("{k}={}", table::cell(Some(v))))
                    .collect();
                Value::String(parts.join(" "))
            })
            .collect();
        Value::Array(texts)
    };
    let policies: Vec<Value> = list(v, "authorization")
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p["allow"] = rule_text(&p["allow"]);
            p["deny"] = rule_text(&p["deny"]);
            p
        })
        .collect();
    format!(
        "KERNEL DENY-LIST\n{}\nAUTHORIZATION POLICIES\n{}\nDECISIONS\n{}",
        table::render(
            list(v, "kernel_deny"),
            &[("FROM", "from"), ("TO", "to"), ("RULE", "rule")]
        ),
        table::render(
            &policies,
            &[
                ("NAME", "name"),
                ("SERVICE", "service"),
                ("MODE", "mode"),
                ("DEFAULT", "default"),
                ("ALLOW", "allow"),
                ("DENY", "deny"),
            ]
        ),
        table::render(
            list(v, "decisions"),
            &[
                ("POLICY", "policy"),
                ("DECISION", "decision"),
                ("ALLOWED", "allowed"),
                ("COUNT", "count"),
            ]
        ),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// "23h59m", "-5m" (expired), "42s".
fn duration_text(seconds: i64) -> String {
    let sign = if seconds < 0 { "-" } else { "" };
    let s = seconds.unsigned_abs();
    let text = match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, s % 3600 / 60),
    };
    format!("{sign}{text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_flatten_per_service() {
        let v = json!({"services": [{"service": "echo", "endpoints": [
            {"address": "10.1.2.2:8080", "node": null, "breaker": "closed", "ewma_ms": 1.5},
            {"address": "10.2.1.2:8080", "node": "node-2", "breaker": "open", "ejected_for_s": 30}]}]});
        let rows = endpoint_rows(&v);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0]["service"].as_str(), rows[0]["node"].as_str()),
            (Some("echo"), Some("local"))
        );
        assert_eq!(rows[1]["node"], "node-2");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_text(42), "42s");
        assert_eq!(duration_text(3 * 60 + 5), "3m5s");
        assert_eq!(duration_text(24 * 3600 - 60), "23h59m");
        assert_eq!(duration_text(-300), "-5m0s");
    }

    #[test]
    fn policy_rules_print_as_field_value_pairs() {
        let v = json!({
            "kernel_deny": [{"from": "demo/client", "to": "wallet", "rule": "r"}],
            "authorization": [{"name": "p", "service": "echo", "default": "deny",
                               "allow": [{"from": null, "from_service": "client", "from_namespace": null}],
                               "deny": []}],
            "decisions": [{"policy": "p", "allowed": true, "count": 3}],
        });
        let text = policy_tables(&v);
        assert!(text.contains("demo/client  wallet  r"), "{text}");
        assert!(text.contains("from_service=client"), "{text}");
        assert!(text.contains("p       -         true     3"), "{text}");
    }
}
