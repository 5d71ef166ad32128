# The QEMU lab's steps (sourced by init): step_NAME runs what the kernel
# command line's ql=NAME asks and returns 0 only if what it checks holds.
# Each prints what it saw, prefixed "QL:" where a test reads it.

DEVD_SOCK=/run/ssock/devd.sock
export SSOCK_DEVD_SOCKET="$DEVD_SOCK"

# Waits up to 10 s for "$@" to succeed.
within_10s() {
  i=0
  while ! "$@" 2>/dev/null; do
    i=$((i + 1))
    [ "$i" -lt 100 ] || return 1
    sleep 0.1
  done
}

# Whether a /proc status file shows every id 999 (the ssock user), no
# supplementary group, every capability set empty and no_new_privs.
dropped() {
  awk '
    /^(Uid|Gid):/ { for (i = 2; i <= 5; i++) if ($i != 999) bad = bad " [" $0 "]" }
    /^Groups:/ { if (NF > 1) bad = bad " [" $0 "]" }
    /^Cap(Inh|Prm|Eff|Bnd|Amb):/ { if ($2 != "0000000000000000") bad = bad " [" $0 "]" }
    /^NoNewPrivs:/ { nnp = $2 }
    END {
      if (nnp != 1) bad = bad " [NoNewPrivs " nnp "]"
      if (bad != "") { print "QL: not dropped:" bad; exit 1 }
    }' "$1"
}

# Whether every thread of process $1 is dropped; prints how many there are.
all_dropped() {
  n=0
  for t in /proc/"$1"/task/*; do
    dropped "$t/status" || return 1
    n=$((n + 1))
  done
  echo "$n"
}

# devd started as the system service is (root, run_as ssock): it serves,
# and every thread of it is the ssock user with no capabilities.
step_devd() {
  mkdir -p /run/ssock
  devd --system --socket "$DEVD_SOCK" --run-as ssock --log info > /tmp/devd.log 2>&1 &
  # ringstat answers once devd serves, which is after the switch.
  if ! within_10s ringstat > /dev/null; then
    cat /tmp/devd.log
    return 1
  fi
  pid=$(pidof devd)
  n=$(all_dropped "$pid") || { echo "$n"; return 1; }
  echo "QL: devd $pid serves as ssock with no capabilities, $n threads"
  grep -E '^(Uid|Gid|CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/"$pid"/status
  [ "$n" -ge 2 ]
}

# The connection counts of devd's totals: "direct kernel".
counts() {
  ringstat --json | tr -d ' \n' | grep -o '"connections":{[^}]*}' | head -1 |
    sed 's/.*"direct":\([0-9]*\).*"kernel":\([0-9]*\).*/\1 \2/'
}

# Whether something listens on TCP port $1 (from /proc, no probe).
listening() {
  hex=$(printf ':%04X' "$1")
  awk -v p="$hex" '$2 ~ p"$" && $4 == "0A" { f = 1 } END { exit !f }' /proc/net/tcp
}

# sockperf's ping-pong on the guest's kernel TCP, then both ends under
# ssock-run through devd (step_devd first): the second goes Direct (devd's
# totals say so, nothing fell back) and both print their latency.
step_sockperf() {
  sockperf server --tcp -i 127.0.0.1 -p 11112 > /tmp/sp-kernel-server.log 2>&1 &
  k=$!
  within_10s listening 11112 || { cat /tmp/sp-kernel-server.log; return 1; }
  sockperf ping-pong --tcp -i 127.0.0.1 -p 11112 -t 3 > /tmp/sp-kernel.log 2>&1 || { cat /tmp/sp-kernel.log; return 1; }
  kill "$k"
  echo "QL: kernel TCP: $(grep -o 'avg-latency=[0-9.]*' /tmp/sp-kernel.log)"
  before=$(counts)
  ssock-run -- sockperf server --tcp -i 127.0.0.1 -p 11111 > /tmp/sp-server.log 2>&1 &
  s=$!
  within_10s listening 11111 || { cat /tmp/sp-server.log; return 1; }
  ssock-run -- sockperf ping-pong --tcp -i 127.0.0.1 -p 11111 -t 3 --mps 1500000 > /tmp/sp.log 2>&1 ||
    { cat /tmp/sp.log; return 1; }
  kill "$s"
  echo "QL: ssock-run: $(grep -o 'avg-latency=[0-9.]*' /tmp/sp.log)"
  after=$(counts)
  echo "QL: devd's connections (direct kernel): before $before, after $after"
  set -- $before $after
  [ "$#" = 4 ] && [ "$3" -gt "$1" ] && [ "$4" = "$2" ]
}

