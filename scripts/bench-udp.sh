#!/usr/bin/env bash
# Guest->host UDP packets per second through netfence, its CPU per frame, and the kernel's own
# cost of sending the same datagrams to the same sink (the floor netfence sits on), in one run.
#
#   scripts/bench-udp.sh [--time SECS] [--sizes "64 1400"] [--no-build] [NETFENCE_BINARY...]
#
# Each binary given (default: this checkout's release build) is measured in turn, so an older
# build can be put beside a newer one in the same run. Per binary and frame size:
#   - netfence runs with one allow rule for 198.18.0.2:udp:9 (default deny) and a --map of it to
#     a loopback sink, exactly as tests/frontend_dpdk.rs does;
#   - dpdk-testpmd (net_virtio_user on netfence's socket, txonly) sends frames of SIZE bytes
#     (Ethernet, so SIZE-42 bytes of UDP payload) from 172.16.0.2:9 to 198.18.0.2:9;
#   - after a warm-up, for SECS seconds (default 10): datagrams that reached the sink, and
#     netfence's CPU (utime+stime from /proc/PID/stat).
# The sink is a loopback UDP socket that is never read, with a small receive buffer: what
# arrives is counted by the kernel (its drops column in /proc/net/udp, plus what is queued), so
# the sink costs no CPU of its own. The floor: a C loop (built here with cc) that sends the same
# payloads to the same sink from a connected socket, sendmmsg of 256 per call, and again as UDP
# GSO sends of 64 segments; its CPU per datagram from getrusage.
# testpmd's poll loop takes one of the machine's CPUs: read netfence's CPU per frame, not only
# packets per second. Prints figures and ratios; never fails on a time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECS=10
SIZES="64 1400"
BUILD=1
BINARIES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --time) SECS="${2:?}"; shift 2 ;;
        --sizes) SIZES="${2:?}"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        -*) echo "bench-udp.sh: unknown argument '$1'" >&2; exit 2 ;;
        *) BINARIES+=("$1"); shift ;;
    esac
done

if [ "$BUILD" = 1 ]; then
    "$ROOT/scripts/install-deps.sh" >/dev/null
    (cd "$ROOT" && cargo build --release --bin netfence)
