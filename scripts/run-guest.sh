#!/usr/bin/env bash
# Boot the test guest (scripts/build-guest.sh) under QEMU TCG, run a shell script in it, power off.
#
#   scripts/run-guest.sh --vhost-user SOCK  (--script FILE | --script-text TEXT) [options]
#   scripts/run-guest.sh --passt            (--script FILE | --script-text TEXT) [options]
#
# Network (exactly one):
#   --vhost-user SOCK   attach a virtio-net-pci to the vhost-user backend listening on SOCK
#                       (netfence run --socket SOCK). Guest RAM is a shared memfd, as vhost-user needs.
#   --passt             start Debian's passt in socket mode and attach with -netdev stream. passt
#                       hands out 192.0.2.2 via DHCP with gateway 192.0.2.1 (documentation range, so
#                       the host's own addresses never matter); TCP/UDP from the guest to the gateway
#                       go to the host's 127.0.0.1. IPv4 only, no DNS servers handed out.
#   --slirp             QEMU's own user-mode network (-netdev user, "slirp"): the guest gets
#                       10.0.2.15 by DHCP and reaches the host's 127.0.0.1 as 10.0.2.2. Nothing
#                       stops it reaching other addresses: run it in a network namespace with
#                       only loopback (bench.sh does: unshare -n).
#   --none              no network device (boot test only)
# Options:
#   --timeout SECS      kill QEMU after SECS (default 120): a hung guest cannot hang CI
#   --mac MAC           guest MAC (default 52:54:00:4e:46:02, netfence's --guest-mac default:
#                       netfence drops frames from any other MAC)
#   --append ARGS       extra kernel command-line arguments
#   --passt-pidfile F   write passt's pid to F (bench-guest.sh reads its CPU time)
#   --passt-tcp SPEC    forward host TCP ports into the guest with passt's `-t SPEC`, e.g.
#                       127.0.0.1/5202:5201 (repeatable; default none)
#   --qemu-pidfile F    write QEMU's pid to F
#   --passt-mtu N       passt's -m (default 1500; passt's own default is 65520)
#   --queues N          vhost-user only: N queue pairs (-netdev queues=N, -device mq=on; netfence
#                       run --queues N); the guest uses min(N, vCPUs) of them
#   --smp N             vCPUs (default 1)
# Environment: NETFENCE_GUEST_DIR (default target/guest), QEMU (default qemu-system-x86_64),
#   QEMU_CPU (default qemu64: under TCG it moves ~2.5x the bytes per second that -cpu max does).
#
# The guest console goes to stdout. Exit status: the guest script's own exit status when the
# guest printed its end marker (NETFENCE-GUEST-END rc=N), 124 on timeout, 125 when QEMU or passt
# failed before that.
#
# Why these QEMU flags (see TESTING.md): -accel tcg because the host KVM cannot boot a stock
# kernel; vectors=0 because QEMU 7.2 under TCG segfaults starting a vhost-user virtio-net-pci with
# MSI-X; memory-backend-memfd,share=on + -numa so the backend can map guest RAM; -nodefaults so
# no default NIC (QEMU's user-mode network) ever appears next to ours.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GUEST="${NETFENCE_GUEST_DIR:-$ROOT/target/guest}"
QEMU="${QEMU:-qemu-system-x86_64}"