# Soft-RoCE: an rxe device on a dummy interface (198.18.0.1), then the
# hwbackends unit tests whose names say verbs (lab.sh build's TESTS):
# the structures against verbs.h where it can be compiled (not here: it
# says SKIP), and two queue pairs on the device that RDMA-write into each
# other's region and ring with the immediate, which must find a device
# (SSOCK_VERBS_REQUIRED=1).
step_verbs() {
  [ -x /bin/ssock-hwbackends-tests ] || { echo "QL: no hwbackends tests in the initramfs"; return 1; }
  for m in crc32_generic crc32-pclmul rdma_rxe ib_uverbs; do modprobe "$m" 2>/dev/null; done
  modprobe dummy numdummies=0
  ip link add dummy0 type dummy && ip link set dummy0 up && ip addr add 198.18.0.1/24 dev dummy0 ||
    return 1
  rdma link add rxe0 type rxe netdev dummy0 || { echo "QL: no rxe device"; return 1; }
  echo "QL: rxe0 on dummy0, GID 1 $(cat /sys/class/infiniband/rxe0/ports/1/gids/1)"
  SSOCK_VERBS_REQUIRED=1 SSOCK_VERBS_DEVICE=rxe0 /bin/ssock-hwbackends-tests verbs:: --test-threads 1 > /tmp/verbs.log 2>&1
  rc=$?
  grep -v -E '^ +([0-9]+: | at )' /tmp/verbs.log | grep -A2 -E 'test |SKIP|result|panicked' | sed 's/^/QL: /'
  grep -q 'test result: ok. 7 passed' /tmp/verbs.log && [ "$rc" = 0 ]
}

# Two guests (lab.sh pair): a is 10.78.0.1, b is 10.78.0.2 on the wire.
me() { if [ "$QL_NAME" = a ]; then echo 1; else echo 2; fi; }
other() { if [ "$QL_NAME" = a ]; then echo 2; else echo 1; fi; }
# This guest's network device on the wire.
wire_dev() { ls /sys/class/net | grep -v -E '^(lo|dummy)' | head -1; }

# The wire up: this guest's address on its virtio-net, the other answers.
step_net() {
  dev=$(wire_dev)
  [ -n "$dev" ] || { echo "QL: no network device"; return 1; }
  ip addr add "10.78.0.$(me)/24" dev "$dev"
  ip link set "$dev" up
  i=0
  until ping -c 1 -W 1 "10.78.0.$(other)" > /dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -lt 60 ] || { echo "QL: 10.78.0.$(other) does not answer"; return 1; }
  done
  echo "QL: $dev 10.78.0.$(me) reaches 10.78.0.$(other)"
}

# Whether devd's peer (the other guest) is up: its control connection,
# the key proved. (The JSON's keys are sorted: a peer's state follows its
# node.)
peer_up() {
  ringstat --json | tr -d ' \n' | grep -q "\"node\":$(other),\"state\":\"up\""
}

# Each guest's devd (root, run_as ssock) lists the other as its peer,
# with a key both hold: their control connection comes up over the wire.
step_peers() {
  mkdir -p /etc/ssock /run/ssock
  printf 'qemu-lab-link-key-0123456789abcdef\n' > /etc/ssock/link.key
  chmod 0600 /etc/ssock/link.key
  {
    echo "socket = \"$DEVD_SOCK\""
    echo "node = $(me)"
    echo "run_as = \"ssock\""
    # The lower node dials: only node 2 listens for its peer.
    [ "$(me)" = 2 ] && echo "peer_listen = \"10.78.0.2:7455\""
    echo "[[peer]]"
    echo "node = $(other)"
    echo "address = \"10.78.0.$(other):7455\""
    echo "key_file = \"/etc/ssock/link.key\""
  } > /etc/ssock/devd.toml
  devd --config /etc/ssock/devd.toml --log info > /tmp/devd.log 2>&1 &
  within_10s ringstat > /dev/null || { cat /tmp/devd.log; return 1; }
  i=0
  until peer_up; do
    i=$((i + 1))
    [ "$i" -lt 300 ] || { echo "QL: no peer"; ringstat; cat /tmp/devd.log; return 1; }
    sleep 0.1
  done
  n=$(all_dropped "$(pidof devd)") || { echo "$n"; return 1; }
  echo "QL: devd node $(me) has node $(other) up as its peer, serving as ssock"
  ringstat | head -4
}

# sockperf from a (client) to b (server) across the wire, on kernel TCP
# and then both under ssock-run (no ntb link yet: kernel TCP again, the
# bytes the program's own); b serves until a says it is done.
step_across() {
  if [ "$QL_NAME" = b ]; then
    sockperf server --tcp -i 0.0.0.0 -p 11114 > /tmp/sp-kernel-server.log 2>&1 &
    k=$!
    ssock-run -- sockperf server --tcp -i 0.0.0.0 -p 11113 > /tmp/sp-server.log 2>&1 &
    s=$!
    msg=$(timeout 120 nc -l -p 9999)
    kill "$k" "$s"
    echo "QL: a said: $msg"
    [ "$msg" = done ]
    return
  fi
  for port in 11114 11113; do
    run=
    [ "$port" = 11113 ] && run="ssock-run --"
    i=0
    until $run sockperf ping-pong --tcp -i 10.78.0.2 -p "$port" -t 3 --mps 1500000 > /tmp/sp-across.log 2>&1; do
      i=$((i + 1))
      [ "$i" -lt 30 ] || { cat /tmp/sp-across.log; echo failed | nc 10.78.0.2 9999; return 1; }
      sleep 1
    done
    echo "QL: across, ${run:-kernel TCP}: $(grep -o 'avg-latency=[0-9.]*' /tmp/sp-across.log)"
  done
  echo done | nc 10.78.0.2 9999
}

