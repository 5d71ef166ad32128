#!/usr/bin/env bash
# The QEMU lab (issue 14): ssock on Debian's own kernel, in QEMU guests
# (TCG; an emulated Intel IOMMU), booted from a small initramfs that holds
# busybox, ssock's binaries and the test programs with their libraries.
# What a container cannot show (a devd that gives up root on a stock
# kernel; later VFIO on ivshmem and soft-RoCE) is tested there.
#
# usage: tools/qemu-lab/lab.sh setup DIR
#          download and unpack QEMU, the kernel and busybox-static (apt-get
#          download: nothing is installed but QEMU's libraries; root)
#        tools/qemu-lab/lab.sh build DIR BIN [TESTS]
#          DIR/initramfs.cpio.gz from BIN (devd, ssock-run, libssock.so,
#          ringstat), sockperf, socat, the guest's scripts (guest/) and modules,
#          iproute2's ip and rdma, libibverbs with the rxe provider, and
#          TESTS (the hwbackends unit tests' binary, for the verbs step)
#        tools/qemu-lab/lab.sh run DIR STEPS LOG [QEMU ARGS...]
#          one guest running STEPS (comma-separated, guest/steps.sh) and
#          powering off; its console in LOG; exit 0 only if the guest said
#          "QL: done ok"
#        tools/qemu-lab/lab.sh pair DIR STEPS LOG_A LOG_B
#          two guests, a and b, at once, joined by an emulated Ethernet wire
#          (virtio-net over a UDP socket pair on 127.0.0.1) and sharing an
#          ivshmem-doorbell device served by BIN/ssock-ivshmem-server on
#          this host (the NTB-style window): both run STEPS; exit 0 only if
#          both said "QL: done ok"
# Environment: SSOCK_QEMU_SMP (default 2) and SSOCK_QEMU_MEM (default 1G)
# for the guest, SSOCK_QEMU_TIMEOUT (seconds, default 600) for a run.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
what="${1:-}"
dir="${2:-}"
[ -n "$what" ] && [ -n "$dir" ] || { sed -n '2,25p' "$0" >&2; exit 2; }
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
root="$dir/root"

# The kernel release unpacked under DIR/root.
kernel_release() {
  ls "$root/lib/modules" 2>/dev/null | head -1
}

setup() {
  export DEBIAN_FRONTEND=noninteractive
  local t0=$SECONDS debs="$dir/debs"
  rm -rf "$debs" "$root"
  mkdir -p "$debs" "$root"
  apt-get update -qq
  # The kernel package linux-image-amd64 points at.
  local kpkg
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  [ -n "$kpkg" ] || { echo "qemu-lab: no linux-image package found by apt" >&2; exit 1; }
  # Downloaded and unpacked, not installed: no kernel hook runs on this
  # host, and QEMU's packages cannot conflict with what the host has.
  (cd "$debs" && apt-get download -qq qemu-system-x86 qemu-system-common qemu-system-data \
    seabios ipxe-qemu "$kpkg" busybox-static)
  local d
  for d in "$debs"/*.deb; do dpkg-deb -x "$d" "$root"; done
  # What QEMU's binary needs from the host: its packages' Depends.
  local deps
  deps=$( (dpkg-deb -f "$debs"/qemu-system-x86_*.deb Depends; echo ,
           dpkg-deb -f "$debs"/qemu-system-common_*.deb Depends) |
          tr ',' '\n' | sed 's/(.*)//; s/|.*//; s/ //g' |
          grep -v -E '^$|^qemu-|^seabios|^ipxe' | sort -u)
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $deps cpio kmod >/dev/null
  "$root/usr/bin/qemu-system-x86_64" --version | head -1
  echo "qemu-lab: kernel $(kernel_release), set up in $((SECONDS - t0)) s"
}

# Copies file $1 into the staging tree $2 at the same path, with every
# shared library it needs (ldd), once.
with_libs() {
  local f="$1" st="$2" l
  mkdir -p "$st$(dirname "$f")"
  cp -L "$f" "$st$f"
  for l in $(ldd "$f" 2>/dev/null | grep -o '/[^ ]*' | sort -u); do
    [ -e "$st$l" ] && continue
    mkdir -p "$st$(dirname "$l")"
    cp -L "$l" "$st$l"
  done
}

