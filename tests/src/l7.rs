//! HTTP helpers for the traffic-policy suites: fault-injecting upstream servers (`meshprobe
//! http`) in pods, and curl (a real HTTP client) run inside pods.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::topology::probe_binary;
use crate::{Pod, Topology};

/// A running `meshprobe http` server.
pub struct HttpServer {
    pub pid: u32,
    /// One "<METHOD> <path>" line per request it received.
    pub record: PathBuf,
}

impl HttpServer {
    /// Requests received so far, as "<METHOD> <path>" lines.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// Starts `meshprobe http <port> <name> <behaviour>` in `pod` and waits until it listens.
pub fn start_http_server(
    topo: &Topology,
    pod: &Pod,
    port: u16,
    name: &str,
    behaviour: &str,
) -> Result<HttpServer> {
    // A behaviour may carry a path (`health=<file>`): keep the tag one file name.
    let tag = format!("{}-{port}-{name}-{behaviour}", pod.name).replace('/', "_");
    let record = topo.workdir.join(format!("http-record-{tag}"));
    let out = topo.workdir.join(format!("http-{tag}.out"));
    let mut command = Command::new(probe_binary()?);
    command
        .args(["http", &port.to_string(), name, behaviour])
        .arg(&record)
        .stdout(File::create(&out)?)
        .stderr(Stdio::inherit());
    let pid = topo.spawn_in_pod(pod, &mut command)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("listening")
    {
        if Instant::now() > deadline {
            bail!("HTTP server in {} did not start", pod.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(HttpServer { pid, record })
}

/// One response as curl saw it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    /// `x-served-by` of the upstream server (empty on agent-made replies).
    pub served_by: String,
    /// `x-nodemesh-reason` of agent-made replies.
    pub reason: String,
    pub retry_after: String,
    pub seconds: f64,
}

const WRITE_OUT: &str = "%{http_code}|%header{x-served-by}|%header{x-nodemesh-reason}|%header{retry-after}|%{time_total}\\n";

/// Runs curl in `pod` for `count` requests to `url` on one keep-alive connection (curl's URL
/// globbing), with `extra` curl arguments, and returns one [`Reply`] per request.
pub fn curl(
    topo: &Topology,
    pod: &Pod,
    url: &str,
    count: u32,
    extra: &[&str],
) -> Result<Vec<Reply>> {
    let target = if count > 1 {
        format!("{url}?n=[1-{count}]")
    } else {
        url.to_owned()
    };
    let mut args = vec!["-s", "-o", "/dev/null", "-w", WRITE_OUT];
    args.extend_from_slice(extra);
    args.push(&target);
    let out = topo.run_in_pod(pod, "curl", &args)?;
    parse_replies(&out)
}

/// curl's output lines (in [`WRITE_OUT`] form), one [`Reply`] per request.
fn parse_replies(out: &str) -> Result<Vec<Reply>> {
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            if f.len() != 5 {
                bail!("unexpected curl output line {l:?}");
            }
            Ok(Reply {
                code: f[0].parse().with_context(|| format!("code in {l:?}"))?,
                served_by: f[1].trim().to_owned(),
                reason: f[2].trim().to_owned(),
                retry_after: f[3].trim().to_owned(),
                seconds: f[4].parse().with_context(|| format!("time in {l:?}"))?,
            })
        })
        .collect()
}

/// A curl running in the background (see [`curl_in_background`]).
pub struct BackgroundCurl {
    pid: u32,
    out: PathBuf,
}

impl BackgroundCurl {
    /// Waits for curl to exit and returns one [`Reply`] per request.
    pub fn finish(self, topo: &Topology, timeout: Duration) -> Result<Vec<Reply>> {
        topo.wait(self.pid, timeout)?;
        parse_replies(&std::fs::read_to_string(&self.out)?)
    }
}

/// Like [`curl`], but started in the background so the test can change things meanwhile; all
/// `count` requests go over one keep-alive connection, paced by `--rate` in `extra` if given.
pub fn curl_in_background(
    topo: &Topology,
    pod: &Pod,
    url: &str,
    count: u32,
    extra: &[&str],
) -> Result<BackgroundCurl> {
    static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = topo.workdir.join(format!("curl-{}-{n}.out", pod.name));
    let mut command = Command::new("curl");
    command
        .args(["-s", "-o", "/dev/null", "-w", WRITE_OUT])
        .args(extra)
        .arg(format!("{url}?n=[1-{count}]"))
        .stdout(File::create(&out)?)
        .stderr(Stdio::inherit());
    let pid = topo.spawn_in_pod(pod, &mut command)?;
    Ok(BackgroundCurl { pid, out })
}

/// Counts replies with `code`.
pub fn count_code(replies: &[Reply], code: u16) -> usize {
    replies.iter().filter(|r| r.code == code).count()
}

/// Counts replies served by `name`.
pub fn count_served(replies: &[Reply], name: &str) -> usize {
    replies.iter().filter(|r| r.served_by == name).count()
}