# The window's device (lab.sh pair: QEMU's ivshmem-doorbell) bound to
# vfio-pci behind the emulated IOMMU, as devd's VFIO provider will own it:
# its IOMMU group's /dev/vfio node is there.
# The PCI address of the ivshmem device, if there is one.
ivshmem_bdf() {
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/device")" = 0x1110 ] && basename "$d"
  done
}

step_vfio() {
  modprobe vfio-pci && modprobe vfio_iommu_type1 || return 1
  bdf=$(ivshmem_bdf)
  [ -n "$bdf" ] || { echo "QL: no ivshmem device"; return 1; }
  d=/sys/bus/pci/devices/$bdf
  group=$(basename "$(readlink "$d/iommu_group")")
  echo vfio-pci > "$d/driver_override"
  echo "$bdf" > /sys/bus/pci/drivers_probe
  drv=$(basename "$(readlink "$d/driver")")
  echo "QL: ivshmem-doorbell at $bdf, IOMMU group $group, driver $drv, BAR2 $(sed -n 3p "$d/resource")"
  [ "$drv" = vfio-pci ] && [ -c "/dev/vfio/$group" ]
}

# Whether this host's devd heard of b's listener on port $1 (advertised
# over the peers' control connection) within 30 s.
heard_of() {
  i=0
  until ringstat --json | tr -d ' \n' | grep -q "\"0.0.0.0:$1\""; do
    i=$((i + 1))
    [ "$i" -lt 300 ] || { echo "QL: b's listener $1 not heard of"; return 1; }
    sleep 0.1
  done
}

# devd on the window through VFIO (after step vfio): each guest's devd
# (root, run_as ssock) has the other as its peer with the ivshmem-doorbell
# device as their ntb link; the link comes up (heartbeats through the
# window, MSI-X doorbells), and sockperf from a to b under ssock-run
# crosses it as a remote Queued connection, which both devds count.
step_ntb() {
  bdf=$(ivshmem_bdf)
  [ -n "$bdf" ] || { echo "QL: no ivshmem device"; return 1; }
  link_devd "vfio = \"$bdf\"" "vfio $bdf" || return 1
  # The doorbells came as MSI-X interrupts.
  msix=$(awk '/vfio-msix/ { for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) n += $i } END { print n + 0 }' /proc/interrupts)
  echo "QL: devd node $(me): $msix MSI-X interrupts"
  [ "$msix" -gt 0 ]
}

# devd (started again, root, run_as ssock) with the other guest as its
# peer over one ntb link, the config's line $1 ("vfio = ..." or "verbs =
# ..."), which ringstat shows as over $2: the link comes up (heartbeats
# through the window, doorbells), and sockperf from a to b under
# ssock-run crosses it as a remote Queued connection, which both devds
# count.
link_devd() {
  if pidof devd > /dev/null; then
    kill "$(pidof devd)"
    within_10s sh -c '! pidof devd > /dev/null' || return 1
  fi
  sed -i '/^vfio = /d; /^verbs = /d' /etc/ssock/devd.toml
  echo "$1" >> /etc/ssock/devd.toml
  devd --config /etc/ssock/devd.toml --log info > /tmp/devd-ntb.log 2>&1 &
  devd_pid=$!
  within_10s ringstat > /dev/null || { cat /tmp/devd-ntb.log; return 1; }
  i=0
  over=$(echo "$2" | tr -d ' ')
  until peer_up && ringstat --json | tr -d ' \n' | grep -q "\"over\":\"$over\",\"state\":\"up\""; do
    i=$((i + 1))
    [ "$i" -lt 300 ] || { echo "QL: no link"; ringstat; cat /tmp/devd-ntb.log; return 1; }
    sleep 0.1
  done
  # It opened the device as root, and serves as ssock with no capabilities.
  n=$(all_dropped "$devd_pid") || { echo "$n"; return 1; }
  echo "QL: devd node $(me): its ntb link over $2 is up; $n threads, as ssock with no capabilities"
  ringstat | grep '^links to'
  cross_link "$2"
}

