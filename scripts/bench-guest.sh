#!/usr/bin/env bash
# Guest TCP throughput through netfence and through passt, in the same run, with CPU cost.
#
#   scripts/bench-guest.sh [--time SECS] [--only netfence|passt] [--no-build]
#
# One iperf3 server listens on the host's 127.0.0.1. The test guest (scripts/build-guest.sh)
# boots twice under QEMU TCG, once per backend, and runs iperf3 -c for SECS (default 10) in each
# direction:
#   netfence  vhost-user; the guest dials 203.0.113.9:PORT, which `--map` sends to 127.0.0.1:PORT
#             (a documentation address judged "public" by the default policy)
#   passt     Debian's passt in socket mode (-netdev stream); the guest dials passt's gateway,
#             198.51.100.1:PORT, which passt sends to the host's 127.0.0.1:PORT
# For each backend and direction it prints Mbit/s (iperf3's receiver figure), the backend
# process's CPU seconds (utime+stime from /proc/PID/stat, sampled when the guest starts and
# ends each iperf3 run) per GB moved (10^9 bytes), QEMU's CPU per GB for context, and the
# netfence/passt ratios. It prints figures and never fails on a time; it exits 1 only when a
# leg could not run at all.
#
# Both legs use the same guest and the same virtio-net-pci (vectors=0), so the difference is
# the backend (and where the virtio work happens: in netfence's process for vhost-user, in
# QEMU for -netdev stream).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECS=10
ONLY=""
BUILD=1
PORT="${BENCH_PORT:-5201}"
while [ $# -gt 0 ]; do
    case "$1" in
        --time) SECS="${2:?}"; shift 2 ;;
        --only) ONLY="${2:?}"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "bench-guest.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done

if [ "$BUILD" = 1 ]; then
    "$ROOT/scripts/install-deps.sh"
    "$ROOT/scripts/build-guest.sh"
    [ "$ONLY" = passt ] || (cd "$ROOT" && cargo build --release --quiet)
fi
NETFENCE="${CARGO_TARGET_DIR:-$ROOT/target}/release/netfence"

# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
bench_workdir bench-guest

iperf3 -s -B 127.0.0.1 -p "$PORT" >"$WORK/iperf3-server.log" 2>&1 &
IPERF_PID=$!
PIDS+=("$IPERF_PID")
listening() { [ -n "$(ss -Hltn "sport = :$PORT" 2>/dev/null)" ]; }
for _ in $(seq 1 50); do
    listening && break
    sleep 0.1
done
listening ||
    { echo "bench-guest.sh: iperf3 server did not start:" >&2; cat "$WORK/iperf3-server.log" >&2; exit 1; }

guest_script() { # $1 = destination address as the guest sees it
    cat <<EOF
udhcpc -i eth0 -n -q -t 5 -T 1 >/dev/null 2>&1 || { echo BENCH-FAIL dhcp; exit 1; }
echo BENCH-MARK up
iperf3 -c $1 -p $PORT -t $SECS -f m 2>&1 | grep -E 'sender|receiver|error'
echo BENCH-MARK down
iperf3 -c $1 -p $PORT -t $SECS -f m -R 2>&1 | grep -E 'sender|receiver|error'
echo BENCH-MARK done
EOF
}

LEGS=()

# --- netfence -----------------------------------------------------------------------------------
if [ "$ONLY" != passt ]; then
    echo "== netfence leg"
    if [ ! -x "$NETFENCE" ]; then
        echo "bench-guest.sh: $NETFENCE missing (cargo build --release)" >&2
    else
        SOCK="$WORK/netfence.sock"
        NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$NETFENCE" run --socket "$SOCK" \
            --map "203.0.113.9:$PORT=127.0.0.1:$PORT" >"$WORK/netfence.log" 2>&1 &
        NF_PID=$!
        PIDS+=("$NF_PID")
        echo "$NF_PID" >"$WORK/netfence.pid"
        for _ in $(seq 1 100); do
            grep -q "listening on" "$WORK/netfence.log" 2>/dev/null && break
            kill -0 "$NF_PID" 2>/dev/null || break
            sleep 0.05
        done
        if grep -q "listening on" "$WORK/netfence.log"; then
            guest_script 203.0.113.9 >"$WORK/netfence.sh"
            run_leg netfence "$WORK/netfence.pid" $((SECS * 2 + 90)) -- --vhost-user "$SOCK" --mac 52:54:00:4e:46:02 --script "$WORK/netfence.sh" &&
                LEGS+=(netfence) || echo "bench-guest.sh: netfence leg failed (guest exit $?)" >&2
        else
            echo "bench-guest.sh: netfence did not start listening:" >&2
        fi
        kill "$NF_PID" 2>/dev/null || true
        echo "  netfence log (decisions and warnings):"
        grep -E "decision|WARN|ERROR|panick" "$WORK/netfence.log" | tail -n 20 | sed 's/^/    /' || true
    fi
