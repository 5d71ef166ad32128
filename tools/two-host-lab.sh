#!/bin/bash
# The two-host lab: two network namespaces ("hosts" a and b) joined by a
# veth pair, an ivshmem server handing both an ntb window (an emulated
# PCIe link), and one devd per namespace, each with its own control socket
# and config, peers of each other.
#
#   tools/two-host-lab.sh up DIR [BIN]   set it up; state and logs in DIR
#   tools/two-host-lab.sh down DIR       tear it down (whatever is left)
#   tools/two-host-lab.sh restart DIR a|b   start host a's or b's devd again
#                                        (after it was killed)
#   tools/two-host-lab.sh exec DIR a|b CMD...   run CMD on host a or b,
#                                        SSOCK_DEVD_SOCKET set to its devd
#
# BIN is where devd and ssock-ivshmem-server are (default: target/release
# beside this script). Needs root (namespaces) and iproute2. Addresses come
# from 10.77.0.0/16 (a per-lab /24 from DIR's name), only inside the
# namespaces: host a is .1, host b is .2; devd's peer port is 7455.
# With SSOCK_LAB_PIN=1 (tools/perf-report.sh sets it) each host's devd
# runs on a CPU of its own (a on CPU 0, b on CPU 1) when there are two or
# more, as two machines' engines would: left to the scheduler, an engine
# that lands on the other host's CPU halves streaming and doubles latency
# for that connection. (ssock-bench --two-hosts pins its client on CPU 0,
# its server on CPU 1.) The tests leave them to the scheduler: there
# every process of both hosts may use either CPU. SSOCK_LAB_FAIL_FORWARD_MS
# sets both devds' fail_forward_ms (docs/config.md; default 3000).
# SSOCK_LAB_LINKS=N (1 to 8, default 1) joins the hosts by N ntb links,
# each a window of its own from its own ivshmem server (link 0's socket
# is DIR/ivshmem.sock, link i's DIR/ivshmem$i.sock);
# SSOCK_LAB_LINK_POLICY=spread deals connections over them in turn
# (docs/config.md, link_policy; default active-backup). SSOCK_LAB_WINDOW
# is each window's size in bytes (default 8 MiB; each devd's inbox is
# half of it), as a device's BAR size would set it. SSOCK_LAB_RUN_AS=USER
# has both devds become USER with no capabilities once their windows are
# open (docs/config.md, run_as).
set -euo pipefail

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n '2,33p' "$0" >&2; exit 2; }

# The lab's /24 and namespace names start from a number made of DIR.
tag() { printf '%s' "$(realpath -m "$dir")" | cksum | awk '{print $1 % 250 + 1}'; }

# Starts host $1's devd (as `up` set it up), its log appended to; $2 is
# where devd is (`up` says; `restart` reads what `up` wrote down).
start_devd() {
  local h=$1 bin=${2:-} ns pin
  [ -n "$bin" ] || bin=$(cat "$dir/bin")
  # (Once, in CI, a start found this file empty right after `up` wrote
  # it; cause not known: say what the directory holds if it happens.)
  [ -n "$bin" ] || { echo "two-host-lab: $dir/bin is empty" >&2; ls -la "$dir" >&2; exit 1; }
  ns=$(cat "$dir/$h/ns"); read -r -a pin < "$dir/$h/pin" || true
  setsid ip netns exec "$ns" ${pin[@]+"${pin[@]}"} "$bin/devd" \
    --config "$dir/$h/devd.toml" --log info >> "$dir/$h/devd.log" 2>&1 < /dev/null &
  echo $! > "$dir/$h/devd.pid"
}