# sockperf from a to b under ssock-run across the link (over $1; b's
# server on port $2, 11115 by default): a remote Queued connection, which
# both devds count.
cross_link() {
  port=${2:-11115}
  c0=$(remote_count connections) q0=$(queued_bytes)
  if [ "$QL_NAME" = b ]; then
    ssock-run -- sockperf server --tcp -i 0.0.0.0 -p "$port" > /tmp/sp-ntb-server.log 2>&1 &
    s=$!
    msg=$(timeout 120 nc -l -p 9998)
    kill "$s" || { echo "QL: b's sockperf server had ended:"; cat /tmp/sp-ntb-server.log; }
    echo "QL: a said: $msg"
    [ "$msg" = done ] || return 1
  else
    heard_of "$port" || { echo failed | nc 10.78.0.2 9998; return 1; }
    ssock-run -- sockperf ping-pong --tcp -i 10.78.0.2 -p "$port" -t 3 --mps 1500000 > /tmp/sp-ntb.log 2>&1 ||
      { cat /tmp/sp-ntb.log; echo failed | nc 10.78.0.2 9998; return 1; }
    echo "QL: across the ntb link over $1: $(grep -o 'avg-latency=[0-9.]*' /tmp/sp-ntb.log)"
    echo done | nc 10.78.0.2 9998
  fi
  # The connection crossed as a remote one and its bytes went through the
  # engine (queued).
  json=$(ringstat --json | tr -d ' \n')
  remote=$(echo "$json" | grep -o '"remote":{[^}]*}' | head -1)
  bytes=$(echo "$json" | grep -o '"bytes":{[^}]*}' | head -1)
  q=$(($(queued_bytes) - q0))
  echo "QL: devd node $(me): $remote $bytes ($q bytes through the engine in this run)"
  [ "$(remote_count connections)" -gt "$c0" ] || return 1
  # sockperf's 14-byte messages for 3 s, both ways: a hundred at least.
  [ "$q" -ge 1024 ] || { echo "QL: sockperf's bytes did not go through the engine"; return 1; }
}

# Both links at once (after steps vfio and rxe): link 0 over the
# ivshmem-doorbell device through VFIO, link 1 over rxe1 with RoCE on a
# second address of the wire (10.79.0.x: its GID index found in sysfs),
# so that RoCE can be cut while the control connection (10.78.0.x) stays;
# new connections spread over both.
step_both() {
  bdf=$(ivshmem_bdf)
  [ -n "$bdf" ] || { echo "QL: no ivshmem device"; return 1; }
  dev=$(wire_dev)
  ip addr add "10.79.0.$(me)/24" dev "$dev" || return 1
  gids=/sys/class/infiniband/rxe1/ports/1/gids
  i=0 idx=
  while [ -z "$idx" ]; do
    for g in $(ls "$gids"); do
      grep -q "ffff:0a4f:000$(me)" "$gids/$g" 2> /dev/null && idx=$g
    done
    i=$((i + 1))
    [ -n "$idx" ] || [ "$i" -lt 100 ] || { echo "QL: rxe1 has no GID for 10.79.0.$(me)"; return 1; }
    [ -n "$idx" ] || sleep 0.1
  done
  echo "QL: rxe1 GID $idx is 10.79.0.$(me)"
  sed -i '/^link_policy = /d; /^verbs_gid_index = /d' /etc/ssock/devd.toml
  printf 'link_policy = "spread"\nverbs_gid_index = %s\n' "$idx" >> /etc/ssock/devd.toml
  link_devd "$(printf 'vfio = "%s"\nverbs = "rxe1"' "$bdf")" "verbs rxe1" || return 1
  # Both links up, in one look.
  json=$(ringstat --json | tr -d ' \n')
  echo "$json" | grep -q "\"over\":\"vfio$bdf\",\"state\":\"up\"" &&
    echo "$json" | grep -q '"over":"verbsrxe1","state":"up"' ||
    { echo "QL: not both links are up"; ringstat; return 1; }
}

# iproute2's ip, wherever lab.sh put it (the shell prefers busybox's
# applet, which has no `neigh replace`).
iproute2() {
  for p in /usr/sbin/ip /usr/bin/ip /sbin/ip; do
    [ -x "$p" ] && [ ! -L "$p" ] && { "$p" "$@"; return; }
  done
  echo "QL: no iproute2 ip"
  return 1
}