MODE=""
SOCK=""
SCRIPT_TEXT=""
HAVE_SCRIPT=0
TIMEOUT=120
MAC="52:54:00:4e:46:02"
APPEND=""
PASST_PIDFILE=""
QEMU_PIDFILE=""
PASST_TCP=()
PASST_MTU=1500
MEM=512
QUEUES=1
SMP=1

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --vhost-user) MODE=vhost-user; SOCK="${2:?--vhost-user needs a socket path}"; shift 2 ;;
        --passt) MODE=passt; shift ;;
        --slirp) MODE=slirp; shift ;;
        --none) MODE=none; shift ;;
        --script) SCRIPT_TEXT="$(cat "${2:?--script needs a file}")"; HAVE_SCRIPT=1; shift 2 ;;
        --script-text) SCRIPT_TEXT="${2?}"; HAVE_SCRIPT=1; shift 2 ;;
        --timeout) TIMEOUT="${2:?}"; shift 2 ;;
        --mac) MAC="${2:?}"; shift 2 ;;
        --append) APPEND="${2?}"; shift 2 ;;
        --passt-pidfile) PASST_PIDFILE="${2:?}"; shift 2 ;;
        --passt-tcp) PASST_TCP+=(-t "${2:?}"); shift 2 ;;
        --qemu-pidfile) QEMU_PIDFILE="${2:?}"; shift 2 ;;
        --passt-mtu) PASST_MTU="${2:?}"; shift 2 ;;
        --queues) QUEUES="${2:?}"; shift 2 ;;
        --smp) SMP="${2:?}"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "run-guest.sh: unknown argument '$1'" >&2; usage ;;
    esac
done
[ -n "$MODE" ] || { echo "run-guest.sh: give --vhost-user SOCK, --passt, --slirp or --none" >&2; usage; }
[ "$HAVE_SCRIPT" = 1 ] || { echo "run-guest.sh: give --script FILE or --script-text TEXT" >&2; usage; }
for f in vmlinuz initramfs.cpio.gz; do
    [ -f "$GUEST/$f" ] || { echo "run-guest.sh: $GUEST/$f missing; run scripts/build-guest.sh" >&2; exit 125; }
done
command -v "$QEMU" >/dev/null || { echo "run-guest.sh: $QEMU not found; run scripts/install-deps.sh" >&2; exit 125; }

# The script travels base64-encoded on the kernel command line (x86 allows 2048 bytes in all);
# gzip it first when plain base64 would not fit.
B64="$(printf '%s\n' "$SCRIPT_TEXT" | base64 -w0)"
if [ "${#B64}" -gt 1500 ]; then
    B64="$(printf '%s\n' "$SCRIPT_TEXT" | gzip -9n | base64 -w0)"
fi
if [ "${#B64}" -gt 1700 ]; then
    echo "run-guest.sh: script too long for the kernel command line (${#B64} bytes of base64 after gzip)" >&2
    exit 2
fi

# maxcpus of at least 2, even for one vCPU: QEMU's TCG believes a lone vCPU has guest memory to
# itself and then leaves out the guest's memory barriers (and makes its locked instructions
# plain ones). A vhost-user backend reads that memory from another thread, and the virtio
# notification handshake needs those barriers: without them the guest now and then misses
# that netfence asked for a kick, and its TX queue waits for ever (seen about once in 30
# iperf3 runs). With maxcpus=2, TCG emits them.
MAXCPUS=$(( SMP > 2 ? SMP : 2 ))