case "$cmd" in
up)
  bin=${3:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
  for b in devd ssock-ivshmem-server; do
    [ -x "$bin/$b" ] || { echo "two-host-lab: no $bin/$b (cargo build --release)" >&2; exit 2; }
  done
  [ "$(id -u)" = 0 ] || { echo "two-host-lab: needs root (network namespaces)" >&2; exit 3; }
  command -v ip >/dev/null || { echo "two-host-lab: needs iproute2 (ip)" >&2; exit 3; }
  mkdir -p "$dir/a" "$dir/b"
  # A free /24: the first of DIR's number on whose namespace name
  # `ip netns add` succeeds (labs set up at once take different ones).
  t=$(tag)
  for i in $(seq 250); do
    ip netns add "ssock-lab$t-a" 2>/dev/null && break
    t=$((t % 250 + 1))
  done
  na=ssock-lab$t-a; nb=ssock-lab$t-b
  echo "$na $nb" > "$dir/netns"
  echo "$t" > "$dir/tag"
  ip netns add "$nb"
  ip link add name "sl$t-a" type veth peer name "sl$t-b"
  ip link set "sl$t-a" netns "$na"; ip link set "sl$t-b" netns "$nb"
  ip -n "$na" addr add "10.77.$t.1/24" dev "sl$t-a"
  ip -n "$nb" addr add "10.77.$t.2/24" dev "sl$t-b"
  for n in "$na" "$nb"; do ip -n "$n" link set lo up; done
  ip -n "$na" link set "sl$t-a" up; ip -n "$nb" link set "sl$t-b" up
  echo "10.77.$t.1 10.77.$t.2" > "$dir/addresses"
  # The link's key, the same file for both hosts, owner-only.
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/link.key"
  chmod 600 "$dir/link.key"
  # Each link's window: one shared memory, each devd's inbox a half of it.
  links=${SSOCK_LAB_LINKS:-1}
  case "$links" in [1-8]) ;; *) echo "two-host-lab: SSOCK_LAB_LINKS is 1 to 8" >&2; exit 2 ;; esac
  windows=()
  for l in $(seq 0 $((links - 1))); do
    n=$([ "$l" = 0 ] || echo "$l")
    setsid "$bin/ssock-ivshmem-server" --socket "$dir/ivshmem$n.sock" --size "${SSOCK_LAB_WINDOW:-8388608}" \
      > "$dir/ivshmem$n.log" 2>&1 < /dev/null &
    echo $! > "$dir/ivshmem$n.pid"
    for i in $(seq 100); do [ -S "$dir/ivshmem$n.sock" ] && break; sleep 0.05; done
    windows+=("\"$dir/ivshmem$n.sock\"")
  done
  for h in a b; do
    if [ $h = a ]; then me=1; other=2; ns=$na; oip=10.77.$t.2; myip=10.77.$t.1
    else me=2; other=1; ns=$nb; oip=10.77.$t.1; myip=10.77.$t.2; fi
    {
      echo "socket = \"$dir/$h/devd.sock\""
      echo "node = $me"
      # The lower node dials: only node 2 listens for its peer.
      [ $me = 2 ] && echo "peer_listen = \"$myip:7455\""
      [ -n "${SSOCK_LAB_FAIL_FORWARD_MS:-}" ] && echo "fail_forward_ms = $SSOCK_LAB_FAIL_FORWARD_MS"
      [ -n "${SSOCK_LAB_RUN_AS:-}" ] && echo "run_as = \"$SSOCK_LAB_RUN_AS\""
      echo "[policy]"
      echo "short_lived_ms = 0"
      echo "[[peer]]"
      echo "node = $other"
      echo "address = \"$oip:7455\""
      echo "key_file = \"$dir/link.key\""
      echo "ivshmem = [$(IFS=,; echo "${windows[*]}")]"
      [ -n "${SSOCK_LAB_LINK_POLICY:-}" ] && echo "link_policy = \"$SSOCK_LAB_LINK_POLICY\""
    } > "$dir/$h/devd.toml"
    pin=()
    if [ "${SSOCK_LAB_PIN:-}" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
      pin=(taskset -c $((me - 1)))
    fi
    echo "$ns" > "$dir/$h/ns"
    echo "${pin[*]}" > "$dir/$h/pin"
    echo "$bin" > "$dir/bin"
    start_devd "$h" "$bin"
  done
  # Ready once it says so (its control socket exists before its window
  # and its peer listener do); a devd that exits on the way is reported.
  for h in a b; do
    for i in $(seq 400); do
      grep -q "devd ready on" "$dir/$h/devd.log" 2>/dev/null && break
      kill -0 "$(cat "$dir/$h/devd.pid")" 2>/dev/null || break
      sleep 0.05
    done
    grep -q "devd ready on" "$dir/$h/devd.log" 2>/dev/null || {
      echo "two-host-lab: devd on $h did not start:" >&2; cat "$dir/$h/devd.log" "$dir"/ivshmem*.log >&2; exit 1; }
  done
  echo "two-host-lab: up in $dir (hosts 10.77.$t.1 and 10.77.$t.2)"
  ;;
restart)
  # Host a's or b's devd started again (after it was killed), once it
  # says it is ready.
  h=${3:-}
  [ "$h" = a ] || [ "$h" = b ] || { echo "two-host-lab: host a or b" >&2; exit 2; }
  before=$(grep -c "devd ready on" "$dir/$h/devd.log" || true)
  start_devd "$h"
  for i in $(seq 400); do
    [ "$(grep -c "devd ready on" "$dir/$h/devd.log" || true)" -gt "$before" ] && break
    sleep 0.05
  done
  [ "$(grep -c "devd ready on" "$dir/$h/devd.log" || true)" -gt "$before" ] || {
    echo "two-host-lab: devd on $h did not start again:" >&2; tail -20 "$dir/$h/devd.log" >&2; exit 1; }
  ;;
down)
  for f in "$dir/a/devd.pid" "$dir/b/devd.pid" "$dir"/ivshmem*.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 0.2
  for f in "$dir/a/devd.pid" "$dir/b/devd.pid" "$dir"/ivshmem*.pid; do
    [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  if [ -f "$dir/netns" ]; then
    for n in $(cat "$dir/netns"); do
      # Whatever still runs in the namespace goes with it.
      for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
      ip netns del "$n" 2>/dev/null || true
    done
    rm -f "$dir/netns"
  fi
  ;;
exec)
  h=${3:-}; shift 3 || true
  t=$(cat "$dir/tag")
  [ "$h" = a ] || [ "$h" = b ] || { echo "two-host-lab: host a or b" >&2; exit 2; }
  SSOCK_DEVD_SOCKET="$dir/$h/devd.sock" exec ip netns exec "ssock-lab$t-$h" "$@"
  ;;
*)
  sed -n '2,17p' "$0" >&2; exit 2 ;;
esac