# After step both: two 32 MiB streams from a to b under ssock-run (ports
# 11131 and 11132), one on each link; once 4 MiB went through a's engine,
# a's neighbour entry for b's RoCE address (10.79.0.2) is made a MAC no
# one has, which cuts RoCE to b, the control connection untouched. The RDMA link fails (its queue pairs' retries run
# out), its connections move onto the VFIO link, TCP untouched, and both
# files arrive whole; each devd counts a moved connection. The entry
# goes; the RDMA link is set up again and comes back up.
step_drop() {
  BULK_BYTES=33554432 bulk_data drop-1 > /tmp/drop-1
  BULK_BYTES=33554432 bulk_data drop-2 > /tmp/drop-2
  m0=$(remote_count migrations) f0=$(remote_count failovers)
  if [ "$QL_NAME" = b ]; then
    ssock-run -- socat -u TCP-LISTEN:11131,reuseaddr CREATE:/tmp/got-drop-1 > /tmp/drop-r1.log 2>&1 &
    r1=$!
    ssock-run -- socat -u TCP-LISTEN:11132,reuseaddr CREATE:/tmp/got-drop-2 > /tmp/drop-r2.log 2>&1 &
    r2=$!
    msg=$(timeout 300 nc -l -p 9994)
    echo "QL: a said: $msg"
    [ "$msg" = done ] || { kill "$r1" "$r2"; cat /tmp/drop-r*.log; return 1; }
    wait "$r1" && wait "$r2" || { echo "QL: socat failed"; cat /tmp/drop-r*.log; return 1; }
    cmp /tmp/got-drop-1 /tmp/drop-1 && cmp /tmp/got-drop-2 /tmp/drop-2 ||
      { echo "QL: the bytes received are not the bytes sent"; return 1; }
  else
    heard_of 11131 && heard_of 11132 || { echo failed | nc 10.78.0.2 9994; return 1; }
    before=$(queued_bytes)
    timeout 120 ssock-run -- socat -u OPEN:/tmp/drop-1 TCP:10.78.0.2:11131 > /tmp/drop-w1.log 2>&1 &
    w1=$!
    timeout 120 ssock-run -- socat -u OPEN:/tmp/drop-2 TCP:10.78.0.2:11132 > /tmp/drop-w2.log 2>&1 &
    w2=$!
    i=0
    until [ $(($(queued_bytes) - before)) -ge 4194304 ]; do
      i=$((i + 1))
      [ "$i" -lt 600 ] || { echo "QL: the streams did not cross"; echo failed | nc 10.78.0.2 9994; return 1; }
      sleep 0.05
    done
    # b's RoCE address at a MAC no one has: a's RoCE packets to it go
    # nowhere (the control connection's address keeps its own entry).
    # One stream on each link first.
    on=$(ringstat | grep -o 'ntb:2/[01]' | sort -u | tr '\n' ' ')
    ringstat | grep -E 'ntb:' | sed 's/^/QL: /'
    [ "$on" = "ntb:2/0 ntb:2/1 " ] || { echo "QL: the streams are not one on each link ($on)"; echo failed | nc 10.78.0.2 9994; return 1; }
    iproute2 neigh replace 10.79.0.2 lladdr 02:00:00:00:00:99 dev "$(wire_dev)" nud permanent ||
      { echo failed | nc 10.78.0.2 9994; return 1; }
    echo "QL: RoCE to b cut after $(($(queued_bytes) - before)) bytes through a's engine"
    drop_ok=1
    wait "$w1" && wait "$w2" || drop_ok=0
    ringstat | grep '^link' | sed 's/^/QL: /'
    # The RDMA link (link 1) went down, the VFIO one did not.
    ringstat --json | tr -d ' \n' | grep -q '"link":1,"over":"verbsrxe1","state":"down"' ||
      ringstat | grep -q 'link 1 down' || { echo "QL: the RDMA link never went down"; drop_ok=0; }
    ringstat | grep '^link to' | grep -q 'link 0 down' && { echo "QL: the VFIO link went down too"; drop_ok=0; }
    iproute2 neigh del 10.79.0.2 dev "$(wire_dev)"
    if [ "$drop_ok" = 1 ]; then echo done | nc 10.78.0.2 9994; else
      echo "QL: a writer failed"; cat /tmp/drop-w*.log; echo failed | nc 10.78.0.2 9994; return 1; fi
  fi
  m=$(($(remote_count migrations) - m0)) f=$(($(remote_count failovers) - f0))
  echo "QL: devd node $(me): $m connections moved between links, $f to their kernel sockets, files whole"
  [ "$m" -ge 1 ] && [ "$f" = 0 ] || return 1
  # The RDMA link comes back once RoCE does.
  i=0
  until ringstat --json | tr -d ' \n' | grep -q '"over":"verbsrxe1","state":"up"'; do
    i=$((i + 1))
    [ "$i" -lt 600 ] || { echo "QL: the RDMA link did not come back"; ringstat; tail -20 /tmp/devd-ntb.log; return 1; }
    sleep 0.1
  done
  echo "QL: devd node $(me): the RDMA link is up again, $((i / 10)) s after RoCE came back"
  grep -a 'verbs' /tmp/devd-ntb.log | tail -3 | sed 's/^/QL: /'
  # Neither guest ends the step before the other saw the link back.
  if [ "$QL_NAME" = b ]; then
    i=0
    until echo up | nc 10.78.0.1 9993 2> /dev/null; do
      i=$((i + 1))
      [ "$i" -lt 900 ] || { echo "QL: a does not listen"; return 1; }
      sleep 0.1
    done
  else
    msg=$(timeout 120 nc -l -p 9993)
    echo "QL: b said: $msg"
    [ "$msg" = up ] && ringstat --json | tr -d ' \n' | grep -q '"over":"verbsrxe1","state":"up"'
  fi
}