fi

# --- passt --------------------------------------------------------------------------------------
if [ "$ONLY" != netfence ]; then
    echo "== passt leg"
    guest_script 198.51.100.1 >"$WORK/passt.sh"
    run_leg passt "$WORK/passt.pid" $((SECS * 2 + 90)) -- --passt --passt-pidfile "$WORK/passt.pid" --script "$WORK/passt.sh" &&
        LEGS+=(passt) || echo "bench-guest.sh: passt leg failed (guest exit $?)" >&2
fi

# --- figures ------------------------------------------------------------------------------------
# figures NAME DIR -> "Mbit/s GB backend_s qemu_s" (n/a fields when missing)
figures() {
    local name="$1" dir="$2" from to nth
    case "$dir" in up) from=up; to=down; nth=1 ;; down) from=down; to=done; nth=2 ;; esac
    local recv
    recv="$(grep -a 'receiver' "$WORK/$name.console" 2>/dev/null | sed -n "${nth}p")"
    awk -v recv="$recv" -v from="$from" -v to="$to" -v tck="$TCK" '
        $1 == from { b0 = $2; q0 = $3; f = 1 }
        $1 == to   { b1 = $2; q1 = $3; t = 1 }
        END {
            # iperf3 -f m still scales the byte count (KBytes/MBytes/GBytes, powers of 1024)
            n = split(recv, w, " "); bytes = "n/a"; mbits = "n/a"
            for (i = 2; i <= n; i++) {
                if (w[i] == "KBytes") bytes = w[i - 1] * 1024
                if (w[i] == "MBytes") bytes = w[i - 1] * 1048576
                if (w[i] == "GBytes") bytes = w[i - 1] * 1073741824
                if (w[i] == "Mbits/sec") mbits = w[i - 1]
                if (w[i] == "Gbits/sec") mbits = w[i - 1] * 1000
            }
            gb = (bytes == "n/a") ? "n/a" : bytes / 1e9
            bs = (f && t) ? (b1 - b0) / tck : "n/a"
            qs = (f && t) ? (q1 - q0) / tck : "n/a"
            print mbits, gb, bs, qs
        }' "$WORK/$name.marks" 2>/dev/null || echo "n/a n/a n/a n/a"
}

echo
echo "== bench-guest: guest iperf3 -c (TCP, ${SECS}s each way) to iperf3 -s on host 127.0.0.1:$PORT"
echo "   QEMU TCG, 1 vCPU, 512 MiB, virtio-net-pci vectors=0; host: $(nproc) CPUs, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
printf '%-9s %-12s %8s %8s %14s %13s %10s\n' backend direction Mbit/s GB backend-cpu-s backend-s/GB qemu-s/GB
declare -A MB SG
for name in netfence passt; do
    [ "$ONLY" = "" ] || [ "$ONLY" = "$name" ] || continue
    for dir in up down; do
        read -r mbits gb bs qs <<<"$(figures "$name" "$dir")"
        label="guest->host"
        [ "$dir" = down ] && label="host->guest"
        bsg="$(per "$bs" "$gb")"
        qsg="$(per "$qs" "$gb")"
        MB[$name.$dir]="$mbits"
        SG[$name.$dir]="$bsg"
        printf '%-9s %-12s %8s %8s %14s %13s %10s\n' "$name" "$label" "$mbits" \
            "$(awk -v g="$gb" 'BEGIN { if (g == "n/a") print g; else printf "%.3f", g }')" \
            "$(awk -v s="$bs" 'BEGIN { if (s == "n/a") print s; else printf "%.2f", s }')" "$bsg" "$qsg"
    done
done
if [ -z "$ONLY" ]; then
    for dir in up down; do
        label="guest->host"
        [ "$dir" = down ] && label="host->guest"
        echo "netfence/passt $label: throughput x$(ratio "${MB[netfence.$dir]}" "${MB[passt.$dir]}"), backend CPU per GB x$(ratio "${SG[netfence.$dir]}" "${SG[passt.$dir]}")"
    done
fi

want=2
[ -n "$ONLY" ] && want=1
[ "${#LEGS[@]}" -eq "$want" ] || exit 1