build() {
  local bin="${3:-}" tests="${4:-}"
  [ -n "$bin" ] || { echo "usage: lab.sh build DIR BIN [TESTS]" >&2; exit 2; }
  bin="$(cd "$bin" && pwd)"
  [ -x "$bin/ssock-ivshmem-server" ] || { echo "qemu-lab: $bin/ssock-ivshmem-server is missing" >&2; exit 1; }
  local kv st="$dir/staging" b m ko
  kv=$(kernel_release)
  [ -n "$kv" ] || { echo "qemu-lab: run 'lab.sh setup $dir' first" >&2; exit 1; }
  rm -rf "$st"
  mkdir -p "$st"/{bin,sbin,etc,proc,sys,dev,run,tmp}
  cp "$root/bin/busybox" "$st/bin/busybox"
  cp "$here/guest/init" "$st/init"
  cp "$here/guest/steps.sh" "$st/steps.sh"
  chmod 0755 "$st/init"
  # ssock: ssock-run finds libssock.so beside itself.
  for b in devd ssock-run ringstat; do
    [ -x "$bin/$b" ] || { echo "qemu-lab: $bin/$b is missing (cargo build --release)" >&2; exit 1; }
    with_libs "$bin/$b" "$st"
  done
  with_libs "$bin/libssock.so" "$st"
  # Their debug info is most of their size (a debug build's especially):
  # a smaller initramfs boots sooner.
  if command -v strip >/dev/null; then
    for b in devd ssock-run ringstat libssock.so; do strip --strip-debug "$st$bin/$b"; done
  fi
  # The real programs the steps run.
  for b in sockperf socat; do
    command -v "$b" >/dev/null || { echo "qemu-lab: $b is not installed" >&2; exit 1; }
    with_libs "$(command -v "$b")" "$st"
  done
  # The hwbackends unit tests (TESTS: their binary), which the verbs step
  # runs against the guest's soft-RoCE device.
  if [ -n "$tests" ]; then
    with_libs "$tests" "$st"
    cp "$tests" "$st/bin/ssock-hwbackends-tests"
    command -v strip >/dev/null && strip --strip-debug "$st/bin/ssock-hwbackends-tests"
  fi
  # RDMA: iproute2's rdma (to make an rxe device), libibverbs (which devd
  # loads when a config asks for verbs) and the rxe provider, as the host
  # has them (Debian: iproute2, libibverbs1, ibverbs-providers).
  local ib=/usr/lib/x86_64-linux-gnu
  if [ -e "$ib/libibverbs.so.1" ] && command -v rdma >/dev/null; then
    with_libs "$(command -v rdma)" "$st"
    # (iproute2's ip too: busybox's makes no dummy interface.)
    with_libs "$(command -v ip)" "$st"
    with_libs "$ib/libibverbs.so.1" "$st"
    for l in "$ib"/libibverbs/librxe-rdmav*.so; do with_libs "$l" "$st"; done
    mkdir -p "$st/etc/libibverbs.d"
    cp /etc/libibverbs.d/rxe.driver "$st/etc/libibverbs.d/"
  fi
  # Modules: sock_diag for TCP (devd's look-ups of sockets), soft-RoCE,
  # with what they depend on, as the guest's kernel has them.
  depmod -b "$root" "$kv"
  for m in inet_diag tcp_diag virtio_pci virtio_net vfio-pci vfio_iommu_type1 \
    crc32_generic crc32-pclmul rdma_rxe ib_uverbs dummy; do
    modprobe -d "$root" -S "$kv" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}'
  done | sort -u | while read -r ko; do
    mkdir -p "$st$(dirname "${ko#"$root"}")"
    cp "$ko" "$st${ko#"$root"}"
  done
  cp "$root/lib/modules/$kv"/modules.{order,builtin,builtin.modinfo} "$st/lib/modules/$kv/" 2>/dev/null || true
  depmod -b "$st" "$kv"
  # The users: root, and ssock for devd's run_as.
  printf 'root:x:0:0:root:/root:/bin/sh\nssock:x:999:999:ssock:/nonexistent:/bin/false\n' > "$st/etc/passwd"
  printf 'root:x:0:\nssock:x:999:\n' > "$st/etc/group"
  echo "$bin" > "$st/etc/ssock-bin"
  echo "$bin" > "$dir/bin"
  (cd "$st" && find . | cpio -o -H newc --quiet | gzip -1) > "$dir/initramfs.cpio.gz"
  echo "qemu-lab: initramfs $(du -sh "$st" | cut -f1) unpacked, $(stat -c %s "$dir/initramfs.cpio.gz") bytes"
}