# After step rdma: b's devd SIGKILLed and started again. Its new queue
# pair is set up with a's over the control connection (a's, which the
# dead one's no longer answers, reset), the link comes up again, and
# sockperf crosses it again.
step_relink() {
  if [ "$QL_NAME" = b ]; then
    kill -9 "$(pidof devd)"
    within_10s sh -c '! pidof devd > /dev/null' || return 1
    devd --config /etc/ssock/devd.toml --log info > /tmp/devd-ntb.log 2>&1 &
    devd_pid=$!
    within_10s ringstat > /dev/null || { cat /tmp/devd-ntb.log; return 1; }
  fi
  # a: the peer's control connection came up once more.
  [ -n "${ups_before:-}" ] || { echo "QL: no step rdma before"; return 1; }
  i=0
  until [ "$QL_NAME" = b ] ||
    [ "$(ringstat --json | tr -d ' \n' | grep -o '"ups":[0-9]*' | head -1 | cut -d: -f2)" -gt "$ups_before" ]; do
    i=$((i + 1))
    [ "$i" -lt 300 ] || { echo "QL: b's devd never came back"; ringstat; return 1; }
    sleep 0.1
  done
  i=0
  until peer_up && ringstat --json | tr -d ' \n' | grep -q '"over":"verbsrxe1","state":"up"'; do
    i=$((i + 1))
    [ "$i" -lt 300 ] || { echo "QL: the link did not come back"; ringstat; cat /tmp/devd-ntb.log; return 1; }
    sleep 0.1
  done
  echo "QL: devd node $(me): the link over rxe1 is up again after b's devd was SIGKILLed and started again"
  ringstat | grep '^link'
  grep -a 'setting up\|verbs' /tmp/devd-ntb.log | tail -4 | sed 's/^/QL: /'
  cross_link "verbs rxe1" 11119
}

# Soft-RoCE on the wire: an rxe device on this guest's virtio-net (after
# step net), RoCE v2 over 10.78.0.x (GID index 1).
step_rxe() {
  for m in crc32_generic crc32-pclmul rdma_rxe ib_uverbs; do modprobe "$m" 2>/dev/null; done
  dev=$(wire_dev)
  rdma link add rxe1 type rxe netdev "$dev" || { echo "QL: no rxe device on $dev"; return 1; }
  i=0
  until grep -q "ffff:0a4e:000$(me)" /sys/class/infiniband/rxe1/ports/1/gids/1 2> /dev/null; do
    i=$((i + 1))
    [ "$i" -lt 100 ] || { echo "QL: rxe1 has no GID for 10.78.0.$(me)"; return 1; }
    sleep 0.1
  done
  echo "QL: rxe1 on $dev, GID 1 $(cat /sys/class/infiniband/rxe1/ports/1/gids/1)"
}

# devd over RDMA verbs (after step rxe): the link is a queue pair on rxe1
# to the other guest's, set up over the peers' control connection.
step_rdma() {
  link_devd 'verbs = "rxe1"' "verbs rxe1" || return 1
  # How often the peer's control connection came up so far (relink waits
  # for one more).
  ups_before=$(ringstat --json | tr -d ' \n' | grep -o '"ups":[0-9]*' | head -1 | cut -d: -f2)
}

# Bytes this host's devd moved through its engine (Queued: for a remote
# connection, what its end sent and what it received).
queued_bytes() {
  ringstat --json | tr -d ' \n' | grep -o '"bytes":{[^}]*}' | head -1 |
    grep -o '"queued":[0-9]*' | cut -d: -f2
}

# BULK_BYTES the same on both guests, never the same 1 MiB twice: devd's
# binary again and again, each copy after a line that numbers it ($1
# tells the two directions apart).
bulk_data() {
  i=0
  while [ "$i" -lt 128 ]; do
    echo "$1 $i"
    cat "$(command -v devd)"
    i=$((i + 1))
  done | head -c "$BULK_BYTES"
}

BULK_BYTES=${BULK_BYTES:-67108864}
# This guest's uptime in hundredths of a second.
uptime_cs() { cut -d' ' -f1 /proc/uptime | tr -d .; }

# What a failed transfer leaves to look at; a tells b.
bulk_failed() {
  echo "QL: bulk failed: $(cat "$1")"
  ringstat
  ringstat --json | tr -d ' \n' | grep -o '"connections":\[.*' | cut -c1-3000
  tail -20 /tmp/devd-ntb.log
  [ "$QL_NAME" = a ] && echo failed | nc 10.78.0.2 9997
}

