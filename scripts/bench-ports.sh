#!/usr/bin/env bash
# Published-port throughput and connection rate through netfence and through passt's port
# forwarding, in the same run, with CPU cost.
#
#   scripts/bench-ports.sh [--time SECS] [--conns N] [--only netfence|passt] [--no-build]
#
# The test guest (scripts/build-guest.sh) boots twice under QEMU TCG, once per backend, and
# serves: iperf3 -s on its port 5201, busybox httpd on its port 81 (an empty page), and waits
# on its port 9000 to be released. Each backend forwards the
# host's 127.0.0.1 ports to those:
#   netfence  -p 127.0.0.1:P:5201 -p 127.0.0.1:C:81 -p 127.0.0.1:R:9000 (vhost-user)
#   passt     -t 127.0.0.1/P:5201 ... (socket mode, -netdev stream)
# From the host it runs, per backend:
#   iperf3 -c 127.0.0.1 -p P -t SECS (default 10)       host->guest
#   iperf3 -c 127.0.0.1 -p P -t SECS -R                 guest->host
#   N (default 300) HTTP/1.0 requests to C, one connection each, one after another
# and prints MB/s (10^6 bytes/s, iperf3's receiver), the backend process's CPU seconds per GB
# (utime+stime from /proc/PID/stat around each run) and QEMU's for context, connections per
# second and the backend's CPU milliseconds per connection, then the netfence/passt ratios.
# It prints figures and never fails on a time; it exits 1 only when a leg could not run at all.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECS=10
CONNS=300
ONLY=""
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --time) SECS="${2:?}"; shift 2 ;;
        --conns) CONNS="${2:?}"; shift 2 ;;
        --only) ONLY="${2:?}"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "bench-ports.sh: unknown argument '$1'" >&2; exit 2 ;;
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
bench_workdir bench-ports

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

GUEST_SCRIPT='udhcpc -i eth0 -n -q -t 5 -T 1 >/dev/null 2>&1 || { echo BENCH-FAIL dhcp; exit 1; }
iperf3 -s -p 5201 -D || { echo BENCH-FAIL iperf3; exit 1; }
mkdir -p /www && : >/www/index.html && httpd -p 81 -h /www || { echo BENCH-FAIL httpd; exit 1; }
echo BENCH-READY
nc -l -p 9000 >/dev/null
echo BENCH-RELEASED'

# connections PORT N -> "ok seconds": N sequential HTTP/1.0 requests, a connection each.
connections() {
    python3 - "$1" "$2" <<'EOF'
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
ok = 0
start = time.monotonic()
for _ in range(n):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        while s.recv(4096):
            pass
        s.close()
        ok += 1
    except OSError:
        pass
print(ok, time.monotonic() - start)
EOF
}

# iperf_run PORT [-R] -> "bytes seconds" (the receiver's figures)
iperf_run() {
    iperf3 -c 127.0.0.1 -p "$1" -t "$SECS" -J "${@:2}" 2>/dev/null | python3 -c '
import json, sys
try:
    r = json.load(sys.stdin)["end"]["sum_received"]
    print(int(r["bytes"]), r["seconds"])
except Exception:
    print("n/a n/a")'
}

# run_leg NAME BACKEND_PIDFILE DATA_PORT CONN_PORT RELEASE_PORT -- run-guest.sh args...
# Boots the guest, waits for it to serve, runs the three measurements with CPU samples, and
# writes "what bytes_or_conns seconds backend_s qemu_s" lines to $WORK/NAME.figures.
run_leg() {
    local name="$1" pidfile="$2" data="$3" conn="$4" release="$5"
    shift 6
    local qpid="$WORK/$name.qemu.pid" console="$WORK/$name.console"
    : >"$console"
    : >"$WORK/$name.figures"
    "$ROOT/scripts/run-guest.sh" --timeout $((SECS * 2 + CONNS / 5 + 180)) --qemu-pidfile "$qpid" \
        --script-text "$GUEST_SCRIPT" "$@" 2>&1 | sed -u 's/\r$//' | tee "$console" |
        sed -u "s/^/  [$name] /" &
    local guest=$!
    for _ in $(seq 1 900); do
        grep -q "BENCH-READY\|BENCH-FAIL\|NETFENCE-GUEST-END" "$console" && break
        kill -0 "$guest" 2>/dev/null || break
        sleep 0.2
    done
    if grep -q BENCH-READY "$console"; then
        local b0 q0 b1 q1 out
        for what in up down conns; do
            b0=$(cpu_ticks "$(cat "$pidfile" 2>/dev/null)")
            q0=$(cpu_ticks "$(cat "$qpid" 2>/dev/null)")
            case "$what" in
                up) out="$(iperf_run "$data")" ;;
                down) out="$(iperf_run "$data" -R)" ;;
                conns) out="$(connections "$conn" "$CONNS")" ;;
            esac
            b1=$(cpu_ticks "$(cat "$pidfile" 2>/dev/null)")
            q1=$(cpu_ticks "$(cat "$qpid" 2>/dev/null)")
            echo "$what $out $(awk -v a="$b0" -v b="$b1" -v t="$TCK" 'BEGIN { printf "%.2f", (b - a) / t }') $(awk -v a="$q0" -v b="$q1" -v t="$TCK" 'BEGIN { printf "%.2f", (b - a) / t }')" >>"$WORK/$name.figures"
            echo "  [$name] $what: $out"
        done
    fi
    (exec 3<>"/dev/tcp/127.0.0.1/$release" && echo done >&3) 2>/dev/null || true
    wait "$guest" || true
    grep -q BENCH-RELEASED "$console"
}