WORK="$(mktemp -d "${TMPDIR:-/tmp}/netfence-guest.XXXXXX")"
PASST_PID=""
QEMU_PID=""
cleanup() {
    [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null || true
    if [ -n "$PASST_PID" ]; then
        kill "$PASST_PID" 2>/dev/null || true
        wait "$PASST_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

NET=()
case "$MODE" in
    vhost-user)
        [ -S "$SOCK" ] || { echo "run-guest.sh: $SOCK is not a socket (is netfence running?)" >&2; exit 125; }
        MQ_NETDEV=""
        MQ_DEVICE=""
        if [ "$QUEUES" -gt 1 ]; then
            MQ_NETDEV=",queues=$QUEUES"
            MQ_DEVICE=",mq=on"
        fi
        NET=(-chardev "socket,id=c0,path=$SOCK"
             -netdev "vhost-user,id=n0,chardev=c0$MQ_NETDEV"
             -device "virtio-net-pci,netdev=n0${MAC:+,mac=$MAC},vectors=0$MQ_DEVICE")
        ;;
    passt)
        command -v passt >/dev/null || { echo "run-guest.sh: passt not found; run scripts/install-deps.sh" >&2; exit 125; }
        # Started as root, passt drops to nobody before it binds its socket: give it a directory
        # it may write to.
        mkdir -m 0755 "$WORK/passt"
        [ "$(id -u)" = 0 ] && chown 65534 "$WORK/passt" && chmod 0711 "$WORK"
        PSOCK="$WORK/passt/passt.sock"
        # -4: IPv4 only; -D none / --no-dhcp-search: no resolvers handed out (nothing to leak);
        # -a/-n/-g/-M: a fixed documentation-range setup independent of the host's interfaces;
        # -1: exit when QEMU disconnects; -f: stay in the foreground so we own the process;
        # gateway mapping (not disabled) sends guest->198.51.100.1 TCP/UDP to the host's 127.0.0.1.
        [ "${#PASST_TCP[@]}" -gt 0 ] || PASST_TCP=(-t none)
        passt -f -1 -q -4 -D none --no-dhcp-search -s "$PSOCK" \
            -a 198.51.100.2 -n 24 -g 198.51.100.1 -m "$PASST_MTU" "${PASST_TCP[@]}" -u none \
            >"$WORK/passt.log" 2>&1 &
        PASST_PID=$!
        [ -n "$PASST_PIDFILE" ] && echo "$PASST_PID" >"$PASST_PIDFILE"
        for _ in $(seq 1 100); do
            [ -S "$PSOCK" ] && break
            kill -0 "$PASST_PID" 2>/dev/null || break
            sleep 0.05
        done
        if [ ! -S "$PSOCK" ]; then
            echo "run-guest.sh: passt did not create $PSOCK:" >&2
            cat "$WORK/passt.log" >&2
            exit 125
        fi
        NET=(-netdev "stream,id=n0,server=off,addr.type=unix,addr.path=$PSOCK"
             -device "virtio-net-pci,netdev=n0${MAC:+,mac=$MAC},vectors=0")
        ;;
    slirp)
        NET=(-netdev user,id=n0
             -device "virtio-net-pci,netdev=n0${MAC:+,mac=$MAC},vectors=0")
        ;;
    none) NET=() ;;
esac

# In passt mode the guest speaks IPv4 only, like passt -4.
EXTRA=""
[ "$MODE" = passt ] && EXTRA="ipv6.disable=1"
CMDLINE="console=ttyS0 quiet loglevel=3 panic=-1 $EXTRA $APPEND script=$B64"

START=$(date +%s.%N)
# The serial console goes to our stdout and, through the chardev's logfile, to console.log,
# where the end marker is looked for afterwards.
set +e
timeout --kill-after=5 "$TIMEOUT" "$QEMU" \
    -accel tcg -machine pc -cpu "${QEMU_CPU:-qemu64}" -smp "$SMP,maxcpus=$MAXCPUS" -m "$MEM" \
    -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on" -numa node,memdev=mem \
    -nodefaults -no-user-config -display none -monitor none \
    -chardev "stdio,id=con,signal=off,logfile=$WORK/console.log" -serial chardev:con \
    -no-reboot ${QEMU_PIDFILE:+-pidfile "$QEMU_PIDFILE"} \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" -append "$CMDLINE" \
    "${NET[@]}" </dev/null &
QEMU_PID=$!
wait "$QEMU_PID"
QRC=$?
set -e
QEMU_PID=""
END=$(date +%s.%N)

ELAPSED=$(awk -v a="$START" -v b="$END" 'BEGIN{printf "%.1f", b-a}')
RC_LINE="$(grep -a -o 'NETFENCE-GUEST-END rc=[0-9]*' "$WORK/console.log" | tail -n1 || true)"
if [ -n "$RC_LINE" ]; then
    RC="${RC_LINE##*rc=}"
    echo "run-guest.sh: guest finished rc=$RC in ${ELAPSED}s" >&2
    exit "$RC"
fi
if [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then
    echo "run-guest.sh: TIMEOUT after ${TIMEOUT}s, guest killed" >&2
    exit 124
fi
echo "run-guest.sh: QEMU exited ($QRC) without the guest's end marker after ${ELAPSED}s" >&2
if [ -n "$PASST_PID" ] && [ -s "$WORK/passt.log" ]; then
    echo "run-guest.sh: passt log:" >&2
    cat "$WORK/passt.log" >&2
fi
exit 125