# After step ntb, its devd still serving: BULK_BYTES (64 MiB) each way
# across the ntb link over VFIO with socat under ssock-run (a to b on
# port 11116, timed beside the same file over kernel TCP between the
# guests, plain socat on 11118; then b to a on 11117, b's socat writing first, as a server
# that sends a file), each received file checked byte for byte against
# what its sender wrote (`bulk_data`, made on both sides), and each
# host's engine moved both directions' bytes (it counts what its end
# sends and what it receives), but for the first bytes the hand-over may
# leave on kernel TCP (1 MiB each way at most allowed).
step_bulk() {
  pidof devd > /dev/null || { echo "QL: no devd (step ntb first)"; return 1; }
  bulk_data a-to-b > /tmp/a-to-b
  bulk_data b-to-a > /tmp/b-to-a
  before=$(queued_bytes)
  t0=$(date +%s)
  if [ "$QL_NAME" = b ]; then
    socat -u TCP-LISTEN:11118,reuseaddr CREATE:/tmp/got-k > /tmp/bulk-k.log 2>&1 &
    k=$!
    ssock-run -- socat -u TCP-LISTEN:11116,reuseaddr CREATE:/tmp/got-a > /tmp/bulk-in.log 2>&1 &
    r=$!
    ssock-run -- socat -u OPEN:/tmp/b-to-a TCP-LISTEN:11117,reuseaddr > /tmp/bulk-out.log 2>&1 &
    w=$!
    msg=$(timeout 300 nc -l -p 9997)
    echo "QL: a said: $msg"
    [ "$msg" = done ] || { bulk_failed /tmp/bulk-in.log; kill "$r" "$w" "$k"; return 1; }
    wait "$r" && wait "$w" && wait "$k" || { echo "QL: socat failed"; cat /tmp/bulk-*.log; return 1; }
    cmp /tmp/got-k /tmp/a-to-b || { echo "QL: kernel TCP's bytes are not the bytes sent"; return 1; }
    got=/tmp/got-a want=/tmp/a-to-b
  else
    heard_of 11116 && heard_of 11117 || { echo failed | nc 10.78.0.2 9997; return 1; }
    # The same file over kernel TCP between the guests first (plain
    # socat, over the emulated wire), for the time it takes there.
    t=$(uptime_cs)
    timeout 120 socat -u OPEN:/tmp/a-to-b TCP:10.78.0.2:11118 > /tmp/bulk-k.log 2>&1 ||
      { bulk_failed /tmp/bulk-k.log; return 1; }
    kt=$(($(uptime_cs) - t))
    t=$(uptime_cs)
    timeout 120 ssock-run -- socat -u OPEN:/tmp/a-to-b TCP:10.78.0.2:11116 > /tmp/bulk-out.log 2>&1 ||
      { bulk_failed /tmp/bulk-out.log; return 1; }
    st=$(($(uptime_cs) - t))
    echo "QL: bulk a to b, $BULK_BYTES bytes: kernel TCP over the wire $kt cs, ssock-run over the ntb link $st cs"
    timeout 120 ssock-run -- socat -u TCP:10.78.0.2:11117 CREATE:/tmp/got-b > /tmp/bulk-in.log 2>&1 ||
      { bulk_failed /tmp/bulk-in.log; return 1; }
    echo done | nc 10.78.0.2 9997
    got=/tmp/got-b want=/tmp/b-to-a
  fi
  moved=$(($(queued_bytes) - before))
  echo "QL: bulk: $(wc -c < "$got") bytes in, $moved bytes through this host's engine (both ways), $(($(date +%s) - t0)) s"
  cmp "$got" "$want" || { echo "QL: the bytes received are not the bytes sent"; return 1; }
  [ "$moved" -ge $((2 * (BULK_BYTES - 1048576))) ] ||
    { echo "QL: too few bytes went through the engine: the transfers did not cross the link"; return 1; }
}

# A field of the remote counts in devd's totals ("connections",
# "unmatched", ...).
remote_count() {
  ringstat --json | tr -d ' \n' | grep -o '"remote":{[^}]*}' | head -1 |
    grep -o "\"$1\":[0-9]*" | cut -d: -f2
}

