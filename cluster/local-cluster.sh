#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine: a head node and one worker node, each its own set of
# Ray processes, on explicit ports, with token authentication on. Use it to try `ray job submit` and
# multi-node code paths (two raylets, objects moving between nodes) without a real cluster. Sized for
# a 2-core laptop: one CPU per node.
#
#   cluster/local-cluster.sh up     [--temp-dir DIR]  start it (a no-op if it is already up)
#   cluster/local-cluster.sh status [--temp-dir DIR]  is it up; nodes and resources
#   cluster/local-cluster.sh env    [--temp-dir DIR]  the exports a client needs (eval "$(... env)")
#   cluster/local-cluster.sh down   [--temp-dir DIR]  stop it and every process it started (idempotent)
#
# Nodes register as 127.0.0.1 and the dashboard (job API) listens on 127.0.0.1 only. Some Ray servers
# (GCS, raylets) still listen on all interfaces: the token is what keeps other machines out.
#
# Everything lives under DIR (default /tmp/cliplung-ray-$UID, or $CLIPLUNG_LOCAL_CLUSTER_DIR): the
# token (mode 600), the chosen ports, pid files, logs, and Ray's own temp dir DIR/ray. DIR is created
# private (mode 700); an existing DIR that is a symbolic link, belongs to someone else or is writable
# by group or others is refused (exit 2), and cluster.env is read as KEY=PORT lines, never run as
# shell code: /tmp is shared, and whoever made DIR first would control the token and the address
# clients send it to. Each node runs
# in its own session; `down` stops those sessions and anything else naming DIR/ray, so it never
# touches another Ray cluster on the machine (unlike `ray stop`, which stops all of them). Keep DIR
# short: Ray puts Unix sockets under it and socket paths are limited to about 100 characters.
#
# Environment: RAY (the ray executable; default: the repo's .venv/bin/ray, else ray on PATH),
# CLIPLUNG_RAY_BASE_PORT (first port of the 100-port block to use; default: a free block is searched
# for, and another one tried if a port is taken in the meantime).
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }

