//! A tiny blocking HTTP/1.0 GET, enough for the agent's /metrics and /ready endpoints.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Returns (status code, body).
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or((response.as_str(), ""));
    let Some(status) = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()) else {
        bail!("malformed HTTP response from {addr}{path}: {head:?}");
    };
    Ok((status, body.to_owned()))
}

/// Reads one sample from Prometheus text: `name{labels} value`, where every given label matches.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            if all {
                value.parse().ok()
            } else {
                None
            }
        })
}

/// promtool's one expected finding on the agent's output: Istio's duration metric is named in
/// milliseconds (dashboards query that name), where Prometheus prefers seconds.
const ISTIO_UNIT_LINT: &str =
    "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";

/// Runs `promtool check metrics` (Debian's prometheus package) on `text`; fails on any parse
/// error or lint finding other than [`ISTIO_UNIT_LINT`].
pub fn promtool_check(text: &str) -> Result<()> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool (Debian package prometheus, installed by `cargo xtask setup`)")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| !l.trim().is_empty() && *l != ISTIO_UNIT_LINT)
        .collect();
    if !out.status.success() && !problems.is_empty() {
        bail!("promtool check metrics: {problems:?}\n{text}");
    }
    Ok(())
}
