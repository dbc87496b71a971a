//! Checks that catch configs which parse but make no sense for a node agent: listeners on one
//! port, services pointing at the agent's own ports, an agent address pods cannot reach, cgroup
//! paths that climb out of the cgroup root, and YAML nested deep enough to stall the parser.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Component;

use super::validate::short;
use super::{Config, ConfigError};

/// Deepest YAML nesting accepted (block indentation levels or flow brackets). Real configs stay
/// below 10; a parser fed 100,000 levels takes seconds, stalling a reload.
pub const MAX_NESTING: usize = 64;
/// Longest leading indentation accepted on a line (a block nesting bound that needs no parse).
pub const MAX_INDENT: usize = 256;

/// Rejects deeply nested YAML before it reaches the parser: counts flow brackets (outside
/// quotes), leading indentation and inline `- - -` sequence nesting, in one linear pass.
pub fn check_nesting(text: &str) -> Result<(), ConfigError> {
    let too_deep = |line: usize, what: &str| {
        Err(ConfigError::invalid(
            format!("line {line}"),
            format!("YAML nested too deeply ({what}); at most {MAX_NESTING} levels"),
        ))
    };
    let mut flow = 0usize;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        if indent > MAX_INDENT {
            return too_deep(n, "indentation");
        }
        let mut dashes = 0;
        let mut rest = line.trim_start();
        while let Some(r) = rest.strip_prefix("- ") {
            dashes += 1;
            rest = r.trim_start();
        }
        if dashes > MAX_NESTING {
            return too_deep(n, "sequences");
        }
        let (mut single, mut double) = (false, false);
        for c in line.chars() {
            match c {
                '#' if !single && !double => break,
                '\'' if !double => single = !single,
                '"' if !single => double = !double,
                '[' | '{' if !single && !double => {
                    flow += 1;
                    if flow > MAX_NESTING {
                        return too_deep(n, "brackets");
                    }
                }
                ']' | '}' if !single && !double => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

pub fn validate(config: &Config) -> Result<(), ConfigError> {
    check_agent_ip(config.node.agent_ip)?;
    check_outbound_ports(&config.listen)?;
    let listeners = listeners(config);
    for (i, l) in listeners.iter().enumerate() {
        for other in &listeners[..i] {
            if l.clashes(other) {
                return Err(ConfigError::invalid(
                    l.field,
                    format!(
                        "{} clashes with {} ({}): one port per listener",
                        l.describe(),
                        other.field,
                        other.describe()
                    ),
                ));
            }
        }
    }
    for (i, s) in config.services.iter().enumerate() {
        check_target(config, &listeners, &format!("services[{i}].vip"), s.vip)?;
        for (j, e) in s.endpoints.iter().enumerate() {
            check_target(
                config,
                &listeners,
                &format!("services[{i}].endpoints[{j}]"),
                e.address(),
            )?;
        }
    }
    for (i, w) in config.workloads.iter().enumerate() {
        if w.cgroup.components().any(|c| c == Component::ParentDir) {
            return Err(ConfigError::invalid(
                format!("workloads[{i}].cgroup"),
                format!(
                    "{} must not contain `..`: it would leave the cgroup root",
                    short(&w.cgroup.display().to_string())
                ),
            ));
        }
    }
    Ok(())
}

fn check_agent_ip(ip: Ipv4Addr) -> Result<(), ConfigError> {
    let problem = if ip.is_loopback() {
        "is a loopback address, which pods cannot reach"
    } else if ip.is_multicast() || ip.is_broadcast() {
        "is a multicast or broadcast address"
    } else {
        return Ok(());
    };
    Err(ConfigError::invalid(
        "node.agent_ip",
        format!("{ip} {problem}"),
    ))
}

fn check_outbound_ports(listen: &super::ListenConfig) -> Result<(), ConfigError> {
    let (first, count) = (listen.outbound.port(), listen.outbound_ports);
    let max = super::model::MAX_OUTBOUND_PORTS;
    if count == 0 || count > max {
        return Err(ConfigError::invalid(
            "listen.outbound_ports",
            format!("{count}: must be 1 to {max}"),
        ));
    }
    if first != 0 && u32::from(first) + u32::from(count) - 1 > u32::from(u16::MAX) {
        return Err(ConfigError::invalid(
            "listen.outbound_ports",
            format!("{count} ports from listen.outbound port {first} go past port 65535"),
        ));
    }
    Ok(())
}

/// A listener: `ports` consecutive ports from `addr`'s (only the outbound one has more than 1).
struct Listener {
    field: &'static str,
    addr: SocketAddr,
    ports: u16,
}

impl Listener {
    fn single(field: &'static str, addr: SocketAddr) -> Self {
        Self {
            field,
            addr,
            ports: 1,
        }
    }

    fn last_port(&self) -> u16 {
        self.addr.port().saturating_add(self.ports - 1)
    }

    fn covers(&self, port: u16) -> bool {
        (self.addr.port()..=self.last_port()).contains(&port)
    }

    /// Two listeners clash when their port ranges and addresses overlap (equal, or one is a
    /// wildcard). Port 0 asks the kernel for a free port each time, so it never clashes.
    fn clashes(&self, other: &Listener) -> bool {
        let (a, b) = (self.addr, other.addr);
        a.port() != 0
            && b.port() != 0
            && a.port() <= other.last_port()
            && b.port() <= self.last_port()
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    }

    fn describe(&self) -> String {
        match self.ports {
            1 => self.addr.to_string(),
            _ => format!("{}-{}", self.addr, self.last_port()),
        }
    }
}

fn listeners(config: &Config) -> Vec<Listener> {
    let l = &config.listen;
    vec![
        Listener {
            field: "listen.outbound",
            addr: l.outbound,
            ports: l.outbound_port_count(),
        },
        Listener::single("listen.metrics", l.metrics),
        Listener::single("listen.health", l.health),
        Listener::single("listen.hbone", l.hbone),
        Listener::single("listen.admin", l.admin),
    ]
}

/// A VIP or endpoint must not be loopback/multicast, nor one of the agent's own listeners (a
/// captured connect would loop into the agent, or reach its admin or metrics port).
fn check_target(
    config: &Config,
    listeners: &[Listener],
    field: &str,
    addr: SocketAddrV4,
) -> Result<(), ConfigError> {
    let ip = *addr.ip();
    if ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
        return Err(ConfigError::invalid(
            field,
            format!("{addr} is a loopback, multicast or broadcast address"),
        ));
    }
    for l in listeners {
        let agent_reachable = match l.addr.ip() {
            IpAddr::V4(v4) => v4 == ip || (v4.is_unspecified() && ip == config.node.agent_ip),
            IpAddr::V6(v6) => v6.is_unspecified() && ip == config.node.agent_ip,
        };
        if l.covers(addr.port()) && agent_reachable {
            return Err(ConfigError::invalid(
                field,
                format!("{addr} is the agent's own {} ({})", l.field, l.describe()),
            ));
        }
    }
    Ok(())
}