LEGS=()

# --- netfence -----------------------------------------------------------------------------------
if [ "$ONLY" != passt ]; then
    echo "== netfence leg"
    if [ ! -x "$NETFENCE" ]; then
        echo "bench-ports.sh: $NETFENCE missing (cargo build --release)" >&2
    else
        D=$(free_port) C=$(free_port) R=$(free_port)
        SOCK="$WORK/netfence.sock"
        NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$NETFENCE" run --socket "$SOCK" \
            -p "$D:5201" -p "$C:81" -p "$R:9000" >"$WORK/netfence.log" 2>&1 &
        NF_PID=$!
        PIDS+=("$NF_PID")
        echo "$NF_PID" >"$WORK/netfence.pid"
        for _ in $(seq 1 100); do
            grep -q "listening on" "$WORK/netfence.log" 2>/dev/null && break
            kill -0 "$NF_PID" 2>/dev/null || break
            sleep 0.05
        done
        if grep -q "listening on" "$WORK/netfence.log"; then
            run_leg netfence "$WORK/netfence.pid" "$D" "$C" "$R" -- \
                --vhost-user "$SOCK" --mac 52:54:00:4e:46:02 &&
                LEGS+=(netfence) || echo "bench-ports.sh: netfence leg failed" >&2
        else
            echo "bench-ports.sh: netfence did not start listening:" >&2
            cat "$WORK/netfence.log" >&2
        fi
        kill "$NF_PID" 2>/dev/null || true
        echo "  netfence log (warnings):"
        grep -E "WARN|ERROR|panick" "$WORK/netfence.log" | tail -n 20 | sed 's/^/    /' || true
    fi
fi

# --- passt --------------------------------------------------------------------------------------
if [ "$ONLY" != netfence ]; then
    echo "== passt leg"
    D=$(free_port) C=$(free_port) R=$(free_port)
    run_leg passt "$WORK/passt.pid" "$D" "$C" "$R" -- --passt --passt-pidfile "$WORK/passt.pid" \
        --passt-tcp "127.0.0.1/$D:5201" --passt-tcp "127.0.0.1/$C:81" --passt-tcp "127.0.0.1/$R:9000" &&
        LEGS+=(passt) || echo "bench-ports.sh: passt leg failed" >&2
fi

# --- figures ------------------------------------------------------------------------------------
echo
echo "== bench-ports: host 127.0.0.1 -> published guest ports (iperf3 ${SECS}s each way; $CONNS connections)"
echo "   QEMU TCG, 1 vCPU, 512 MiB, virtio-net-pci vectors=0; host: $(nproc) CPUs, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
printf '%-9s %-12s %9s %13s %10s\n' backend run "MB/s" backend-s/GB qemu-s/GB
declare -A RATE COST
for name in netfence passt; do
    [ "$ONLY" = "" ] || [ "$ONLY" = "$name" ] || continue
    for what in up down; do
        read -r _ bytes secs bs qs <<<"$(grep "^$what " "$WORK/$name.figures" 2>/dev/null || echo "x n/a n/a n/a n/a")"
        label="host->guest"
        [ "$what" = down ] && label="guest->host"
        mbs="$(awk -v b="$bytes" -v s="$secs" 'BEGIN { if (b == "n/a" || s == "n/a" || s == 0) print "n/a"; else printf "%.1f", b / s / 1e6 }')"
        gb="$(per "$bytes" 1000000000)"
        RATE[$name.$what]="$mbs"
        COST[$name.$what]="$(per "$bs" "$gb")"
        printf '%-9s %-12s %9s %13s %10s\n' "$name" "$label" "$mbs" "${COST[$name.$what]}" "$(per "$qs" "$gb")"
    done
done
printf '%-9s %10s %10s %18s\n' backend conns/s "ok" backend-ms/conn
for name in netfence passt; do
    [ "$ONLY" = "" ] || [ "$ONLY" = "$name" ] || continue
    read -r _ ok secs bs _ <<<"$(grep "^conns " "$WORK/$name.figures" 2>/dev/null || echo "x n/a n/a n/a n/a")"
    RATE[$name.conns]="$(awk -v n="$ok" -v s="$secs" 'BEGIN { if (n == "n/a" || s == "n/a" || s == 0) print "n/a"; else printf "%.1f", n / s }')"
    COST[$name.conns]="$(awk -v c="$bs" -v n="$ok" 'BEGIN { if (c == "n/a" || n == "n/a" || n == 0) print "n/a"; else printf "%.2f", c * 1000 / n }')"
    printf '%-9s %10s %10s %18s\n' "$name" "${RATE[$name.conns]}" "$ok/$CONNS" "${COST[$name.conns]}"
done
if [ -z "$ONLY" ]; then
    for what in up down conns; do
        label="host->guest"
        [ "$what" = down ] && label="guest->host"
        [ "$what" = conns ] && label="connections"
        echo "netfence/passt $label: rate x$(ratio "${RATE[netfence.$what]}" "${RATE[passt.$what]}"), backend CPU x$(ratio "${COST[netfence.$what]}" "${COST[passt.$what]}")"
    done
fi

want=2
[ -n "$ONLY" ] && want=1
[ "${#LEGS[@]}" -eq "$want" ] || exit 1
