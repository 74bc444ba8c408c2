#!/usr/bin/env bash
# netfence's benchmark suite: one table, every figure beside its peer or limit from the same run.
#
#   scripts/bench.sh [--only LEGS] [--quick] [--time SECS] [--no-build]
#
# LEGS (comma-separated, default all): guest,backend,udp,latency,scale
#   guest    guest iperf3 under QEMU TCG, both ways, 1 and 4 streams: netfence vs passt at MTU
#            1500, netfence --mtu 65520 vs passt at its default 65520, QEMU's slirp (-netdev
#            user, run in a network namespace with only loopback) beside them. Mbit/s (iperf3's
#            receiver) and backend CPU-s per GB (10^9 bytes); for slirp the backend is QEMU
#            itself, so its CPU includes the guest's vCPU.
#   latency  in the MTU-1500 netfence and passt boots: TCP request/response (64 B each way, the
#            host drives, the guest echoes with socat) p50/p99; write-write (the guest writes
#            two bytes in two writes: Nagle's algorithm holds the second until the first is
#            ACKed, so the gap between them at the host is how long the backend held that ACK);
#            and connections/s (the guest opens N connections one after another to a host
#            server); plus the backend-only figure from the bench frontend (1-byte round trips,
#            FIN-closed connections/s, netfence CPU and sleeps per connection).
#   backend  backend-bound TCP from the synthetic vhost-user frontend (benches/frontend.rs)
#            through --map to a loopback sink/source, each way: Gbit/s, netfence CPU-s/GB,
#            frames and kicks per GB; 2 queue pairs; and the raw copy limit (the same frontend
#            against dpdk-testpmd's vhost PMD in macswap mode); the same TCP with --pcap (every
#            frame recorded; the default bounds keep at most 300 MB on disk) beside it without.
#   udp      dpdk-testpmd virtio_user txonly (64 B and 1400 B frames) -> netfence -> loopback
#            sink: pps and netfence CPU per frame; the DPDK<->DPDK limit (testpmd vhost PMD);
#            the kernel's own cost of a sendmmsg loop of the same datagrams to the same sink.
#   scale    netfence's RSS with 10,000 established idle flows; one bulk flow while 1,000
#            others are open.
# --quick: 3 s per measurement instead of 10, 2,000 idle flows instead of 10,000, no 4-stream
# and no slirp runs. The machine is shared: figures are noisy; the ratios of one run are what
# counts. It never fails on a time; it exits 1 only when a leg could not run at all.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ONLY="guest,backend,udp,latency,scale"
QUICK=0
SECS=""
BUILD=1
CMDLINE="scripts/bench.sh $*"
while [ $# -gt 0 ]; do
    case "$1" in
        --only) ONLY="${2:?}"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --time) SECS="${2:?}"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
[ -n "$SECS" ] || { [ "$QUICK" = 1 ] && SECS=3 || SECS=10; }
FLOWS=10000
[ "$QUICK" = 1 ] && FLOWS=2000
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

if [ "$BUILD" = 1 ]; then
    "$ROOT/scripts/install-deps.sh" >/dev/null
    if want guest || want latency; then "$ROOT/scripts/build-guest.sh" >/dev/null; fi
fi
if want udp || want backend; then "$ROOT/scripts/hugepages.sh" 512 >/dev/null || true; fi
(cd "$ROOT" && cargo build --release --quiet)
FRONTEND="$(cd "$ROOT" && cargo bench --bench frontend --no-run 2>&1 | grep -o '[^ (]*target/release/deps/frontend-[0-9a-f]*' | tail -n1)"
[ -n "$FRONTEND" ] && [ "${FRONTEND#/}" = "$FRONTEND" ] && FRONTEND="$ROOT/$FRONTEND"
NETFENCE="${CARGO_TARGET_DIR:-$ROOT/target}/release/netfence"

# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
bench_workdir bench