fi
[ ${#BINARIES[@]} -gt 0 ] || BINARIES=("$ROOT/target/release/netfence")
command -v dpdk-testpmd >/dev/null || { echo "dpdk-testpmd missing: run scripts/install-deps.sh" >&2; exit 1; }
"$ROOT/scripts/hugepages.sh" >/dev/null

WORK="$(mktemp -d /tmp/bench-udp.XXXXXX)"
PIDS=()
cleanup() {
    exec 7>&- 8>&- # the sink and testpmd leave when their stdin closes
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
[ -n "${BENCH_UDP_KEEP:-}" ] && trap - EXIT
TCK="$(getconf CLK_TCK)"
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
per() { awk -v a="$1" -v b="$2" -v f="${3:-%.2f}" 'BEGIN { if (a == "n/a" || b == "n/a" || b == 0) print "n/a"; else printf f "\n", a / b }'; }

# ---- the floor and the sink's counter, in C ------------------------------------------------
cat >"$WORK/udpfloor.c" <<'EOF'
/* udpfloor send PORT PAYLOAD COUNT MODE: sends COUNT datagrams of PAYLOAD bytes to
 * 127.0.0.1:PORT from a connected socket, MODE "mmsg" (sendmmsg, 256 per call) or "gso"
 * (UDP_SEGMENT sends of 64 segments); prints "cpu_seconds sent".
 * udpfloor sink: binds 127.0.0.1:0 with a small receive buffer, prints its port and holds it
 * until stdin closes. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#define BATCH 256
#define SEGS 64

static double cpu(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

int main(int argc, char **argv) {
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (argc == 2 && !strcmp(argv[1], "sink")) {
        int small = 4096;
        setsockopt(s, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
        socklen_t len = sizeof a;
        if (bind(s, (void *)&a, sizeof a) || getsockname(s, (void *)&a, &len)) return 1;
        printf("%d\n", ntohs(a.sin_port));
        fflush(stdout);
        char c;
        while (read(0, &c, 1) > 0) {}
        return 0;
    }
    if (argc != 6 || strcmp(argv[1], "send")) return 2;
    a.sin_port = htons(atoi(argv[2]));
    size_t payload = atoi(argv[3]);
    long count = atol(argv[4]);
    int gso = !strcmp(argv[5], "gso");
    if (connect(s, (void *)&a, sizeof a)) return 1;
    static char data[BATCH][65536];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    for (int i = 0; i < BATCH; i++) {
        memset(data[i], i, payload);
        iov[i].iov_base = data[i];
        iov[i].iov_len = payload;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    long sent = 0;
    double t0 = cpu();
    if (gso) {
        int seg = payload;
        if (setsockopt(s, SOL_UDP, UDP_SEGMENT, &seg, sizeof seg)) return 1;
        int per = SEGS;
        while ((size_t)per * payload > 65507) per--;
        struct msghdr m = { .msg_iov = iov, .msg_iovlen = per };
        while (sent < count) {
            ssize_t n = sendmsg(s, &m, 0);
            if (n > 0) sent += n / payload;
        }
    } else {
        while (sent < count) {
            int n = sendmmsg(s, msgs, BATCH, 0);
            if (n > 0) sent += n;
        }
    }
    printf("%.4f %ld\n", cpu() - t0, sent);
    return 0;
}
EOF
cc -O2 -o "$WORK/udpfloor" "$WORK/udpfloor.c"

# Datagrams that reached the sink on PORT: the kernel's drops for it plus what it has queued
# (at most a few, the buffer is small).
arrived() {
    awk -v port="$(printf '%04X' "$1")" '
        NR > 1 { split($2, l, ":"); if (l[2] == port) { print $NF; found = 1 } }
        END { if (!found) print 0 }' /proc/net/udp
}

start_sink() {
    mkfifo "$WORK/sink.in"
    "$WORK/udpfloor" sink <"$WORK/sink.in" >"$WORK/sink.port" &
    PIDS+=($!)
    exec 7>"$WORK/sink.in"
    for _ in $(seq 50); do [ -s "$WORK/sink.port" ] && break; sleep 0.1; done
}

# testpmd's forwarding lcore on CPU 0, its main lcore on CPU 1 (as tests/common/dpdk.rs does).
first_cpu=0
second_cpu=$(( $(nproc) > 1 ? 1 : 0 ))

# run_leg BINARY SIZE: prints "pps cpu_us_per_frame frames"
run_leg() {
    local bin="$1" size="$2" port="$3"
    local sock="$WORK/nf.sock"
    rm -f "$sock"
    "$bin" run --socket "$sock" --net-rule allow@198.18.0.2:udp:9 --net-default-egress deny \
        --map "198.18.0.2:9=127.0.0.1:$port" >"$WORK/nf.log" 2>&1 &
    local nf=$!
    PIDS+=($nf)
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
    # testpmd leaves when its stdin closes: a fifo held open by fd 8 for the leg.
    rm -f "$WORK/tp.in"; mkfifo "$WORK/tp.in"
    stdbuf -oL -eL dpdk-testpmd --lcores "0@$second_cpu,1@$first_cpu" --main-lcore 0 \
        --no-pci -m 256 --single-file-segments --in-memory --no-telemetry \
        --file-prefix="bench-udp-$$-$size" \
        --vdev "net_virtio_user0,path=$sock,queues=1,mac=52:54:00:4e:46:02" \
        -- --forward-mode=txonly --nb-cores=1 --total-num-mbufs=8192 \
        --txpkts="$size" --tx-ip=172.16.0.2,198.18.0.2 --tx-udp=9,9 \
        --eth-peer=0,52:54:00:4e:46:01 <"$WORK/tp.in" >"$WORK/testpmd.log" 2>&1 &
    local tp=$!
    PIDS+=($tp)
    exec 8>"$WORK/tp.in"
    # Warm-up: traffic flows for a second.
    local base
    base=$(arrived "$port")
    for _ in $(seq 300); do
        [ "$(arrived "$port")" -gt "$((base + 1000))" ] && break
        sleep 0.1
    done
    sleep 1
    local c0 t0 c1 t1
    c0=$(arrived "$port"); t0=$(cpu_ticks "$nf")
    sleep "$SECS"
    c1=$(arrived "$port"); t1=$(cpu_ticks "$nf")
    exec 8>&-
    kill -TERM "$tp" 2>/dev/null || true
    wait "$tp" 2>/dev/null || true
    kill -TERM "$nf" 2>/dev/null || true
    wait "$nf" 2>/dev/null || true
    local frames=$((c1 - c0))
    if [ "$frames" -le 0 ]; then
        echo "n/a n/a 0"
        echo "  (no traffic; testpmd said:)" >&2; tail -5 "$WORK/testpmd.log" >&2
        return
    fi
    echo "$(per "$frames" "$SECS" %.0f) $(per "$(( (t1 - t0) * 1000000 / TCK ))" "$frames" %.3f) $frames"
}

start_sink
port=$(cat "$WORK/sink.port")
[ -n "$port" ] || { echo "bench-udp.sh: the sink did not start" >&2; exit 1; }
echo "UDP guest->host, dpdk-testpmd txonly -> netfence -> loopback sink; ${SECS}s per leg; $(uname -r), $(nproc) CPUs"
printf '%-6s %-44s %12s %16s %14s %14s %10s %10s\n' size what pps "cpu us/frame" "floor mmsg us" "floor gso us" "vs mmsg" "vs gso"
for size in $SIZES; do
    payload=$((size - 42))
    read -r fm_cpu fm_n < <("$WORK/udpfloor" send "$port" "$payload" 2000000 mmsg)
    read -r fg_cpu fg_n < <("$WORK/udpfloor" send "$port" "$payload" 2000000 gso)
    floor_mmsg=$(per "$(awk -v c="$fm_cpu" 'BEGIN { print c * 1e6 }')" "$fm_n" %.3f)
    floor_gso=$(per "$(awk -v c="$fg_cpu" 'BEGIN { print c * 1e6 }')" "$fg_n" %.3f)
    for bin in "${BINARIES[@]}"; do
        read -r pps us frames < <(run_leg "$bin" "$size" "$port")
        printf '%-6s %-44s %12s %16s %14s %14s %10s %10s\n' "$size" "$bin" "$pps" "$us" "$floor_mmsg" "$floor_gso" \
            "$(per "$us" "$floor_mmsg")" "$(per "$us" "$floor_gso")"
    done
done
