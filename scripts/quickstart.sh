#!/usr/bin/env bash
# nodemesh quickstart on one real Linux machine (root, cgroup v2, kernel BTF), isolated from the
# host's own network: a "node" network namespace runs the agent, three "pods" (network namespace +
# cgroup v2 directory each) hang off it with veth pairs.
#
#   scripts/quickstart.sh up          create pods, write the config, start the agent, print what to try
#   scripts/quickstart.sh run POD CMD run CMD inside POD (its network namespace AND its cgroup)
#   scripts/quickstart.sh down        stop the agent and remove everything `up` created
#
# Environment: NODEMESH_AGENT_BIN (agent binary; default target/release/mesh-agent, then PATH),
# QUICKSTART_NAME (prefix of every name it creates; default nmqs), QUICKSTART_DIR (config, logs,
# state; default /tmp/<name>).
set -euo pipefail

NAME=${QUICKSTART_NAME:-nmqs}
DIR=${QUICKSTART_DIR:-/tmp/$NAME}
NODE_NS=$NAME-node
AGENT_IP=10.200.255.1
VIP=10.96.0.10
ECHO_PORT=8080
PODS=(client echo blocked)
ROOT=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "quickstart: $*" >&2; exit 1; }

# The cgroup v2 mount: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones.
cgroup2_mount() {
  awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts
}

agent_bin() {
  if [[ -n ${NODEMESH_AGENT_BIN:-} ]]; then echo "$NODEMESH_AGENT_BIN"
  elif [[ -x $ROOT/target/release/mesh-agent ]]; then echo "$ROOT/target/release/mesh-agent"
  elif command -v mesh-agent >/dev/null; then command -v mesh-agent
  else die "no agent binary: build it (cargo xtask quickstart does) or set NODEMESH_AGENT_BIN"
  fi
}

pod_index() {
  local i
  for i in "${!PODS[@]}"; do [[ ${PODS[$i]} == "$1" ]] && { echo $((i + 1)); return; }; done
  die "unknown pod $1 (pods: ${PODS[*]})"
}

# Runs a command in a pod: enter its network namespace, move the shell into its cgroup, exec.
# (nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup v2 mount from the agent.)
run_in_pod() {
  local pod=$1; shift
  pod_index "$pod" >/dev/null
  local cg; cg="$(cgroup2_mount)/$NAME/$pod"
  nsenter --net="/run/netns/$NAME-$pod" sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg" "$@"
}

