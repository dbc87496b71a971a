//! HTTP throughput through the mesh: nginx in the server pod, wrk in the client pod, keep-alive
//! connections, so this measures the proxies' per-request byte path rather than connection setup.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_tests::{Pod, Topology};

pub const HTTP_PORT: u16 = 8081;
/// nginx listens here too: no service endpoint, so the plain baseline is not captured.
pub const BASELINE_HTTP_PORT: u16 = 8082;
/// nginx answers every request on this port with 503: a failing endpoint for the retry rows.
pub const FAILING_HTTP_PORT: u16 = 8083;
const THREADS: &str = "2";
const CONNECTIONS: &str = "16";
const DURATION: &str = "5s";

/// Starts nginx (one worker, `return 200`; `return 503` on [`FAILING_HTTP_PORT`]) in `pod` on
/// [`HTTP_PORT`] and waits until it answers; returns the master's pid for [`stop_nginx`].
pub fn start_nginx(topo: &Topology, pod: &Pod) -> Result<u32> {
    let dir = topo.workdir.join(format!("nginx-{}", pod.name));
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\nworker_shutdown_timeout 3s;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         \x20 server {{ listen {HTTP_PORT}; listen {BASELINE_HTTP_PORT}; location / {{ return 200 \"ok\\n\"; }} }}\n\
         \x20 server {{ listen {FAILING_HTTP_PORT}; location / {{ return 503 \"down\\n\"; }} }}\n}}\n"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut command = Command::new("nginx");
    command
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(File::create(dir.join("stderr.log"))?);
    let pid = topo.spawn_in_pod(pod, &mut command)?;
    let local = format!("127.0.0.1:{HTTP_PORT}");
    topo.wait_for("nginx", Duration::from_secs(10), || {
        Ok(
            topo.connect_from(pod, &local, "GET / HTTP/1.0\r\n\r\n", 1)?[0]
                .reply
                .contains("200 OK"),
        )
    })?;
    Ok(pid)
}

/// Graceful stop (SIGQUIT): the master takes its workers with it, so no orphaned worker keeps
/// the pod's cgroup busy when the topology is torn down. `worker_shutdown_timeout` bounds how
/// long a worker waits for connections still open (pooled upstream connections of the agents).
pub fn stop_nginx(topo: &Topology, master: u32) -> Result<()> {
    topo.signal(master, libc::SIGQUIT)?;
    topo.wait(master, Duration::from_secs(10))?;
    Ok(())
}

/// One wrk run.
pub struct WrkRun {
    pub rate: f64,
    pub p50: u64,
    pub p99: u64,
    /// Socket errors plus non-2xx/3xx responses.
    pub errors: u64,
    pub requests: u64,
}

/// A wrk run from `client` against `target`, with `extra` arguments (e.g. a request header).
pub fn wrk(topo: &Topology, client: &Pod, target: &str, extra: &[&str]) -> Result<WrkRun> {
    let url = format!("http://{target}/");
    let mut args = vec![
        "-t",
        THREADS,
        "-c",
        CONNECTIONS,
        "-d",
        DURATION,
        "--latency",
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    let out = topo.run_in_pod(client, "wrk", &args)?;
    let (rate, p50, p99, errors) =
        parse_wrk(&out).with_context(|| format!("unexpected wrk output:\n{out}"))?;
    // "  80000 requests in 5.00s, 12.00MB read"
    let requests = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("no request count in wrk output")?;
    Ok(WrkRun {
        rate,
        p50,
        p99,
        errors,
        requests,
    })
}

fn parse_wrk(out: &str) -> Result<(f64, u64, u64, u64)> {
    let value = |prefix: &str| {
        out.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let rate: f64 = value("Requests/sec:").context("no Requests/sec")?.parse()?;
    let p50 = micros(value("50%").context("no 50% latency")?)?;
    let p99 = micros(value("99%").context("no 99% latency")?)?;
    let errors = value("Socket errors:")
        .map(|e| {
            e.split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
        + value("Non-2xx or 3xx responses:")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    Ok((rate, p50, p99, errors))
}

/// wrk prints latencies like "412.00us", "1.23ms" or "2.01s".
fn micros(text: &str) -> Result<u64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: f64 = number.parse()?;
    let factor = match unit {
        "us" => 1.0,
        "ms" => 1_000.0,
        "s" => 1_000_000.0,
        _ => bail!("unknown latency unit in {text:?}"),
    };
    Ok((n * factor) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_latency_output() {
        let out = "Running 5s test @ http://10.96.0.11/\n  Latency Distribution\n     50%  412.00us\n     75%  600.00us\n     90%    1.10ms\n     99%    3.25ms\n  80000 requests in 5.00s, 12.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\nRequests/sec:  16000.12\n";
        let (rate, p50, p99, errors) = parse_wrk(out).expect("parses");
        assert!((rate - 16000.12).abs() < 0.01);
        assert_eq!((p50, p99, errors), (412, 3250, 3));
    }
}
