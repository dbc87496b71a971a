//! Nodes, pods and agents in network namespaces; everything is torn down on drop.

use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{ip, run};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Root of the test cgroups under the cgroup v2 mount.
pub const CGROUP_DIR: &str = "nodemesh-tests";

/// Finds the cgroup v2 mount (hybrid hosts mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 mount in /proc/self/mounts")
}

/// Fails with a clear message when the tests cannot create namespaces and load eBPF.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the end-to-end tests create network namespaces and load eBPF: run them as root");
    }
    Ok(())
}

pub struct Topology {
    pub prefix: String,
    pub cgroup_root: PathBuf,
    /// Directory for configs and logs of this topology.
    pub workdir: PathBuf,
    nodes: Vec<Node>,
    uplinks: u8,
    children: Mutex<Vec<Child>>,
    /// Container cgroups made below pod cgroups; removed before the pods'.
    containers: Mutex<Vec<PathBuf>>,
}

pub struct Node {
    pub index: u8,
    pub netns: String,
    pub agent_ip: Ipv4Addr,
    pub uplink_ip: Option<Ipv4Addr>,
    pub pods: Vec<Pod>,
    /// Instance name of this node's agent (its pinned maps directory).
    pub instance: String,
}

#[derive(Clone)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// cgroup directory relative to the cgroup v2 mount, as the agent config names it.
    pub cgroup_rel: PathBuf,
    pub cgroup_abs: PathBuf,
}

/// A running agent; killed (SIGKILL) with the topology unless stopped earlier.
pub struct AgentHandle {
    pub pid: u32,
    pub log: PathBuf,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    pub netns: String,
}

/// Mounts bpffs at /sys/fs/bpf once per test process when nothing is mounted there. Agents
/// would do it themselves, but agents started in parallel on a fresh machine could each mount
/// one, stacking mounts that hide each other's pinned maps.
fn ensure_bpffs() -> Result<()> {
    static MOUNTED: Mutex<bool> = Mutex::new(false);
    let mut done = MOUNTED.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return Ok(());
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
    });
    if !mounted {
        run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    }
    *done = true;
    Ok(())
}