# One guest: boot_guest NAME STEPS LOG [QEMU ARGS...]; its verdict.
boot_guest() {
  local name="$1" steps="$2" log="$3"
  shift 3
  local kv q t0=$SECONDS
  kv=$(kernel_release)
  q="$root/usr/bin/qemu-system-x86_64"
  [ -x "$q" ] && [ -f "$dir/initramfs.cpio.gz" ] || { echo "qemu-lab: run setup and build first" >&2; exit 1; }
  timeout "${SSOCK_QEMU_TIMEOUT:-600}" "$q" \
    -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" -L "$root/usr/lib/ipxe/qemu" \
    -machine q35,accel=tcg -cpu max -smp "${SSOCK_QEMU_SMP:-2}" -m "${SSOCK_QEMU_MEM:-1G}" \
    -nographic -no-reboot -nodefaults -serial stdio \
    -device intel-iommu,intremap=on,caching-mode=on \
    -kernel "$root/boot/vmlinuz-$kv" -initrd "$dir/initramfs.cpio.gz" \
    -append "console=ttyS0 intel_iommu=on panic=-1 quiet loglevel=4 ql=$steps qlname=$name" \
    "$@" < /dev/null > "$log" 2>&1 || true
  echo "qemu-lab: guest $name ran $((SECONDS - t0)) s ($steps)" | tee -a "$log"
  grep -q '^QL: done ok' "$log"
}

run() {
  local steps="${3:-}" log="${4:-}"
  [ -n "$steps" ] && [ -n "$log" ] || { echo "usage: lab.sh run DIR STEPS LOG [QEMU ARGS...]" >&2; exit 2; }
  shift 4
  boot_guest a "$steps" "$log" "$@"
}

pair() {
  local steps="${3:-}" log_a="${4:-}" log_b="${5:-}"
  [ -n "$steps" ] && [ -n "$log_a" ] && [ -n "$log_b" ] ||
    { echo "usage: lab.sh pair DIR STEPS LOG_A LOG_B" >&2; exit 2; }
  # The wire: each guest's virtio-net sends UDP to the other's port
  # (ports below the ephemeral range, from this script's pid, so two labs
  # at once do not cross).
  local pa=$((10000 + ($$ % 10000) * 2)) pb
  pb=$((pa + 1))
  # The window: an ivshmem server on this host hands both guests' devices
  # one shared memory and each other's doorbells (2 vectors each).
  local bin sock="$dir/ivshmem-$$.sock" srv
  bin=$(cat "$dir/bin")
  rm -f "$sock"
  "$bin/ssock-ivshmem-server" --socket "$sock" --size 8388608 --vectors 2 > "$dir/ivshmem-$$.log" 2>&1 < /dev/null &
  srv=$!
  # Whatever ends this (a failure, a signal), the server and the guests go.
  trap "kill \$(jobs -p) 2>/dev/null || true; rm -f '$sock' '$dir/ivshmem-$$.log'" EXIT
  trap 'exit 130' INT TERM
  local i=0
  while [ ! -S "$sock" ]; do
    i=$((i + 1))
    [ "$i" -lt 100 ] || { cat "$dir/ivshmem-$$.log" >&2; kill "$srv"; return 1; }
    sleep 0.05
  done
  local window=(-chardev "socket,path=$sock,id=ivsh" -device ivshmem-doorbell,chardev=ivsh,vectors=2)
  boot_guest a "$steps" "$log_a" -netdev "socket,id=n0,udp=127.0.0.1:$pb,localaddr=127.0.0.1:$pa" \
    -device virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:00:00:0a "${window[@]}" &
  local a=$!
  boot_guest b "$steps" "$log_b" -netdev "socket,id=n0,udp=127.0.0.1:$pa,localaddr=127.0.0.1:$pb" \
    -device virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:00:00:0b "${window[@]}" &
  local b=$! ok=0
  wait "$a" || ok=1
  wait "$b" || ok=1
  kill "$srv" 2>/dev/null || true
  wait "$srv" 2>/dev/null || true
  rm -f "$sock" "$dir/ivshmem-$$.log"
  return "$ok"
}

case "$what" in
  setup) setup ;;
  build) build "$@" ;;
  run) run "$@" ;;
  pair) pair "$@" ;;
  *) sed -n '2,25p' "$0" >&2; exit 2 ;;
esac
