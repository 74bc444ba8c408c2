#!/usr/bin/env bash
# The cost of TLS interception: the same guest downloads over HTTPS and opens new HTTPS
# connections through netfence, intercepted and bypassed, in the same run.
#
#   scripts/bench-tls.sh [--mb MB] [--handshakes N] [--no-build]
#
# One HTTPS server (python3 ssl, a certificate from its own openssl CA for two names) listens on
# the host's 127.0.0.1. netfence runs with `[tls]` interception on, that CA in
# tls.upstream_ca_certs and `bypass = ["bypassed.example"]`, and maps 203.0.113.9:443 to the
# server. The test guest boots once under QEMU TCG, trusts netfence's CA (--ca-out) and the
# server's CA, and for each name, intercepted.example then bypassed.example:
#   download    curl fetches MB megabytes (default 200) over one connection: the guest's MB/s
#               (curl's figure) and netfence's CPU seconds per GB (10^9 bytes) moved
#   handshakes  curl fetches N (default 300) empty responses, each on a new connection with a
#               full handshake (--no-sessionid; the server closes after each): the guest's new
#               connections per second and netfence's CPU milliseconds per connection
# then prints intercepted/bypassed ratios. Intercepted, netfence runs two TLS sessions per
# connection (the guest's and its own to the server: decrypt, re-encrypt, a handshake each side,
# a leaf certificate from its cache); bypassed, it relays the bytes as for any TCP flow.
# The guest (software crypto under TCG) bounds the throughput and the handshake rate of both
# legs; netfence's CPU per GB and per connection is the cost interception adds, and 1000 / (CPU
# ms per connection) the handshakes per second one core of netfence could sustain.
# It prints figures and never fails on a time; it exits 1 only when the guest could not run it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MB=200
HANDSHAKES=300
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --mb) MB="${2:?}"; shift 2 ;;
        --handshakes) HANDSHAKES="${2:?}"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "bench-tls.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done

if [ "$BUILD" = 1 ]; then
    "$ROOT/scripts/install-deps.sh"
    "$ROOT/scripts/build-guest.sh"
    (cd "$ROOT" && cargo build --release --quiet)
fi
NETFENCE="${CARGO_TARGET_DIR:-$ROOT/target}/release/netfence"
[ -x "$NETFENCE" ] || { echo "bench-tls.sh: $NETFENCE missing (cargo build --release)" >&2; exit 1; }

# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
bench_workdir bench-tls

# wait_port LOG: the port a server printed as "port N" in LOG
wait_port() {
    local port=""
    for _ in $(seq 1 100); do
        port="$(sed -n 's/.*port \([0-9][0-9]*\).*/\1/p' "$1" | head -n1)"
        [ -n "$port" ] && break
        sleep 0.05
    done
    [ -n "$port" ] || { echo "bench-tls.sh: a server did not start:" >&2; cat "$1" >&2; exit 1; }
    echo "$port"
}

# --- the HTTPS server and its CA ------------------------------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=bench-tls upstream CA" -keyout "$WORK/up-ca.key" -out "$WORK/up-ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=intercepted.example" \
    -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:intercepted.example,DNS:bypassed.example\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' \
    >"$WORK/server.ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/up-ca.pem" -CAkey "$WORK/up-ca.key" \
    -CAcreateserial -days 2 -extfile "$WORK/server.ext" -out "$WORK/server.pem" 2>/dev/null
cat >"$WORK/server.py" <<'EOF'
# /big: MB megabytes; anything else: an empty 200. HTTP/1.0, so each connection serves one request.
import http.server, ssl, sys

BIG = int(sys.argv[3]) * 1000 * 1000
CHUNK = memoryview(b"\x5a" * (1 << 20))

class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        n = BIG if self.path == "/big" else 0
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        while n > 0:
            k = min(n, len(CHUNK))
            self.wfile.write(CHUNK[:k])
            n -= k

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
tls.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = tls.wrap_socket(server.socket, server_side=True)
print("HTTPS server on port", server.server_address[1], flush=True)
server.serve_forever()
EOF
python3 -u "$WORK/server.py" "$WORK/server.pem" "$WORK/server.key" "$MB" >"$WORK/server.log" 2>&1 &
PIDS+=($!)
HTTPS_PORT="$(wait_port "$WORK/server.log")"

# The guest fetches its CA bundle (netfence's CA + the server's) over plain HTTP.
mkdir -p "$WORK/www"
python3 -u -m http.server --bind 127.0.0.1 --directory "$WORK/www" 0 >"$WORK/http.log" 2>&1 &
PIDS+=($!)
HTTP_PORT="$(wait_port "$WORK/http.log")"

# --- netfence -----------------------------------------------------------------------------------------
cat >"$WORK/netfence.toml" <<EOF
[tls]
upstream_ca_certs = ["$WORK/up-ca.pem"]
bypass = ["bypassed.example"]
EOF
SOCK="$WORK/netfence.sock"
NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$NETFENCE" run --socket "$SOCK" --config "$WORK/netfence.toml" \
    --ca-out "$WORK/netfence-ca.pem" \
    --map "203.0.113.9:443=127.0.0.1:$HTTPS_PORT" --map "203.0.113.7:80=127.0.0.1:$HTTP_PORT" \
    >"$WORK/netfence.log" 2>&1 &