cmd=${1:-}
[[ $# -gt 0 ]] && shift
TEMP_DIR=${CLIPLUNG_LOCAL_CLUSTER_DIR:-/tmp/cliplung-ray-$(id -u)}
while [[ $# -gt 0 ]]; do
  case $1 in
    --temp-dir) TEMP_DIR=${2:?--temp-dir needs a directory}; shift 2 ;;
    --temp-dir=*) TEMP_DIR=${1#*=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "local-cluster.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
die() {
  local code=$1
  shift
  echo "local-cluster.sh: $*" >&2
  exit "$code"
}

# The state folder holds the token and the ports clients trust, so it must be ours alone.
secure_state_dir() {
  local dir=$1 parent owner mode
  parent=$(dirname -- "$dir")
  mkdir -p -- "$parent"
  # Whoever may rename entries in the parent could swap the folder for theirs (a sticky /tmp is fine).
  owner=$(stat -L -c %u -- "$parent") mode=$(stat -L -c %a -- "$parent")
  if [[ $owner != 0 && $owner != "$(id -u)" ]] || { ((8#$mode & 8#022)) && ! ((8#$mode & 8#1000)); }; then
    die 2 "$parent (uid $owner, mode $mode) lets others replace $dir; choose another --temp-dir"
  fi
  # Not `mkdir -p`: created with its final mode in one step, and an existing name is not followed.
  [[ -e $dir || -L $dir ]] || mkdir -m 700 -- "$dir" 2>/dev/null || [[ -d $dir ]] || die 2 "cannot create $dir"
  [[ -L $dir ]] && die 2 "$dir is a symbolic link; refusing to use it (remove it, or pass --temp-dir DIR)"
  [[ -d $dir ]] || die 2 "$dir exists and is not a directory"
  owner=$(stat -c %u -- "$dir") mode=$(stat -c %a -- "$dir")
  [[ $owner == "$(id -u)" ]] ||
    die 2 "$dir belongs to uid $owner, not to you (uid $(id -u)); refusing to use it (pass --temp-dir DIR)"
  if ((8#$mode & 8#022)); then
    die 2 "$dir is writable by group or others (mode $mode), so its token and ports cannot be trusted; remove it"
  fi
  chmod 700 -- "$dir"
}

# A trailing slash would make the symlink test below look through the link.
while [[ $TEMP_DIR == */ && $TEMP_DIR != / ]]; do TEMP_DIR=${TEMP_DIR%/}; done
secure_state_dir "$TEMP_DIR"
TEMP_DIR=$(cd "$TEMP_DIR" && pwd -P)
RAY_TMP=$TEMP_DIR/ray
TOKEN_FILE=$TEMP_DIR/auth_token
PORTS_FILE=$TEMP_DIR/cluster.env

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
if [[ -z ${RAY:-} ]]; then
  if [[ -x $repo_root/.venv/bin/ray ]]; then RAY=$repo_root/.venv/bin/ray; else RAY=$(command -v ray || true); fi
fi
[[ -n $RAY && -x $RAY ]] || { echo "local-cluster.sh: no ray executable (set RAY=/path/to/ray)" >&2; exit 1; }
PYTHON=$(dirname "$RAY")/python
[[ -x $PYTHON ]] || PYTHON=python3

# Offsets inside the 100-port block. Head and worker node run on the same IP, so every port
# a raylet and its agents open must differ between the two nodes.
OFF_GCS=0 OFF_DASHBOARD=1 OFF_CLIENT=2
OFF_HEAD=3   # +0 node manager, +1 object manager, +2 metrics, +3 agent http, +4 agent grpc, +5 runtime env agent
OFF_WORKER=9 # the same six for the worker node
OFF_AUTOSCALER_METRICS=15 OFF_DASHBOARD_METRICS=16 # fixed defaults (44217, 44227) would clash
OFF_HEAD_WORKERS=20 OFF_WORKER_WORKERS=60 WORKER_PORTS=40 BLOCK=100

# The client-side environment for this cluster (also what `env` prints).
client_env() {
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
  echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
}

PORT_KEYS=(BASE_PORT GCS_PORT DASHBOARD_PORT CLIENT_PORT HEAD_NODE_PORTS WORKER_NODE_PORTS
  HEAD_MIN_WORKER_PORT WORKER_MIN_WORKER_PORT AUTOSCALER_METRIC_PORT DASHBOARD_METRIC_PORT)

# Read cluster.env as data: KEY=PORT lines with known keys only. It is never sourced.
load_ports() {
  [[ -e $PORTS_FILE || -L $PORTS_FILE ]] || return 1
  [[ -f $PORTS_FILE && ! -L $PORTS_FILE ]] || die 2 "$PORTS_FILE is not a regular file; run: $0 down --temp-dir $TEMP_DIR"
  local line n=0 key value seen=" "
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    [[ -z $line ]] && continue
    [[ $line =~ ^([A-Z_]+)=([0-9]{1,5})$ ]] ||
      die 2 "$PORTS_FILE line $n: expected KEY=PORT, got $(printf '%q' "$line"); run: $0 down --temp-dir $TEMP_DIR"
    key=${BASH_REMATCH[1]} value=$((10#${BASH_REMATCH[2]}))
    [[ " ${PORT_KEYS[*]} " == *" $key "* ]] || die 2 "$PORTS_FILE line $n: unknown key $key; run: $0 down --temp-dir $TEMP_DIR"
    ((value >= 1 && value <= 65535)) || die 2 "$PORTS_FILE line $n: $key=$value is not a port; run: $0 down --temp-dir $TEMP_DIR"
    printf -v "$key" '%s' "$value"
    seen+="$key "
  done <"$PORTS_FILE"
  for key in "${PORT_KEYS[@]}"; do
    [[ $seen == *" $key "* ]] || die 2 "$PORTS_FILE: $key is missing; run: $0 down --temp-dir $TEMP_DIR"
  done
}

alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
pid_of() {
  local pid=
  if [[ -f $TEMP_DIR/$1.pid ]]; then pid=$(<"$TEMP_DIR/$1.pid"); fi
  if [[ $pid =~ ^[0-9]+$ ]]; then echo "$pid"; fi
}

# Does the command line of process $1 name this cluster's Ray temp dir?
names_our_dir() {
  local arg
  while IFS= read -r -d '' arg; do
    case $arg in
      "$RAY_TMP" | *"=$RAY_TMP" | *"$RAY_TMP"/*) return 0 ;;
    esac
  done 2>/dev/null <"/proc/$1/cmdline" || true
  return 1
}

# A recorded node pid that is still this cluster's `ray start` (not a recycled pid).
node_running() {
  local pid
  pid=$(pid_of "$1")
  alive "$pid" && names_our_dir "$pid"
}

# This cluster's processes: every member of the two node sessions (`setsid` made each
# `ray start --block` a session leader; Ray's renamed processes such as ray::IDLE or the dashboard
# modules keep the session but not the temp dir in their command line), plus any process whose
# command line names the temp dir (say, after a lost pid file). A recorded session is trusted only
# while its leader is gone or still ours: a session id is reused only together with its leader's pid.
cluster_pids() {
  local sids=" " name pid f
  for name in head worker; do
    pid=$(pid_of "$name")
    [[ -n $pid ]] || continue
    if ! alive "$pid" || names_our_dir "$pid"; then sids+="$pid "; fi
  done
  {
    [[ $sids == " " ]] || ps -eo pid=,sid= | awk -v s="$sids" 'index(s, " " $2 " ") {print $1}'
    for f in /proc/[0-9]*; do
      pid=${f#/proc/}
      names_our_dir "$pid" && echo "$pid"
    done
  } | grep -vx -e "$$" -e "$BASHPID" | sort -un
}

# Free block of BLOCK ports on this machine: bind each one (on all interfaces) and release it.
find_port_block() {
  "$PYTHON" - "$BLOCK" "${CLIPLUNG_RAY_BASE_PORT:-}" <<'EOF'
import random
import socket
import sys

size, fixed = int(sys.argv[1]), sys.argv[2]

def free(base):
    for port in range(base, base + size):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True

candidates = [int(fixed)] if fixed else [random.randrange(20000, 30000 - size) for _ in range(50)]
for base in candidates:
    if free(base):
        print(base)
        sys.exit(0)
sys.exit(1)
EOF
}

write_ports() {
  local base=$1
  cat >"$PORTS_FILE.tmp" <<EOF
BASE_PORT=$base
GCS_PORT=$((base + OFF_GCS))
DASHBOARD_PORT=$((base + OFF_DASHBOARD))
CLIENT_PORT=$((base + OFF_CLIENT))
HEAD_NODE_PORTS=$((base + OFF_HEAD))
WORKER_NODE_PORTS=$((base + OFF_WORKER))
HEAD_MIN_WORKER_PORT=$((base + OFF_HEAD_WORKERS))
WORKER_MIN_WORKER_PORT=$((base + OFF_WORKER_WORKERS))
AUTOSCALER_METRIC_PORT=$((base + OFF_AUTOSCALER_METRICS))
DASHBOARD_METRIC_PORT=$((base + OFF_DASHBOARD_METRICS))
EOF
  mv -f "$PORTS_FILE.tmp" "$PORTS_FILE"
}

# ray start flags for the per-node ports, starting at $1; worker ports from $2.
node_port_flags() {
  local p=$1 w=$2
  echo "--node-manager-port $p --object-manager-port $((p + 1)) --metrics-export-port $((p + 2))" \
    "--dashboard-agent-listen-port $((p + 3)) --dashboard-agent-grpc-port $((p + 4))" \
    "--runtime-env-agent-port $((p + 5)) --min-worker-port $w --max-worker-port $((w + WORKER_PORTS - 1))"
}

# Start one node in its own session, detached from the caller's terminal, and record the
# `ray start --block` pid: that process tears its node down on SIGTERM. PATH starts with the ray
# executable's directory so that `python` in a job entry point is the Python that has Ray.
# RAY_ADDRESS names this cluster's GCS to every process the node starts: Ray's state API in a
# worker (Train V2's PlacementGroupCleaner asks it whether the run's controller still lives)
# otherwise takes the cluster from the default temp dir's ray_current_cluster, which a cluster
# with its own --temp-dir never writes; it names another or a dead cluster, and the cleaner hangs
# ("Timed out while waiting for GCS to become available") instead of watching the run.
# CLIPLUNG_NODE_TYPES={} declares that no autoscaler adds nodes: a run that cannot fit these two
# nodes fails at once (cliplung/cluster.py) instead of waiting forever.
start_node() {
  local name=$1
  shift
  PATH=$(dirname "$RAY"):$PATH RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE \
    RAY_ADDRESS=127.0.0.1:$GCS_PORT CLIPLUNG_NODE_TYPES='{}' \
    RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=5 \
    AUTOSCALER_METRIC_PORT=$AUTOSCALER_METRIC_PORT DASHBOARD_METRIC_PORT=$DASHBOARD_METRIC_PORT \
    setsid "$RAY" start --block --node-ip-address 127.0.0.1 --temp-dir "$RAY_TMP" \
    --num-cpus 1 --num-gpus 0 --object-store-memory 100000000 --disable-usage-stats \
    "$@" >"$TEMP_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$TEMP_DIR/$name.pid"
}

ray_status() {
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE "$RAY" status --address "127.0.0.1:$GCS_PORT" 2>&1
}

# Wait until `ray status` lists $1 active nodes, while the node processes stay alive.
wait_for_nodes() {
  local want=$1 deadline=$((SECONDS + ${CLIPLUNG_LOCAL_CLUSTER_TIMEOUT:-120})) out n
  while ((SECONDS < deadline)); do
    # Just started by us, so a live pid is ours (its command line is bash's until the exec).
    alive "$(pid_of head)" || return 1
    if ((want > 1)); then alive "$(pid_of worker)" || return 1; fi
    if out=$(ray_status); then
      n=$(awk '/^Active:/{a=1; next} /^(Pending|Recent failures):/{a=0} a && /node_/{c++} END{print c+0}' <<<"$out")
      ((n >= want)) && return 0
    fi
    sleep 2
  done
  return 1
}

stop_pids() {
  local sig=$1
  shift
  local pid
  for pid in "$@"; do kill "-$sig" "$pid" 2>/dev/null || true; done
}

wait_gone() {
  local timeout=$1
  shift
  local deadline=$((SECONDS + timeout)) pid left
  while ((SECONDS < deadline)); do
    left=0
    for pid in "$@"; do alive "$pid" && left=1; done
    ((left == 0)) && return 0
    sleep 0.5
  done
  return 1
}

do_down() {
  local quiet=${1:-}
  local name pid pids
  # Worker node first, then the head: each `ray start --block` stops its own node on SIGTERM.
  for name in worker head; do
    if node_running "$name"; then
      pid=$(pid_of "$name")
      kill -TERM "$pid" 2>/dev/null || true
      wait_gone 30 "$pid" || true
    fi
  done
  # Then anything of this cluster still running (workers mid-exit, a node whose parent was killed).
  mapfile -t pids < <(cluster_pids)
  if ((${#pids[@]})); then
    stop_pids TERM "${pids[@]}"
    wait_gone 10 "${pids[@]}" || true
    mapfile -t pids < <(cluster_pids)
    if ((${#pids[@]})); then
      stop_pids KILL "${pids[@]}"
      wait_gone 5 "${pids[@]}" || true
    fi
  fi
  mapfile -t pids < <(cluster_pids)
  rm -f "$TEMP_DIR/head.pid" "$TEMP_DIR/worker.pid" "$PORTS_FILE" "$PORTS_FILE.tmp" "$TOKEN_FILE"
  if ((${#pids[@]})); then
    echo "local-cluster.sh: processes still running after down: ${pids[*]}" >&2
    return 1
  fi
  [[ -n $quiet ]] || echo "local Ray cluster in $TEMP_DIR is down"
}

print_usage_hint() {
  cat <<EOF
Local Ray cluster is up: head + 1 worker node on 127.0.0.1 (token authentication on).
  dashboard:  http://127.0.0.1:$DASHBOARD_PORT   (it asks for the token: cat $TOKEN_FILE)
  GCS:        127.0.0.1:$GCS_PORT
  logs:       $TEMP_DIR/{head,worker}.log and $RAY_TMP/session_latest/logs

Client environment (or: eval "\$($0 env --temp-dir $TEMP_DIR)"):
$(client_env | sed 's/^/  /')

Submit a job:
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE \\
    $RAY job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . \\
    --runtime-env jobs/runtime_env.yaml -- \\
    python jobs/train.py --config debug --data "\$PWD/stores/phantom" --storage "\$PWD/runs" --name local-debug

Stop it:
  $0 down --temp-dir $TEMP_DIR
EOF
}

do_up() {
  if load_ports && node_running head && node_running worker; then
    echo "already up"
    print_usage_hint
    return 0
  fi
  do_down quiet # leftovers of a crashed run would hold ports and sockets
  mkdir -p "$RAY_TMP"
  (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$TOKEN_FILE")

  local attempt base
  for attempt in 1 2 3; do
    base=$(find_port_block) || { echo "local-cluster.sh: no free block of $BLOCK ports" >&2; return 1; }
    write_ports "$base"
    load_ports
    # shellcheck disable=SC2046
    start_node head --head --port "$GCS_PORT" --dashboard-host 127.0.0.1 \
      --dashboard-port "$DASHBOARD_PORT" --ray-client-server-port "$CLIENT_PORT" --include-dashboard true \
      $(node_port_flags "$HEAD_NODE_PORTS" "$HEAD_MIN_WORKER_PORT")
    if wait_for_nodes 1; then
      # shellcheck disable=SC2046
      start_node worker --address "127.0.0.1:$GCS_PORT" \
        $(node_port_flags "$WORKER_NODE_PORTS" "$WORKER_MIN_WORKER_PORT")
      if wait_for_nodes 2; then
        print_usage_hint
        return 0
      fi
    fi
    echo "local-cluster.sh: attempt $attempt failed (ports from $base); last log lines:" >&2
    tail -n 15 "$TEMP_DIR/head.log" "$TEMP_DIR/worker.log" >&2 2>/dev/null || true
    # Keep the token for the next attempt; do_down removes it, so save and restore it.
    local token
    token=$(cat "$TOKEN_FILE")
    do_down quiet || true
    (umask 077 && echo "$token" >"$TOKEN_FILE")
    [[ -n ${CLIPLUNG_RAY_BASE_PORT:-} ]] && break # a fixed port block cannot get better by retrying
  done
  rm -f "$TOKEN_FILE"
  return 1
}

do_status() {
  if ! load_ports || ! node_running head; then
    echo "down (no head node running for $TEMP_DIR)"
    return 3
  fi
  echo "head node:   pid $(pid_of head)"
  if node_running worker; then echo "worker node: pid $(pid_of worker)"; else echo "worker node: not running"; fi
  echo "dashboard:   http://127.0.0.1:$DASHBOARD_PORT"
  ray_status
}

case $cmd in
  up) do_up ;;
  down) do_down ;;
  status) do_status ;;
  env)
    load_ports || { echo "local-cluster.sh: no cluster in $TEMP_DIR (run up first)" >&2; exit 3; }
    client_env
    ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