FAILED=()
ROWS="$WORK/rows"
: >"$ROWS"
# row LEG FIGURE NETFENCE PEER_NAME PEER [PEER2_NAME PEER2]
row() {
    local p1="-" r1="-" p2="-" r2="-"
    [ -n "$4" ] && { p1="$4 $5"; r1="$(ratio "$3" "$5")"; }
    [ -n "${6:-}" ] && { p2="$6 $7"; r2="$(ratio "$3" "$7")"; }
    printf '%s|%s|%s|%s|%s|%s|%s\n' "$1" "$2" "$3" "$p1" "$r1" "$p2" "$r2" >>"$ROWS"
}
fmt() { awk -v v="$1" -v f="$2" 'BEGIN { if (v == "n/a" || v == "") print "n/a"; else printf f, v }'; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# field LEG KEY: a key=value of the frontend's RESULT line for LEG
field() { awk -v leg="$1" -v key="$2" '$1 == "RESULT" && $2 == leg { for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] == key) { v = substr($i, length(key) + 2); gsub(/"/, "", v); print v; exit } } }' "$WORK/frontend.out" 2>/dev/null; }
val() { local v; v="$(field "$1" "$2")"; echo "${v:-n/a}"; }
frontend() {
    echo "== frontend $*"
    if ! timeout 600 "$FRONTEND" "$@" >>"$WORK/frontend.out" 2>"$WORK/frontend.err"; then
        echo "bench.sh: frontend $* failed:" >&2
        tail -n 20 "$WORK/frontend.err" >&2
        grep "^RESULT" "$WORK/frontend.out" | tail -n1 >&2
        FAILED+=("frontend $1")
    fi
    grep "^RESULT" "$WORK/frontend.out" | tail -n1 | sed 's/^/   /'
}

# ---- guest legs ---------------------------------------------------------------------------------
IPERF_PORT="$(free_port)"
RR_PORT="$(free_port)"
CPS_PORT="$(free_port)"
CONNS=200
[ "$QUICK" = 1 ] && CONNS=50
RR_N=2000
[ "$QUICK" = 1 ] && RR_N=500
WW_PORT="$(free_port)"
WW_N=20
[ "$QUICK" = 1 ] && WW_N=10

# The host side of the latency runs: on RR_PORT it sends 64 bytes, waits for them back (the
# guest echoes), RR_N times, and records each round trip; on WW_PORT it reads two bytes from
# each of WW_N connections and records the time between them, then answers and closes; on
# CPS_PORT it answers and closes each connection and records when the first and the last
# arrived. Results go to $1.
latency_server() {
    python3 - "$1" "$RR_PORT" "$CPS_PORT" "$RR_N" "$CONNS" "$WW_PORT" "$WW_N" >"$1.latency.log" 2>&1 <<'EOF' &
import socket, sys, threading, time
out, rrp, cpsp, n, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
wwp, wwn = int(sys.argv[6]), int(sys.argv[7])
def listener(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(128); return s
rr, cps, ww = listener(rrp), listener(cpsp), listener(wwp)
def do_ww():
    gaps = []
    for _ in range(wwn):
        c, _ = ww.accept(); got, t = b"", []
        while len(got) < 2:
            d = c.recv(2 - len(got))
            if not d: break
            got += d; t.append(time.monotonic())
        # Both bytes in one read: the second came before the server read the first (0).
        if len(got) == 2: gaps.append((t[-1] - t[0]) * 1e6)
        c.sendall(b"ok\n"); c.close()
    gaps.sort()
    with open(out + ".ww", "w") as f:
        if gaps: f.write("%d %.0f\n" % (len(gaps), gaps[len(gaps) // 2]))
def do_rr():
    c, _ = rr.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg, t = b"x" * 64, []
    for _ in range(n):
        a = time.monotonic(); c.sendall(msg); got = 0
        while got < 64:
            b = c.recv(64 - got)
            if not b: break
            got += len(b)
        if got < 64: break
        t.append((time.monotonic() - a) * 1e6)
    c.close(); t.sort()
    with open(out + ".rr", "w") as f:
        if t: f.write("%d %.0f %.0f\n" % (len(t), t[len(t) // 2], t[int((len(t) - 1) * 0.99)]))
def do_cps():
    times = []
    while len(times) < conns:
        c, _ = cps.accept(); times.append(time.monotonic()); c.sendall(b"ok\n"); c.close()
    with open(out + ".cps", "w") as f:
        f.write("%d %.1f\n" % (len(times), (len(times) - 1) / max(times[-1] - times[0], 1e-6)))
threading.Thread(target=do_rr, daemon=True).start()
threading.Thread(target=do_ww, daemon=True).start()
do_cps()
EOF
    echo $!
}

# guest_script HOST_IP MTU LATENCY(0|1) STREAMS...
guest_script() {
    local host="$1" mtu="$2" lat="$3"
    shift 3
    echo "udhcpc -i eth0 -n -q -t 5 -T 1 >/dev/null 2>&1 || { echo BENCH-FAIL dhcp; exit 1; }"
    echo "ip link set eth0 mtu $mtu || echo BENCH-FAIL mtu"
    for p in "$@"; do
        for d in up down; do
            local r=""
            [ "$d" = down ] && r="-R"
            echo "echo BENCH-MARK $d$p"
            echo "echo BENCH-RESULT $d$p \$(iperf3 -c $host -p $IPERF_PORT -t $SECS -P $p -f m $r 2>&1 | grep receiver | tail -n1)"
        done
    done
    echo "echo BENCH-MARK iperf-done"
    if [ "$lat" = 1 ]; then
        echo "socat TCP:$host:$RR_PORT EXEC:cat"
        # -b 1: socat writes the two bytes in two writes. Its input stays open a while: at the
        # input's end socat shuts the socket down, which pushes the held byte out at once.
        echo "i=0; while [ \$i -lt $WW_N ]; do (printf ab; sleep 0.1) | socat -b 1 -t 0.05 - TCP:$host:$WW_PORT >/dev/null; i=\$((i+1)); done"
        echo "i=0; while [ \$i -lt $CONNS ]; do socat -u TCP:$host:$CPS_PORT - >/dev/null; i=\$((i+1)); done"
        echo "echo BENCH-MARK lat-done"
    fi
}

# guest_figures NAME RUN COLUMN -> "Mbit/s CPU-s/GB" (COLUMN 2 = backend, 3 = QEMU ticks)
guest_figures() {
    local name="$1" run="$2" col="$3" next line
    line="$(grep -a "BENCH-RESULT $run " "$WORK/$name.console" 2>/dev/null | tail -n1)"
    next="$(awk -v r="$run" 'f { print $1; exit } $1 == r { f = 1 }' "$WORK/$name.marks" 2>/dev/null)"
    awk -v recv="$line" -v from="$run" -v to="$next" -v c="$col" -v tck="$TCK" '
        $1 == from { a = $c; f = 1 }
        $1 == to   { b = $c; t = 1 }
        END {
            n = split(recv, w, " "); bytes = "n/a"; mbits = "n/a"
            for (i = 2; i <= n; i++) {
                if (w[i] == "KBytes") bytes = w[i - 1] * 1024
                if (w[i] == "MBytes") bytes = w[i - 1] * 1048576
                if (w[i] == "GBytes") bytes = w[i - 1] * 1073741824
                if (w[i] == "Mbits/sec") mbits = w[i - 1]
                if (w[i] == "Gbits/sec") mbits = w[i - 1] * 1000
            }
            cpu = (f && t && bytes != "n/a" && bytes > 0) ? sprintf("%.2f", (b - a) / tck / (bytes / 1e9)) : "n/a"
            print mbits, cpu
        }' "$WORK/$name.marks" 2>/dev/null || echo "n/a n/a"
}

start_netfence() { # NAME ARGS... ; sets NF_PID, SOCK
    SOCK="$WORK/$1.sock"
    local name="$1"
    shift
    NO_COLOR=1 RUST_LOG=info "$NETFENCE" run --socket "$SOCK" "$@" >"$WORK/$name.log" 2>&1 &
    NF_PID=$!
    PIDS+=("$NF_PID")
    echo "$NF_PID" >"$WORK/$name.pid"
    for _ in $(seq 1 100); do
        grep -q "listening on" "$WORK/$name.log" 2>/dev/null && return 0
        kill -0 "$NF_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "bench.sh: netfence ($name) did not start:" >&2
    cat "$WORK/$name.log" >&2
    return 1
}

# guest_leg NAME KIND MTU LATENCY STREAMS...   KIND = netfence | passt | slirp
guest_leg() {
    local name="$1" kind="$2" mtu="$3" lat="$4"
    shift 4
    local timeout=$(( (SECS + 8) * 2 * $# + 120 + lat * 120 ))
    local lat_pid="" iperf_pid=""
    echo "== guest leg $name"
    # A fresh iperf3 server per leg: iperf3 3.12's server sometimes fails a test's end ("select
    # failed: Bad file descriptor", after a -R test whose client resets the data connection)
    # and then reports 0 bytes for the next test it serves.
    if [ "$kind" != slirp ]; then
        iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT" >>"$WORK/iperf3-server.log" 2>&1 &
        iperf_pid=$!
        PIDS+=("$iperf_pid")
        for _ in $(seq 1 50); do
            [ -n "$(ss -Hltn "sport = :$IPERF_PORT" 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
    case "$kind" in
        netfence)
            local maps=(--map "203.0.113.9:$IPERF_PORT=127.0.0.1:$IPERF_PORT"
                --map "203.0.113.9:$RR_PORT=127.0.0.1:$RR_PORT" --map "203.0.113.9:$CPS_PORT=127.0.0.1:$CPS_PORT"
                --map "203.0.113.9:$WW_PORT=127.0.0.1:$WW_PORT")
            local mtuarg=()
            [ "$mtu" != 1500 ] && mtuarg=(--mtu "$mtu")
            start_netfence "$name" "${maps[@]}" "${mtuarg[@]}" || { FAILED+=("$name"); return 0; }
            guest_script 203.0.113.9 "$mtu" "$lat" "$@" >"$WORK/$name.sh"
            [ "$lat" = 1 ] && lat_pid="$(latency_server "$WORK/$name")"
            run_leg "$name" "$WORK/$name.pid" "$timeout" -- --vhost-user "$SOCK" --script "$WORK/$name.sh" ||
                FAILED+=("$name")
            kill "$NF_PID" 2>/dev/null || true
            ;;
        passt)
            guest_script 198.51.100.1 "$mtu" "$lat" "$@" >"$WORK/$name.sh"
            [ "$lat" = 1 ] && lat_pid="$(latency_server "$WORK/$name")"
            run_leg "$name" "$WORK/$name.pid" "$timeout" -- --passt --passt-mtu "$mtu" \
                --passt-pidfile "$WORK/$name.pid" --script "$WORK/$name.sh" || FAILED+=("$name")
            ;;
        slirp)
            # QEMU's user network reaches whatever the host reaches: give it a network
            # namespace with nothing but loopback, and the iperf3 server inside it.
            guest_script 10.0.2.2 "$mtu" 0 "$@" >"$WORK/$name.sh"
            cat >"$WORK/slirp-netns.sh" <<EOF
#!/bin/sh
ip link set lo up || exit 125
iperf3 -s -B 127.0.0.1 -p $IPERF_PORT -D -I "$WORK/slirp-iperf3.pid" || exit 125
exec "$ROOT/scripts/run-guest.sh" "\$@"
EOF
            chmod +x "$WORK/slirp-netns.sh"
            RUN_GUEST="unshare -n $WORK/slirp-netns.sh" run_leg "$name" /dev/null "$timeout" -- --slirp \
                --script "$WORK/$name.sh" || FAILED+=("$name")
            [ -s "$WORK/slirp-iperf3.pid" ] && kill "$(cat "$WORK/slirp-iperf3.pid")" 2>/dev/null || true
            ;;
    esac
    if [ -n "$lat_pid" ]; then
        sleep 0.5
        kill "$lat_pid" 2>/dev/null || true
    fi
    if [ -n "$iperf_pid" ]; then
        kill "$iperf_pid" 2>/dev/null || true
        wait "$iperf_pid" 2>/dev/null || true
    fi
}

if want guest || want latency; then
    STREAMS=(1 4)
    [ "$QUICK" = 1 ] && STREAMS=(1)
    want guest || STREAMS=()
    LAT=0
    want latency && LAT=1
    guest_leg nf1500 netfence 1500 "$LAT" "${STREAMS[@]}"
    guest_leg passt1500 passt 1500 "$LAT" "${STREAMS[@]}"
    if want guest; then
        guest_leg nf65520 netfence 65520 0 "${STREAMS[@]}"
        guest_leg passt65520 passt 65520 0 "${STREAMS[@]}"
        [ "$QUICK" = 1 ] || guest_leg slirp slirp 1500 0 "${STREAMS[@]}"
    fi
fi

# ---- frontend legs ------------------------------------------------------------------------------
: >"$WORK/frontend.out"
if want backend; then
    frontend tcp --dir up --secs "$SECS"
    frontend tcp --dir down --secs "$SECS"
    frontend tcp --dir up --pairs 2 --secs "$SECS"
    frontend tcp --dir up --pcap "$WORK/bench.pcap" --secs "$SECS"
    frontend tcp --dir down --pcap "$WORK/bench.pcap" --secs "$SECS"
    rm -f "$WORK"/bench.pcap*
    frontend tcp-limit --secs "$SECS"
fi
if want latency; then frontend rr --secs "$SECS"; fi
if want udp; then
    frontend udp --size 64 --secs "$SECS"
    frontend udp --size 1400 --secs "$SECS"
fi
if want scale; then
    frontend scale --flows "$FLOWS"
    frontend tcp --dir up --idle 1000 --secs "$SECS"
fi

# ---- the table ----------------------------------------------------------------------------------
if want guest; then
    for mtu in 1500 65520; do
        for p in 1 4; do
            [ "$QUICK" = 1 ] && [ "$p" = 4 ] && continue
            for d in up down; do
                label="g->h"
                [ "$d" = down ] && label="h->g"
                read -r nm nc <<<"$(guest_figures "nf$mtu" "$d$p" 2)"
                read -r pm pc <<<"$(guest_figures "passt$mtu" "$d$p" 2)"
                if [ "$mtu" = 1500 ] && [ "$QUICK" = 0 ]; then
                    read -r sm sc <<<"$(guest_figures slirp "$d$p" 3)"
                    row "guest TCP mtu $mtu" "$label P$p Mbit/s" "$nm" passt "$pm" slirp "$sm"
                    row "guest TCP mtu $mtu" "$label P$p CPU-s/GB" "$nc" passt "$pc" "slirp(qemu)" "$sc"
                else
                    row "guest TCP mtu $mtu" "$label P$p Mbit/s" "$nm" passt "$pm"
                    row "guest TCP mtu $mtu" "$label P$p CPU-s/GB" "$nc" passt "$pc"
                fi
            done
        done
    done
fi
if want latency; then
    for k in nf1500 passt1500; do
        read -r _ p50 p99 <<<"$(cat "$WORK/$k.rr" 2>/dev/null || echo "n/a n/a n/a")"
        read -r _ cps <<<"$(cat "$WORK/$k.cps" 2>/dev/null || echo "n/a n/a")"
        read -r _ ww <<<"$(cat "$WORK/$k.ww" 2>/dev/null || echo "n/a n/a")"
        eval "${k}_p50=\${p50:-n/a} ${k}_p99=\${p99:-n/a} ${k}_cps=\${cps:-n/a} ${k}_ww=\${ww:-n/a}"
    done
    row "latency (guest)" "rr p50 us" "$nf1500_p50" passt "$passt1500_p50"
    row "latency (guest)" "rr p99 us" "$nf1500_p99" passt "$passt1500_p99"
    row "latency (guest)" "write-write gap p50 us" "$nf1500_ww" passt "$passt1500_ww"
    row "latency (guest)" "conn/s (guest socat)" "$nf1500_cps" passt "$passt1500_cps"
    row "latency (backend)" "rr p50 us" "$(val rr p50_us)" "" ""
    row "latency (backend)" "rr p99 us" "$(val rr p99_us)" "" ""
    row "latency (backend)" "conn/s" "$(val rr conns_per_s)" "" ""
    row "latency (backend)" "CPU us/conn" "$(val rr nf_cpu_us_per_conn)" "" ""
    row "latency (backend)" "sleeps/conn" "$(val rr nf_sleeps_per_conn)" "" ""
fi
if want backend; then
    lim="$(val tcp-limit gbit)"
    for d in up down; do
        label="g->h"
        [ "$d" = down ] && label="h->g"
        row "backend TCP 1 pair" "$label Gbit/s" "$(val "tcp-$d" gbit)" "testpmd-limit" "$lim"
        row "backend TCP 1 pair" "$label CPU-s/GB" "$(val "tcp-$d" nf_cpu_per_gb)" "" ""
        row "backend TCP 1 pair" "$label frames/GB" "$(val "tcp-$d" frames_per_gb)" "" ""
        row "backend TCP 1 pair" "$label kicks/GB" "$(val "tcp-$d" kicks_per_gb)" "" ""
    done
    two="$(val tcp-up-pairs2 gbit)"
    if [ "$two" = n/a ]; then
        case "$(field tcp-up-pairs2 na)" in
            no-MQ) two="n/a (no MQ)" ;;
            "") two="n/a" ;;
            *) two="n/a ($(field tcp-up-pairs2 na))" ;;
        esac
    fi
    row "backend TCP 2 pairs" "g->h Gbit/s" "$two" "1 pair" "$(val tcp-up gbit)"
    row "backend TCP 2 pairs" "g->h CPU-s/GB" "$(val tcp-up-pairs2 nf_cpu_per_gb)" "1 pair" "$(val tcp-up nf_cpu_per_gb)"
    for d in up down; do
        label="g->h"
        [ "$d" = down ] && label="h->g"
        row "backend TCP --pcap" "$label Gbit/s" "$(val "tcp-$d-pcap" gbit)" "no pcap" "$(val "tcp-$d" gbit)"
        row "backend TCP --pcap" "$label CPU-s/GB" "$(val "tcp-$d-pcap" nf_cpu_per_gb)" "no pcap" "$(val "tcp-$d" nf_cpu_per_gb)"
        row "backend TCP --pcap" "$label frames not recorded %" "$(val "tcp-$d-pcap-drops" dropped_pct)" "" ""
    done
fi
if want udp; then
    for s in 64 1400; do
        row "UDP $s B testpmd" "pps" "$(val "udp$s" nf_pps)" "dpdk<->dpdk" "$(val "udp$s" dpdk_limit_pps)" "sendmmsg" "$(val "udp$s" sendmmsg_pps)"
        row "UDP $s B testpmd" "CPU us/frame" "$(val "udp$s" nf_cpu_us_per_frame)" "kernel sendmmsg" "$(val "udp$s" kernel_us_per_dgram)"
    done
fi
if want scale; then
    row "scale" "RSS MB, $FLOWS idle flows" "$(val scale rss_mb)" "no flows" "$(val scale rss_mb_before)"
    row "scale" "KiB per idle flow" "$(val scale kib_per_flow)" "" ""
    row "scale" "g->h Gbit/s, 1000 open" "$(val tcp-up-idle1000 gbit)" "alone" "$(val tcp-up gbit)"
fi

{
    echo "netfence bench: $(date -u +%Y-%m-%d) $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null), $(nproc) CPUs ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), ${SECS}s per run"
    echo "command: $CMDLINE"
    echo "netfence features offered (bench frontend): $(field tcp-up features || true)"
    echo
    { echo "leg|figure|netfence|peer|nf/peer|peer 2|nf/peer 2"; cat "$ROWS"; } |
        column -t -s '|'
} | tee "$WORK/table.txt"
[ -n "${BENCH_TABLE:-}" ] && cp "$WORK/table.txt" "$BENCH_TABLE"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "bench.sh: legs that could not run: ${FAILED[*]}" >&2
    exit 1
fi