NF_PID=$!
PIDS+=("$NF_PID")
echo "$NF_PID" >"$WORK/netfence.pid"
for _ in $(seq 1 100); do
    grep -q "listening on" "$WORK/netfence.log" 2>/dev/null && break
    kill -0 "$NF_PID" 2>/dev/null || break
    sleep 0.05
done
grep -q "listening on" "$WORK/netfence.log" ||
    { echo "bench-tls.sh: netfence did not start listening:" >&2; cat "$WORK/netfence.log" >&2; exit 1; }
cat "$WORK/netfence-ca.pem" "$WORK/up-ca.pem" >"$WORK/www/ca.pem"

# --- the guest ------------------------------------------------------------------------------------------
cat >"$WORK/guest.sh" <<EOF
udhcpc -i eth0 -n -q -t 5 -T 1 >/dev/null 2>&1 || { echo BENCH-FAIL dhcp; exit 1; }
curl -sS --max-time 20 -o /ca.pem http://203.0.113.7/ca.pem || { echo BENCH-FAIL ca; exit 1; }
for name in intercepted bypassed; do
  R="--cacert /ca.pem --resolve \$name.example:443:203.0.113.9"
  echo BENCH-MARK dl-\$name
  curl -sS \$R -o /dev/null -w "BENCH-DL \$name %{size_download} %{speed_download}\n" https://\$name.example/big || echo BENCH-FAIL dl-\$name
  echo BENCH-MARK hs-\$name
  t0=\$(cut -d' ' -f1 /proc/uptime)
  ok=\$(curl -sS \$R --no-sessionid -o /dev/null -w "%{http_code}\n" "https://\$name.example/e[1-$HANDSHAKES]" | grep -c '^200')
  t1=\$(cut -d' ' -f1 /proc/uptime)
  echo "BENCH-HS \$name \$ok \$t0 \$t1"
done
echo BENCH-MARK end
EOF
echo "== bench-tls: guest HTTPS through netfence, intercepted vs bypassed ($MB MB download, $HANDSHAKES new connections each)"
LEG_OK=1
run_leg tls "$WORK/netfence.pid" 900 -- --vhost-user "$SOCK" --mac 52:54:00:4e:46:02 --script "$WORK/guest.sh" ||
    { echo "bench-tls.sh: the guest run failed (exit $?)" >&2; LEG_OK=0; }
kill "$NF_PID" 2>/dev/null || true
echo "  netfence log (warnings):"
grep -E "WARN|ERROR|panick" "$WORK/netfence.log" | tail -n 20 | sed 's/^/    /' || true

# --- figures ----------------------------------------------------------------------------------------------
echo
echo "== bench-tls: QEMU TCG guest (curl, software crypto), 1 vCPU; host: $(nproc) CPUs, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
printf '%-12s %10s %14s %12s %13s %16s %14s\n' leg "guest MB/s" "netfence-s/GB" "conns/s" "conns ok" "netfence-ms/conn" "conns/s/core"
declare -A MBS SGB CPS MSC
for name in intercepted bypassed; do
    next_dl="hs-$name"
    next_hs="dl-bypassed"
    [ "$name" = bypassed ] && next_hs=end
    read -r _ _ bytes speed <<<"$(grep -a "^BENCH-DL $name " "$WORK/tls.console" || echo "x x n/a n/a")"
    read -r _ _ ok t0 t1 <<<"$(grep -a "^BENCH-HS $name " "$WORK/tls.console" || echo "x x n/a n/a n/a")"
    dl_s="$(mark_seconds tls "dl-$name" "$next_dl")"
    hs_s="$(mark_seconds tls "hs-$name" "$next_hs")"
    mbs="$(per "$speed" 1000000)"
    gb="$(per "$bytes" 1000000000)"
    sgb="$(per "$dl_s" "$gb")"
    cps="$(awk -v n="$ok" -v a="$t0" -v b="$t1" 'BEGIN { if (n == "n/a" || a == "n/a" || b <= a) print "n/a"; else printf "%.1f", n / (b - a) }')"
    msc="$(awk -v s="$hs_s" -v n="$ok" 'BEGIN { if (s == "n/a" || n == "n/a" || n == 0) print "n/a"; else printf "%.2f", s * 1000 / n }')"
    core="$(awk -v m="$msc" 'BEGIN { if (m == "n/a" || m == 0) print "n/a"; else printf "%.0f", 1000 / m }')"
    MBS[$name]="$mbs"; SGB[$name]="$sgb"; CPS[$name]="$cps"; MSC[$name]="$msc"
    printf '%-12s %10s %14s %12s %13s %16s %14s\n' "$name" "$mbs" "$sgb" "$cps" "$ok/$HANDSHAKES" "$msc" "$core"
done
echo "intercepted/bypassed: guest MB/s x$(ratio "${MBS[intercepted]}" "${MBS[bypassed]}"), netfence CPU per GB x$(ratio "${SGB[intercepted]}" "${SGB[bypassed]}"), conns/s x$(ratio "${CPS[intercepted]}" "${CPS[bypassed]}"), netfence CPU per conn x$(ratio "${MSC[intercepted]}" "${MSC[bypassed]}")"
echo "(netfence CPU from /proc/PID/stat in ${TCK}ths of a second; conns/s/core = 1000 / netfence-ms/conn)"

[ "$LEG_OK" = 1 ] && grep -aq "^BENCH-DL intercepted " "$WORK/tls.console" && grep -aq "^BENCH-DL bypassed " "$WORK/tls.console" || exit 1