up() {
  [[ $(id -u) == 0 ]] || die "run as root (network namespaces, cgroups and eBPF need it)"
  local cg2; cg2=$(cgroup2_mount)
  [[ -n $cg2 ]] || die "no cgroup2 mount in /proc/self/mounts"
  [[ -e /run/netns/$NODE_NS ]] && die "$NODE_NS exists: run '$0 down' first"
  local agent; agent=$(agent_bin)
  command -v python3 >/dev/null || die "python3 is needed for the example echo server"
  mkdir -p "$DIR/state" "$DIR/www"
  echo "hello from echo" > "$DIR/www/index.html"

  ip netns add "$NODE_NS"
  ip -n "$NODE_NS" link set lo up
  # The agent's address is local to the agent (on the node's loopback); pods route to it via the node.
  ip -n "$NODE_NS" addr add "$AGENT_IP/32" dev lo
  nsenter --net="/run/netns/$NODE_NS" sysctl -qw net.ipv4.ip_forward=1
  mkdir -p "$cg2/$NAME"
  local pod p
  for pod in "${PODS[@]}"; do
    p=$(pod_index "$pod")
    ip netns add "$NAME-$pod"
    ip link add "$NAME-v$p" netns "$NODE_NS" type veth peer name eth0 netns "$NAME-$pod"
    ip -n "$NODE_NS" addr add "10.200.$p.1/24" dev "$NAME-v$p"
    ip -n "$NODE_NS" link set "$NAME-v$p" up
    ip -n "$NAME-$pod" link set lo up
    ip -n "$NAME-$pod" addr add "10.200.$p.2/24" dev eth0
    ip -n "$NAME-$pod" link set eth0 up
    ip -n "$NAME-$pod" route add default via "10.200.$p.1"
    mkdir -p "$cg2/$NAME/$pod"
  done
  local echo_ip; echo_ip="10.200.$(pod_index echo).2"

  cat > "$DIR/config.yaml" <<YAML
# Written by scripts/quickstart.sh. Workload cgroups are relative to the cgroup v2 mount ($cg2).
node:
  name: $NAME-node
  instance: $NAME
  agent_ip: $AGENT_IP
identity:
  state_dir: $DIR/state
services:
  - name: echo
    vip: $VIP:80
    endpoints: [$echo_ip:$ECHO_PORT]
workloads:
  - { name: client, service_account: client, cgroup: $NAME/client }
  - { name: echo, service_account: echo, cgroup: $NAME/echo }
  - { name: blocked, service_account: blocked, cgroup: $NAME/blocked }
policy:
  deny:
    - { name: no-blocked-to-echo, from: default/blocked, to: echo }
authorization:
  - name: echo-callers
    service: echo
    default: deny
    allow:
      - from_service: client
YAML

  # Validated where it will run: cgroups exist, agent_ip is local to the node namespace.
  nsenter --net="/run/netns/$NODE_NS" "$agent" --config "$DIR/config.yaml" --check >/dev/null
  # Background processes get no fd of ours, so whoever reads our output sees it end.
  nsenter --net="/run/netns/$NAME-echo" sh -c 'echo $$ > "$0/cgroup.procs" && cd "$1" && shift && exec "$@"' \
    "$cg2/$NAME/echo" "$DIR/www" python3 -m http.server "$ECHO_PORT" --bind "$echo_ip" \
    </dev/null >"$DIR/echo.log" 2>&1 &
  echo $! >"$DIR/echo.pid"
  local i
  for i in $(seq 100); do
    nsenter --net="/run/netns/$NAME-echo" curl -sf -o /dev/null "http://$echo_ip:$ECHO_PORT/" && break
    sleep 0.1
  done
  [[ $i -lt 100 ]] || die "the echo server did not start; see $DIR/echo.log"
  nsenter --net="/run/netns/$NODE_NS" "$agent" --config "$DIR/config.yaml" --log-format text \
    </dev/null >"$DIR/agent.log" 2>&1 &
  echo $! >"$DIR/agent.pid"
  for i in $(seq 100); do
    nsenter --net="/run/netns/$NODE_NS" curl -sf -o /dev/null "http://127.0.0.1:15021/ready" && break
    kill -0 "$(cat "$DIR/agent.pid")" 2>/dev/null || { cat "$DIR/agent.log" >&2; die "the agent exited"; }
    sleep 0.1
  done
  [[ $i -lt 100 ]] || die "the agent did not become ready; see $DIR/agent.log"

  cat <<TEXT
nodemesh quickstart is up (agent log: $DIR/agent.log, config: $DIR/config.yaml).

Allowed: client -> echo through the agent
  $0 run client curl -s http://$VIP/
Refused in the kernel (policy.deny): connect() fails with EPERM
  $0 run blocked curl -sS http://$VIP/
Metrics and admin (from the node namespace)
  nsenter --net=/run/netns/$NODE_NS curl -s http://127.0.0.1:15020/metrics
  nsenter --net=/run/netns/$NODE_NS curl -s http://127.0.0.1:15000/workloads
Edit $DIR/config.yaml to change policy (reloaded live), then
  $0 down
TEXT
}

stop_pid() {
  local file=$1
  [[ -f $file ]] || return 0
  local pid; pid=$(cat "$file")
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  stop_pid "$DIR/agent.pid"
  # Stopping the agent keeps its kernel programs and maps in force (fail closed); this removes them.
  if [[ -f $DIR/config.yaml ]]; then
    "$(agent_bin)" --uninstall --config "$DIR/config.yaml" >/dev/null || true
  fi
  stop_pid "$DIR/echo.pid"
  local cg2; cg2=$(cgroup2_mount)
  # An agent started from the root cgroup moved itself into a cgroup of its own.
  [[ -d $cg2/nodemesh-agent.$NAME ]] && rmdir "$cg2/nodemesh-agent.$NAME" 2>/dev/null || true
  local pod
  for pod in "${PODS[@]}"; do
    if [[ -f $cg2/$NAME/$pod/cgroup.procs ]]; then
      # Anything still running in the pod (e.g. a curl left behind) goes with it.
      xargs -r kill -KILL <"$cg2/$NAME/$pod/cgroup.procs" 2>/dev/null || true
      for _ in $(seq 50); do rmdir "$cg2/$NAME/$pod" 2>/dev/null && break; sleep 0.1; done
    fi
    ip netns del "$NAME-$pod" 2>/dev/null || true
  done
  [[ -d $cg2/$NAME ]] && rmdir "$cg2/$NAME"
  ip netns del "$NODE_NS" 2>/dev/null || true
  rm -rf "$DIR"
  echo "nodemesh quickstart removed"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  run) shift; [[ $# -ge 2 ]] || die "usage: $0 run POD CMD..."; run_in_pod "$@" ;;
  *) echo "usage: $0 up | run POD CMD... | down" >&2; exit 2 ;;
esac
