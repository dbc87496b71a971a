//! The quickstart (scripts/quickstart.sh) as a user runs it: `up` builds pods and starts the agent,
//! an allowed call goes through the agent, a denied one is refused in the kernel, `down` removes
//! everything. Also checks every metric family the agent exports has a row in docs/REFERENCE.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mesh_tests::topology::{agent_binary, cgroup2_mount};

const NAME: &str = "nmqse2e";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/quickstart.sh")
}

fn quickstart(args: &[&str]) -> Output {
    let agent = agent_binary().expect("agent binary");
    Command::new(script())
        .args(args)
        .env("NODEMESH_AGENT_BIN", agent)
        .env("QUICKSTART_NAME", NAME)
        .env("QUICKSTART_DIR", format!("/tmp/{NAME}"))
        .output()
        .expect("running scripts/quickstart.sh")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Tears the quickstart down even when an assertion fails.
struct Down;
impl Drop for Down {
    fn drop(&mut self) {
        let _ = quickstart(&["down"]);
    }
}

fn metric_families(scrape: &str) -> Vec<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn quickstart_up_curl_and_down() {
    let _ = quickstart(&["down"]); // leftovers of an interrupted run
    let down = Down;
    let up = quickstart(&["up"]);
    assert!(up.status.success(), "up failed: {}", text(&up));
    let printed = String::from_utf8_lossy(&up.stdout);
    assert!(
        printed.contains("run client curl -s http://10.96.0.10/"),
        "{printed}"
    );

    let allowed = quickstart(&[
        "run",
        "client",
        "curl",
        "-s",
        "-m",
        "5",
        "http://10.96.0.10/",
    ]);
    assert!(allowed.status.success(), "allowed call: {}", text(&allowed));
    assert_eq!(
        String::from_utf8_lossy(&allowed.stdout),
        "hello from echo\n"
    );

    let denied = quickstart(&[
        "run",
        "blocked",
        "curl",
        "-sS",
        "-m",
        "5",
        "http://10.96.0.10/",
    ]);
    assert_eq!(
        denied.status.code(),
        Some(7),
        "denied call must fail to connect: {}",
        text(&denied)
    );

    let scrape = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{NAME}-node"),
            "curl",
            "-sf",
            "http://127.0.0.1:15020/metrics",
        ])
        .output()
        .expect("scraping metrics");
    assert!(scrape.status.success(), "{}", text(&scrape));
    let scrape = String::from_utf8_lossy(&scrape.stdout).into_owned();
    let families = metric_families(&scrape);
    assert!(!families.is_empty(), "no metric families in:\n{scrape}");
    let reference =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/REFERENCE.md"))
            .expect("docs/REFERENCE.md");
    let missing: Vec<&String> = families
        .iter()
        .filter(|f| !reference.contains(&format!("| `{f}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics without a row in docs/REFERENCE.md: {missing:?}"
    );

    let log = log_text();
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a log written to a file:\n{log}"
    );

    // A live edit: the reload says what triggered it and what changed, in one line.
    let config = format!("/tmp/{NAME}/config.yaml");
    let text = std::fs::read_to_string(&config).expect("config");
    let edited = text.replace(
        "    - { name: no-blocked-to-echo, from: default/blocked, to: echo }\n",
        "",
    );
    assert_ne!(text, edited, "the deny rule is in the written config");
    std::fs::write(&config, edited.replace("deny:\n", "deny: []\n")).expect("edit config");
    let line = wait_for_log_line("config reloaded")
        .unwrap_or_else(|| panic!("no reload logged:\n{}", log_text()));
    assert!(
        line.contains("trigger=file change") || line.contains("trigger=\"file change\""),
        "{line}"
    );
    assert!(line.contains("deny rules -no-blocked-to-echo"), "{line}");
    assert!(
        line.len() < 300,
        "reload line is not a one-line summary: {line}"
    );

    drop(down);
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns");
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(NAME),
        "netns left behind"
    );
    let cgroup = cgroup2_mount().expect("cgroup2").join(NAME);
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    assert!(
        !Path::new("/sys/fs/bpf/nodemesh").join(NAME).exists(),
        "pinned maps left behind"
    );
}

fn log_text() -> String {
    std::fs::read_to_string(format!("/tmp/{NAME}/agent.log")).unwrap_or_default()
}

fn wait_for_log_line(needle: &str) -> Option<String> {
    for _ in 0..100 {
        if let Some(line) = log_text().lines().find(|l| l.contains(needle)) {
            return Some(line.to_owned());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}
