//! The agent binary's command line without the kernel: log formats, and start-up errors reported
//! once, before any side effect.

use std::process::{Command, Output};

use mesh_tests::topology::agent_binary;

fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(agent_binary().expect("agent binary"));
    command
        .args(args)
        .env_remove("NODEMESH_LOG_FORMAT")
        .env_remove("NODEMESH_LOG");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("running mesh-agent")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn json_logs_are_one_object_per_line_and_the_error_is_printed_once() {
    let out = agent(
        &[
            "--config",
            "/nonexistent/nodemesh.yaml",
            "--log-format",
            "json",
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected the error once:\n{err}");
    let value: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON log line");
    assert_eq!(value["level"], "ERROR", "{value}");
    let message = value["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("/nonexistent/nodemesh.yaml"), "{value}");
}

#[test]
fn env_selects_the_format_and_text_logs_have_no_colour_in_a_pipe() {
    let out = agent(
        &["--config", "/nonexistent/nodemesh.yaml"],
        &[("NODEMESH_LOG_FORMAT", "json")],
    );
    let err = stderr(&out);
    assert!(
        err.trim_start().starts_with('{'),
        "NODEMESH_LOG_FORMAT=json ignored:\n{err}"
    );

    let out = agent(
        &[
            "--config",
            "/nonexistent/nodemesh.yaml",
            "--log-format",
            "text",
        ],
        &[],
    );
    let err = stderr(&out);
    assert!(err.contains("ERROR"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "ANSI codes in piped stderr:\n{err:?}"
    );
    assert_eq!(
        err.matches("/nonexistent/nodemesh.yaml").count(),
        1,
        "printed more than once:\n{err}"
    );

    let bad = agent(&["--config", "/x", "--log-format", "xml"], &[]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("json"),
        "the error lists the accepted formats"
    );
}