impl Topology {
    pub fn new() -> Result<Topology> {
        require_root()?;
        ensure_bpffs()?;
        let prefix = format!(
            "nm{}x{}",
            std::process::id() % 10000,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let cgroup_root = cgroup2_mount()?.join(CGROUP_DIR).join(&prefix);
        std::fs::create_dir_all(&cgroup_root)
            .with_context(|| format!("creating {}", cgroup_root.display()))?;
        let workdir = std::env::temp_dir().join(format!("nodemesh-{prefix}"));
        std::fs::create_dir_all(&workdir)?;
        Ok(Topology {
            prefix,
            cgroup_root,
            workdir,
            nodes: Vec::new(),
            uplinks: 0,
            children: Mutex::new(Vec::new()),
            containers: Mutex::new(Vec::new()),
        })
    }

    pub fn node(&self, index: u8) -> &Node {
        &self.nodes[usize::from(index) - 1]
    }

    /// Adds node `n` (1-based) with the given pod names.
    pub fn add_node(&mut self, pods: &[&str]) -> Result<u8> {
        let n = u8::try_from(self.nodes.len() + 1)?;
        let netns = format!("{}-n{n}", self.prefix);
        ip(&["netns", "add", &netns])?;
        // Registered before its pods so that teardown finds everything created so far.
        self.nodes.push(Node {
            index: n,
            netns: netns.clone(),
            agent_ip: Ipv4Addr::new(10, n, 255, 1),
            uplink_ip: None,
            pods: Vec::new(),
            instance: format!("{}-n{n}", self.prefix),
        });
        let agent_ip = self.node(n).agent_ip;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{agent_ip}/32"),
            "dev",
            "lo",
        ])?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &netns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        for (i, name) in pods.iter().enumerate() {
            let p = u8::try_from(i + 1)?;
            let pod = self.add_pod(&netns, n, p, name)?;
            self.nodes[usize::from(n) - 1].pods.push(pod);
        }
        Ok(n)
    }

    fn add_pod(&self, node_ns: &str, n: u8, p: u8, name: &str) -> Result<Pod> {
        let netns = format!("{}-n{n}p{p}", self.prefix);
        ip(&["netns", "add", &netns])?;
        let host_if = format!("{}n{n}p{p}", self.prefix);
        let host_if = last15(&host_if);
        ip(&[
            "link", "add", &host_if, "netns", node_ns, "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ])?;
        let node_ip = format!("10.{n}.{p}.1");
        let pod_ip = Ipv4Addr::new(10, n, p, 2);
        ip(&[
            "-n",
            node_ns,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            &host_if,
        ])?;
        ip(&["-n", node_ns, "link", "set", &host_if, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{pod_ip}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "route", "add", "default", "via", &node_ip])?;
        let cgroup_rel = Path::new(CGROUP_DIR)
            .join(&self.prefix)
            .join(format!("n{n}-{name}"));
        let cgroup_abs = self.cgroup_root.join(format!("n{n}-{name}"));
        std::fs::create_dir_all(&cgroup_abs)?;
        Ok(Pod {
            name: name.to_owned(),
            netns,
            ip: pod_ip,
            cgroup_rel,
            cgroup_abs,
        })
    }

    /// Connects two nodes with a veth "uplink" (10.0.0.a <-> 10.0.0.b) and routes between them.
    /// Returns the name of node `a`'s uplink interface.
    pub fn link_nodes(&mut self, a: u8, b: u8) -> Result<String> {
        self.uplinks += 1;
        let (ns_a, ns_b) = (self.node(a).netns.clone(), self.node(b).netns.clone());
        let (if_a, if_b) = (
            format!("up{}a{}", self.prefix, self.uplinks),
            format!("up{}b{}", self.prefix, self.uplinks),
        );
        let (if_a, if_b) = (last15(&if_a), last15(&if_b));
        ip(&[
            "link", "add", &if_a, "netns", &ns_a, "type", "veth", "peer", "name", &if_b, "netns",
            &ns_b,
        ])?;
        let (ip_a, ip_b) = (Ipv4Addr::new(10, 0, 0, a), Ipv4Addr::new(10, 0, 0, b));
        for (ns, ifname, addr, peer, peer_node) in
            [(&ns_a, &if_a, ip_a, ip_b, b), (&ns_b, &if_b, ip_b, ip_a, a)]
        {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                ifname,
            ])?;
            ip(&["-n", ns, "link", "set", ifname, "up"])?;
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                &format!("10.{peer_node}.0.0/16"),
                "via",
                &peer.to_string(),
            ])?;
        }
        self.nodes[usize::from(a) - 1].uplink_ip = Some(ip_a);
        self.nodes[usize::from(b) - 1].uplink_ip = Some(ip_b);
        Ok(if_a)
    }

    /// A container of `pod`: the pod's network namespace with a child cgroup of the pod's cgroup,
    /// as Kubernetes runs a pod's processes. The agent config still names only the pod cgroup.
    pub fn container(&self, pod: &Pod, name: &str) -> Result<Pod> {
        let cgroup_abs = pod.cgroup_abs.join(name);
        std::fs::create_dir_all(&cgroup_abs)?;
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(cgroup_abs.clone());
        Ok(Pod {
            name: format!("{}-{name}", pod.name),
            cgroup_rel: pod.cgroup_rel.join(name),
            cgroup_abs,
            ..pod.clone()
        })
    }

    /// Starts a process inside a pod: its network namespace and its cgroup.
    pub fn spawn_in_pod(&self, pod: &Pod, command: &mut Command) -> Result<u32> {
        let procs = OpenOptions::new()
            .write(true)
            .open(pod.cgroup_abs.join("cgroup.procs"))
            .with_context(|| format!("opening cgroup of pod {}", pod.name))?;
        self.spawn_in(&pod.netns, Some(procs), command)
    }

    /// Starts a process in a node's network namespace (outside any pod cgroup).
    pub fn spawn_in_node(&self, node: &Node, command: &mut Command) -> Result<u32> {
        self.spawn_in(&node.netns, None, command)
    }

    fn spawn_in(
        &self,
        netns: &str,
        cgroup_procs: Option<File>,
        command: &mut Command,
    ) -> Result<u32> {
        let ns = File::open(format!("/run/netns/{netns}"))
            .with_context(|| format!("opening netns {netns}"))?;
        let ns_fd = ns.as_raw_fd();
        let cg_fd = cgroup_procs.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: the closure only makes async-signal-safe syscalls on fds opened before fork.
        unsafe {
            command.pre_exec(move || {
                if let Some(fd) = cg_fd {
                    // Writing "0" moves the calling process into the cgroup.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("spawning {command:?} in {netns}"))?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child);
        Ok(pid)
    }

    /// Runs a command in a pod to completion and returns its stdout (fails on non-zero exit).
    pub fn run_in_pod(&self, pod: &Pod, program: &str, args: &[&str]) -> Result<String> {
        let out_path = self.workdir.join(format!(
            "out-{}-{}",
            pod.name,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let out = File::create(&out_path)?;
        let mut command = Command::new(program);
        command.args(args).stdout(out).stderr(Stdio::inherit());
        let pid = self.spawn_in_pod(pod, &mut command)?;
        let status = self.wait(pid, Duration::from_secs(60))?;
        let stdout = std::fs::read_to_string(&out_path)?;
        if !status.success() {
            bail!(
                "{program} {args:?} in pod {} exited with {status}: {stdout}",
                pod.name
            );
        }
        Ok(stdout)
    }

    /// Waits for a child started by this topology.
    pub fn wait(&self, pid: u32, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
                let child = children
                    .iter_mut()
                    .find(|c| c.id() == pid)
                    .context("unknown child")?;
                if let Some(status) = child.try_wait()? {
                    return Ok(status);
                }
            }
            if Instant::now() > deadline {
                bail!("process {pid} did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to a child started by this topology.
    pub fn signal(&self, pid: u32, signal: i32) -> Result<()> {
        // SAFETY: kill has no memory preconditions; pid is our own child.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a thread that has joined `netns` (setns only affects the calling thread).
    pub fn in_netns<T: Send>(
        &self,
        netns: &str,
        f: impl FnOnce() -> Result<T> + Send,
    ) -> Result<T> {
        let ns = File::open(format!("/run/netns/{netns}"))
            .with_context(|| format!("opening netns {netns}"))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid fd; it changes only this thread's namespace.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {netns}: {}", std::io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| bail!("thread in {netns} panicked"))
        })
    }

    /// Writes an agent config for `node` and starts the agent binary in the node namespace.
    pub fn start_agent(
        &self,
        node: &Node,
        config_yaml: &str,
        extra_env: &[(&str, &str)],
    ) -> Result<AgentHandle> {
        self.start_agent_logged(node, config_yaml, extra_env, &node.instance)
    }

    /// Like [`Topology::start_agent`] with its own log file `<log_name>.log`, for a second agent
    /// of the same node (a rolling restart runs the new one beside the old one).
    pub fn start_agent_logged(
        &self,
        node: &Node,
        config_yaml: &str,
        extra_env: &[(&str, &str)],
        log_name: &str,
    ) -> Result<AgentHandle> {
        let config = self.config_path(node);
        std::fs::write(&config, config_yaml)?;
        let log = self.workdir.join(format!("{log_name}.log"));
        // Each agent in a cgroup of its own, as a DaemonSet pod is: strict mode trusts the
        // connects made from the agent's cgroup, so it must not be the test runner's.
        let agent_cgroup = self.cgroup_root.join(format!("agent-{log_name}"));
        std::fs::create_dir_all(&agent_cgroup)?;
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(agent_cgroup.clone());
        let procs = OpenOptions::new()
            .write(true)
            .open(agent_cgroup.join("cgroup.procs"))?;
        let mut command = Command::new(agent_binary()?);
        command
            .arg("--config")
            .arg(&config)
            .env(
                "NODEMESH_LOG",
                std::env::var("NODEMESH_LOG")
                    .unwrap_or_else(|_| "info,mesh_agent=debug,mesh_ebpf=debug".into()),
            )
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        // Each agent keeps its CA and state apart from the host's /var/lib/nodemesh.
        command.env("NODEMESH_STATE_DIR", self.state_dir(node));
        for (k, v) in extra_env {
            command.env(k, v);
        }
        let pid = self.spawn_in(&node.netns, Some(procs), &mut command)?;
        Ok(AgentHandle {
            pid,
            log,
            metrics: SocketAddr::from((node.agent_ip, 15020)),
            health: SocketAddr::from((node.agent_ip, 15021)),
            netns: node.netns.clone(),
        })
    }

    /// The agent state directory of `node` (holds a generated mesh CA as ca.crt / ca.key).
    pub fn state_dir(&self, node: &Node) -> PathBuf {
        self.workdir.join(format!("{}-state", node.instance))
    }

    /// The `identity:` fields (indented, without the key) that make another node's agent use
    /// the mesh CA `node`'s agent generated, so both agents trust each other.
    pub fn shared_ca_fields(&self, node: &Node) -> String {
        let state = self.state_dir(node);
        format!(
            "  ca_cert: {}\n  ca_key: {}\n",
            state.join("ca.crt").display(),
            state.join("ca.key").display()
        )
    }

    /// Waits until the agent answers /ready with 200, or fails with its log.
    pub fn wait_ready(&self, agent: &AgentHandle) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = self.in_netns(&agent.netns, || crate::http::get(agent.health, "/ready"));
            if matches!(ready, Ok((200, _))) {
                return Ok(());
            }
            if self.has_exited(agent.pid) || Instant::now() > deadline {
                bail!(
                    "agent did not become ready ({ready:?}); log:\n{}",
                    agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn has_exited(&self, pid: u32) -> bool {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        children
            .iter_mut()
            .find(|c| c.id() == pid)
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// Polls `check` every 50 ms until it returns true, failing after `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !check()? {
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The agent's count of config reloads with `result` ("ok" or "error").
    pub fn reloads(&self, agent: &AgentHandle, result: &str) -> Result<u64> {
        let m = self.metrics(agent)?;
        crate::http::metric(&m, "nodemesh_config_reloads_total", &[("result", result)])
            .context("nodemesh_config_reloads_total missing")
    }

    /// Path of the config file `start_agent` wrote for `node` (rewrite it to trigger a reload).
    pub fn config_path(&self, node: &Node) -> PathBuf {
        self.workdir.join(format!("{}.yaml", node.instance))
    }

    /// Scrapes the agent's /metrics from inside its node.
    pub fn metrics(&self, agent: &AgentHandle) -> Result<String> {
        let (status, body) =
            self.in_netns(&agent.netns, || crate::http::get(agent.metrics, "/metrics"))?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body)
    }
}

impl AgentHandle {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Topology {
    /// Waits until this agent itself logged "agent ready" (a /ready probe could be answered by
    /// another agent sharing the ports through SO_REUSEPORT).
    pub fn wait_logged_ready(&self, agent: &AgentHandle) -> Result<()> {
        self.wait_for("agent ready in its log", Duration::from_secs(20), || {
            if self.has_exited(agent.pid) {
                bail!("agent exited; log:\n{}", agent.log_text());
            }
            Ok(agent.log_text().contains("agent ready"))
        })
    }

    /// Gives a pod an IPv6 address `fd00:<n>:<p>::2/64` (the node side gets `::1`) and returns it.
    pub fn add_ipv6(&self, pod: &Pod) -> Result<std::net::Ipv6Addr> {
        let [_, n, p, _] = pod.ip.octets();
        let node_ns = format!("{}-n{n}", self.prefix);
        let host_if = last15(&format!("{}n{n}p{p}", self.prefix));
        let pod_ip: std::net::Ipv6Addr = format!("fd00:{n}:{p}::2").parse()?;
        ip(&[
            "-n",
            &node_ns,
            "-6",
            "addr",
            "add",
            &format!("fd00:{n}:{p}::1/64"),
            "dev",
            &host_if,
            "nodad",
        ])?;
        ip(&[
            "-n",
            &pod.netns,
            "-6",
            "addr",
            "add",
            &format!("{pod_ip}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        Ok(pod_ip)
    }

    /// Runs `meshprobe` with `args` in a node's netns (a host process, outside any pod and the
    /// agent's cgroup) and parses its one JSON attempt line.
    pub fn probe_from_node(&self, node: &Node, args: &[&str]) -> Result<Attempt> {
        let out_path = self.workdir.join(format!(
            "node-probe-{}",
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let mut command = Command::new(probe_binary()?);
        command
            .args(args)
            .stdout(File::create(&out_path)?)
            .stderr(Stdio::inherit());
        let pid = self.spawn_in_node(node, &mut command)?;
        let status = self.wait(pid, Duration::from_secs(30))?;
        let out = std::fs::read_to_string(&out_path)?;
        if !status.success() {
            bail!(
                "meshprobe {args:?} in node {} exited with {status}: {out}",
                node.netns
            );
        }
        serde_json::from_str(out.trim()).with_context(|| format!("bad probe line {out:?}"))
    }

    /// kube-proxy style service path inside a pod's netns: nftables DNAT of `vip` (ip:port) to
    /// `target`. A connect that escapes capture then really reaches the target, which makes a
    /// bypass measurable instead of failing on an unroutable VIP.
    pub fn dnat_in_pod(&self, pod: &Pod, vip: &str, target: &str) -> Result<()> {
        let (ip, port) = vip.split_once(':').context("vip must be ip:port")?;
        let rules = format!(
            "table ip nodemesh_test_nat {{\n chain output {{\n  type nat hook output priority -100;\n  ip daddr {ip} tcp dport {port} dnat to {target}\n  ip daddr {ip} udp dport {port} dnat to {target}\n }}\n}}\n"
        );
        let path = self.workdir.join(format!("dnat-{}.nft", pod.name));
        std::fs::write(&path, rules)?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &pod.netns,
                "nft",
                "-f",
                &path.to_string_lossy(),
            ],
        )?;
        Ok(())
    }
}

impl Node {
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }
}

fn last15(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    chars[chars.len().saturating_sub(15)..].iter().collect()
}

/// The agent binary: NODEMESH_AGENT_BIN, or `mesh-agent` in the same target dir as this test.
pub fn agent_binary() -> Result<PathBuf> {
    if let Ok(path) = std::env::var("NODEMESH_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let candidates = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("mesh-agent"))
        .collect::<Vec<_>>();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| format!("mesh-agent binary not found in {candidates:?}; run `cargo build -p mesh-agent` or set NODEMESH_AGENT_BIN"))
}

impl Drop for Topology {
    fn drop(&mut self) {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        for child in children.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in self
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = std::fs::remove_dir(dir);
        }
        for node in &self.nodes {
            for pod in &node.pods {
                let _ = ip(&["netns", "del", &pod.netns]);
                let _ = std::fs::remove_dir(&pod.cgroup_abs);
            }
            let _ = ip(&["netns", "del", &node.netns]);
            // An agent killed with SIGKILL cannot unpin its maps; do it for it.
            let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf/nodemesh").join(&node.instance));
        }
        let _ = std::fs::remove_dir(&self.cgroup_root);
        if std::env::var_os("NODEMESH_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.workdir);
        }
    }
}

impl Node {
    /// The node/proxy part of an agent config for this node; `body` adds services, workloads, policy.
    pub fn agent_config(&self, body: &str) -> String {
        format!(
            "node:\n  name: node-{}\n  instance: {}\n  agent_ip: {}\nproxy:\n  reload_poll: 200ms\n{body}",
            self.index, self.instance, self.agent_ip
        )
    }

    /// [`Node::agent_config`] with `proxy.transparent: false`: every connect to a pod comes
    /// from the agent address, which tests then use as proof that a call went through the agent.
    pub fn agent_config_from_agent_address(&self, body: &str) -> String {
        self.agent_config(body)
            .replacen("proxy:\n", "proxy:\n  transparent: false\n", 1)
    }
}

impl Pod {
    /// A `workloads:` list entry for this pod.
    pub fn workload_yaml(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "  - name: {}\n    namespace: {namespace}\n    service_account: {service_account}\n    cgroup: {}\n",
            self.name,
            self.cgroup_rel.display()
        )
    }

    /// A `workloads:` list entry that sets `strict` explicitly.
    pub fn workload_yaml_strict(
        &self,
        namespace: &str,
        service_account: &str,
        strict: bool,
    ) -> String {
        format!(
            "{}    strict: {strict}\n",
            self.workload_yaml(namespace, service_account)
        )
    }
}

impl Topology {
    /// Starts `meshprobe serve` in a pod and waits until it listens.
    pub fn start_echo_server(&self, pod: &Pod, port: u16, name: &str) -> Result<PathBuf> {
        let record = self.workdir.join(format!("record-{}-{port}", pod.name));
        let out = self.workdir.join(format!("serve-{}-{port}.out", pod.name));
        let mut command = Command::new(probe_binary()?);
        command
            .args(["serve", &port.to_string(), name])
            .arg(&record)
            .stdout(File::create(&out)?)
            .stderr(Stdio::inherit());
        self.spawn_in_pod(pod, &mut command)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("listening")
        {
            if Instant::now() > deadline {
                bail!("echo server in {} did not start", pod.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(record)
    }

    /// Starts `meshprobe udpserve` in a pod and waits until it listens.
    pub fn start_udp_echo_server(&self, pod: &Pod, port: u16, name: &str) -> Result<PathBuf> {
        let record = self.workdir.join(format!("udprecord-{}-{port}", pod.name));
        let out = self
            .workdir
            .join(format!("udpserve-{}-{port}.out", pod.name));
        let mut command = Command::new(probe_binary()?);
        command
            .args(["udpserve", &port.to_string(), name])
            .arg(&record)
            .stdout(File::create(&out)?)
            .stderr(Stdio::inherit());
        self.spawn_in_pod(pod, &mut command)?;
        self.wait_for("udp echo server", Duration::from_secs(10), || {
            Ok(std::fs::read_to_string(&out)
                .unwrap_or_default()
                .contains("listening"))
        })?;
        Ok(record)
    }

    /// One UDP datagram from a pod (`connect` or sendto), with its reply.
    pub fn udp_from(
        &self,
        pod: &Pod,
        target: &str,
        text: &str,
        connect: bool,
        timeout: Duration,
    ) -> Result<Attempt> {
        let probe = probe_binary()?;
        let mode = if connect { "connect" } else { "sendto" };
        let out = self.run_in_pod(
            pod,
            &probe.to_string_lossy(),
            &["udp", target, text, mode, &timeout.as_millis().to_string()],
        )?;
        serde_json::from_str(out.trim()).with_context(|| format!("bad probe line {out:?}"))
    }

    /// Runs `meshprobe connect` in a pod and returns one result per attempt.
    pub fn connect_from(
        &self,
        pod: &Pod,
        target: &str,
        text: &str,
        count: u32,
    ) -> Result<Vec<Attempt>> {
        self.connect_from_with_timeout(pod, target, text, count, Duration::from_secs(5))
    }

    /// Like [`Topology::connect_from`], giving up each connect and read after `timeout`
    /// (for attempts expected to fail by timing out).
    pub fn connect_from_with_timeout(
        &self,
        pod: &Pod,
        target: &str,
        text: &str,
        count: u32,
        timeout: Duration,
    ) -> Result<Vec<Attempt>> {
        let probe = probe_binary()?;
        let out = self.run_in_pod(
            pod,
            &probe.to_string_lossy(),
            &[
                "connect",
                target,
                text,
                &count.to_string(),
                &timeout.as_millis().to_string(),
            ],
        )?;
        out.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("bad probe line {l:?}")))
            .collect()
    }
}

/// One `meshprobe connect` attempt.
#[derive(Debug, serde::Deserialize)]
pub struct Attempt {
    pub ok: bool,
    pub reply: String,
    pub errno: Option<i32>,
    pub error: Option<String>,
    /// TCP: the address the socket connected to, as the kernel left it (the agent's, when
    /// captured).
    #[serde(default)]
    pub peer: Option<String>,
}

/// The meshprobe binary: NODEMESH_PROBE_BIN, or next to the agent binary.
pub fn probe_binary() -> Result<PathBuf> {
    if let Ok(path) = std::env::var("NODEMESH_PROBE_BIN") {
        return Ok(PathBuf::from(path));
    }
    let agent = agent_binary()?;
    let probe = agent.with_file_name("meshprobe");
    if probe.is_file() {
        Ok(probe)
    } else {
        bail!(
            "meshprobe not found at {}; run `cargo build -p mesh-tests`",
            probe.display()
        )
    }
}

/// What `meshprobe send` reports: payload bytes written and reply bytes read.
#[derive(Debug, serde::Deserialize)]
pub struct Sent {
    pub sent: u64,
    pub received: u64,
}

impl Topology {
    /// Runs `meshprobe send` in a pod: one connection carrying `bytes` bytes of payload.
    pub fn send_from(&self, pod: &Pod, target: &str, bytes: u64) -> Result<Sent> {
        let probe = probe_binary()?;
        let out = self.run_in_pod(
            pod,
            &probe.to_string_lossy(),
            &["send", target, &bytes.to_string()],
        )?;
        serde_json::from_str(out.trim()).with_context(|| format!("bad probe output {out:?}"))
    }
}

impl Topology {
    /// Runs a command in a node's namespace (outside any pod) to completion; returns its exit
    /// status, stdout and stderr (a failing command is not an error here).
    pub fn run_in_node(
        &self,
        node: &Node,
        program: &Path,
        args: &[&str],
    ) -> Result<(std::process::ExitStatus, String, String)> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let out_path = self.workdir.join(format!("out-{}-{n}", node.instance));
        let err_path = self.workdir.join(format!("err-{}-{n}", node.instance));
        let mut command = Command::new(program);
        command
            .args(args)
            .stdout(File::create(&out_path)?)
            .stderr(File::create(&err_path)?);
        let pid = self.spawn_in_node(node, &mut command)?;
        let status = self.wait(pid, Duration::from_secs(30))?;
        Ok((
            status,
            std::fs::read_to_string(&out_path)?,
            std::fs::read_to_string(&err_path)?,
        ))
    }

    /// Starts `meshprobe hold` in a pod: one connection exchanging `text` every 100 ms for
    /// `seconds`. Returns the pid (wait for it with [`Topology::wait`]).
    pub fn start_hold(&self, pod: &Pod, target: &str, text: &str, seconds: u32) -> Result<u32> {
        let mut command = Command::new(probe_binary()?);
        command
            .args(["hold", target, text, &seconds.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        self.spawn_in_pod(pod, &mut command)
    }
}