# After step ntb, its devd still serving: a plain peer on either side,
# across the hosts. a's plain socat sends 1 MiB to b's socat under
# ssock-run (port 11122), and a's socat under ssock-run sends another to
# b's plain socat (11123). Each file arrives unchanged on kernel TCP: no
# byte went through either engine, no remote connection was made, and b's
# devd counts its acceptor's Claim that found no intent on a (unmatched).
step_plain() {
  pidof devd > /dev/null || { echo "QL: no devd (step ntb first)"; return 1; }
  BULK_BYTES=1048576 bulk_data plain-to-ssock > /tmp/plain-in
  BULK_BYTES=1048576 bulk_data ssock-to-plain > /tmp/plain-out
  bytes0=$(queued_bytes) conns0=$(remote_count connections) unmatched0=$(remote_count unmatched)
  if [ "$QL_NAME" = b ]; then
    # The plain listener first: once a heard of the other, it is there.
    socat -u TCP-LISTEN:11123,reuseaddr CREATE:/tmp/got-plain-out > /tmp/plain-p.log 2>&1 &
    p=$!
    within_10s listening 11123 || { cat /tmp/plain-p.log; kill "$p"; return 1; }
    ssock-run -- socat -u TCP-LISTEN:11122,reuseaddr CREATE:/tmp/got-plain-in > /tmp/plain-s.log 2>&1 &
    s=$!
    msg=$(timeout 300 nc -l -p 9995)
    echo "QL: a said: $msg"
    [ "$msg" = done ] || { kill "$s" "$p"; cat /tmp/plain-*.log; return 1; }
    wait "$s" && wait "$p" || { echo "QL: socat failed"; cat /tmp/plain-*.log; return 1; }
    cmp /tmp/got-plain-in /tmp/plain-in && cmp /tmp/got-plain-out /tmp/plain-out ||
      { echo "QL: the bytes received are not the bytes sent"; return 1; }
  else
    heard_of 11122 || { echo failed | nc 10.78.0.2 9995; return 1; }
    timeout 120 socat -u OPEN:/tmp/plain-in TCP:10.78.0.2:11122 > /tmp/plain-c.log 2>&1 &&
      timeout 120 ssock-run -- socat -u OPEN:/tmp/plain-out TCP:10.78.0.2:11123 >> /tmp/plain-c.log 2>&1 ||
      { cat /tmp/plain-c.log; echo failed | nc 10.78.0.2 9995; return 1; }
    echo done | nc 10.78.0.2 9995
  fi
  bytes=$(($(queued_bytes) - bytes0)) conns=$(($(remote_count connections) - conns0))
  unmatched=$(($(remote_count unmatched) - unmatched0))
  echo "QL: plain peers: files unchanged; through this host's engine $bytes bytes, remote connections $conns, unmatched Claims $unmatched"
  [ "$bytes" = 0 ] && [ "$conns" = 0 ] || return 1
  if [ "$QL_NAME" = b ]; then [ "$unmatched" = 1 ]; fi
}

# After step ntb, its devd still serving: a's socat under ssock-run
# streams to b's under ssock-run across the link (port 11121) and is
# SIGKILLed once 4 MiB went through a's engine. b's reader ends (end of
# stream or reset) within 30 s, what it got is a prefix of what a sent,
# and both devds still serve.
step_killed() {
  pidof devd > /dev/null || { echo "QL: no devd (step ntb first)"; return 1; }
  [ -s /tmp/a-to-b ] || bulk_data a-to-b > /tmp/a-to-b
  if [ "$QL_NAME" = b ]; then
    ssock-run -- socat -u TCP-LISTEN:11121,reuseaddr CREATE:/tmp/got-killed > /tmp/killed.log 2>&1 &
    r=$!
    msg=$(timeout 300 nc -l -p 9996)
    echo "QL: a said: $msg"
    [ "$msg" = killed ] || { kill "$r"; return 1; }
    i=0
    while kill -0 "$r" 2> /dev/null; do
      i=$((i + 1))
      [ "$i" -lt 300 ] || { echo "QL: b's reader still waits 30 s after its writer died"; kill "$r"; return 1; }
      sleep 0.1
    done
    wait "$r"
    rc=$?
    n=$(wc -c < /tmp/got-killed)
    echo "QL: b's reader ended (socat exit $rc: $(tail -1 /tmp/killed.log)) after $n bytes, $((i / 10)) s after a said"
    cmp -n "$n" /tmp/got-killed /tmp/a-to-b || { echo "QL: what b got is not what a sent"; return 1; }
    [ "$n" -gt 0 ] || return 1
  else
    heard_of 11121 || { echo failed | nc 10.78.0.2 9996; return 1; }
    before=$(queued_bytes)
    ssock-run -- socat -u OPEN:/tmp/a-to-b TCP:10.78.0.2:11121 > /tmp/killed.log 2>&1 &
    w=$!
    i=0
    until [ $(($(queued_bytes) - before)) -ge 4194304 ]; do
      i=$((i + 1))
      [ "$i" -lt 600 ] && kill -0 "$w" 2> /dev/null ||
        { echo "QL: the writer did not cross the link"; cat /tmp/killed.log; echo failed | nc 10.78.0.2 9996; return 1; }
      sleep 0.1
    done
    kill -9 "$w"
    echo killed | nc 10.78.0.2 9996
    echo "QL: a's writer SIGKILLed after $(($(queued_bytes) - before)) bytes through this host's engine"
  fi
  ringstat > /dev/null || { echo "QL: devd does not answer"; return 1; }
  pidof devd > /dev/null
}

# devd stops cleanly with its VFIO link (its seccomp filter would kill it
# for a system call the link's teardown made): the devd step ntb started.
step_stop() {
  [ -n "${devd_pid:-}" ] || { echo "QL: no devd of step ntb's"; return 1; }
  kill "$devd_pid"
  wait "$devd_pid"
  rc=$?
  echo "QL: devd node $(me) stopped: exit status $rc"
  [ "$rc" = 0 ]
}

