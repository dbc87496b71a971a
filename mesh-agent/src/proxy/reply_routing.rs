//! Reply routing for transparent upstream connections (`proxy.transparent`): the agent connects
//! to a pod from the caller's address, so the pod answers that address, which the node would
//! route to the caller (another pod or node). Here, in the node's network namespace:
//! - nftables: packets of sockets carrying [`Marks::socket`] mark their conntrack entry; replies
//!   of such a connection get [`Marks::reply`] in prerouting;
//! - policy routing: packets with the reply mark look up a table whose one route delivers
//!   everything locally, so the reply reaches the agent's socket (bound with IP_TRANSPARENT).
//!
//! Names, marks and the table id derive from `node.instance`, so two agents never collide. Set
//! up idempotently at start, left in place on exit (a restarted agent's connections keep
//! working), removed by `--uninstall`. Uses the `nft` (nftables) and `ip` (iproute2) commands.

use std::io::Write;
use std::process::{Command, Stdio};

use thiserror::Error;

/// Priority of the policy-routing rule: before the main table (32766).
const RULE_PRIORITY: &str = "100";

#[derive(Debug, Error)]
pub enum ReplyRoutingError {
    #[error(
        "proxy.transparent needs the `{program}` command ({package}) to route pod replies back to the agent: {source}; install it or set proxy.transparent: false"
    )]
    Missing {
        program: &'static str,
        package: &'static str,
        source: std::io::Error,
    },
    #[error("proxy.transparent: `{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// The marks, routing table and nftables table of one agent instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    /// SO_MARK of the agent's transparent upstream sockets.
    pub socket: u32,
    /// Mark of their replies, which policy routing delivers locally.
    pub reply: u32,
    /// Routing table holding the local-delivery route.
    pub table: u32,
}

/// The nftables table (`ip` family) of one instance.
fn nft_table(instance: &str) -> String {
    format!("nodemesh-{instance}")
}

impl Marks {
    pub fn for_instance(instance: &str) -> Self {
        // FNV-1a: stable across builds, unlike std's hasher.
        let hash = instance.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        let slot = hash & 0xfff;
        Self {
            socket: 0x4e4d_0000 | slot,
            reply: 0x4e4e_0000 | slot,
            table: 0x4e4d_0000 | slot,
        }
    }

    fn ruleset(&self, nft_table: &str) -> String {
        let Self { socket, reply, .. } = self;
        // `table` then `delete table` then the full table, in one transaction: idempotent and
        // atomic (no moment without the rules).
        format!(
            "table ip {nft_table}\ndelete table ip {nft_table}\ntable ip {nft_table} {{\n\
             \tchain output {{\n\t\ttype route hook output priority mangle; policy accept;\n\
             \t\tmeta mark {socket:#x} ct mark set {reply:#x}\n\t}}\n\
             \tchain prerouting {{\n\t\ttype filter hook prerouting priority mangle; policy accept;\n\
             \t\tct direction reply ct mark {reply:#x} meta mark set ct mark\n\t}}\n}}\n"
        )
    }
}

/// Installs (or re-installs) the rules and routes of agent instance `instance`.
pub fn install(instance: &str) -> Result<(), ReplyRoutingError> {
    let marks = &Marks::for_instance(instance);
    nft_script(&marks.ruleset(&nft_table(instance)))?;
    let table = marks.table.to_string();
    ip(&[
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &table,
    ])?;
    // Never deleted and re-added: connections of a running (draining) agent need it throughout.
    let mark = format!("{:#x}", marks.reply);
    match ip(&[
        "rule",
        "add",
        "fwmark",
        &mark,
        "lookup",
        &table,
        "priority",
        RULE_PRIORITY,
    ]) {
        Err(ReplyRoutingError::Failed { stderr, .. }) if stderr.contains("File exists") => Ok(()),
        other => other,
    }
}

/// Removes what [`install`] set up; absent pieces are fine.
pub fn uninstall(instance: &str) -> Result<(), ReplyRoutingError> {
    let marks = &Marks::for_instance(instance);
    remove_rules(marks);
    let table = marks.table.to_string();
    let _ = ip(&["route", "flush", "table", &table]);
    let script = format!("delete table ip {}\n", nft_table(instance));
    match nft_script(&script) {
        Err(ReplyRoutingError::Failed { stderr, .. }) if stderr.contains("No such file") => Ok(()),
        other => other,
    }
}

/// Deletes every copy of this instance's rule (an earlier run may have left one).
fn remove_rules(marks: &Marks) {
    let (mark, table) = (format!("{:#x}", marks.reply), marks.table.to_string());
    // Bounded: each successful delete removes one rule.
    for _ in 0..16 {
        if ip(&["rule", "del", "fwmark", &mark, "lookup", &table]).is_err() {
            break;
        }
    }
}

fn nft_script(script: &str) -> Result<(), ReplyRoutingError> {
    let missing = |source| ReplyRoutingError::Missing {
        program: "nft",
        package: "nftables",
        source,
    };
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(missing)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(missing)?;
    }
    let out = child.wait_with_output().map_err(missing)?;
    check("nft -f -", out)
}

fn ip(args: &[&str]) -> Result<(), ReplyRoutingError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ReplyRoutingError::Missing {
            program: "ip",
            package: "iproute2",
            source,
        })?;
    check(&format!("ip {}", args.join(" ")), out)
}

fn check(command: &str, out: std::process::Output) -> Result<(), ReplyRoutingError> {
    if out.status.success() {
        Ok(())
    } else {
        Err(ReplyRoutingError::Failed {
            command: command.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Marks;

    #[test]
    fn instances_get_distinct_marks_and_names() {
        let (a, b) = (Marks::for_instance("node-1"), Marks::for_instance("node-2"));
        assert_ne!(a.socket, b.socket);
        assert_ne!(a.reply, b.reply);
        assert_ne!(a.table, b.table);
        assert_ne!(super::nft_table("node-1"), super::nft_table("node-2"));
        // The socket mark must not itself select the local-delivery table.
        assert_ne!(a.socket, a.reply);
        assert_eq!(a, Marks::for_instance("node-1"));
    }
}
