#!/usr/bin/env bash
# netfence demo: a QEMU guest fetches a page from a host server through netfence's policy, and
# calls an HTTPS API with a key it never holds (TLS interception + secret substitution).
#
#   scripts/demo.sh
#
# On a fresh Debian 12 machine (root or sudo), this:
#   1. installs the packages (scripts/install-deps.sh) and builds the guest image
#      (scripts/build-guest.sh) and netfence (cargo build --release);
#   2. starts a web server on the host's 127.0.0.1 (python3 -m http.server, a random port), and
#      an HTTPS "API" for api.example.com (python3 ssl, a certificate made with openssl) that
#      prints the Authorization header it receives;
#   3. starts `netfence run` with `--map 203.0.113.7:80=127.0.0.1:PORT`: the guest sees a "public"
#      web server at 203.0.113.7 (a documentation address) that is really the loopback server;
#      203.0.113.9:443 is mapped to the API the same way. Its config intercepts TLS (`[tls]`,
#      trusting the API's CA upstream) and holds one secret, DEMO_API_KEY, for api.example.com
#      only; `--ca-out` writes netfence's interception CA where the web server serves it;
#   4. boots a Linux guest under QEMU (TCG) attached to netfence's vhost-user socket; the guest
#      runs udhcpc, pings its gateway, curls http://203.0.113.7/ (allowed by the default
#      public-only policy) and http://10.1.2.3/ (a private address: denied), then does the same
#      over IPv6 (SLAAC address, http://[2001:db8::7]/ mapped to the same server); then it
#      fetches netfence's CA, calls https://api.example.com/ with `Authorization: Bearer
#      $DEMO_API_KEY` (a placeholder: `netfence secrets env` gave it) and the API receives the real
#      key; the same header sent to 203.0.113.7 is a secret violation: reset and logged; last, it
#      serves a page with busybox httpd on its port 80, which netfence publishes on the host
#      (`-p 127.0.0.1:WEB:80`), and the host curls it;
#   5. prints the guest's console and netfence's log as they happen, then a summary.
# Nothing leaves the machine: the only host-side connections netfence makes go to 127.0.0.1.
# Exit status 0 when everything happened as described.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
GUEST_MAC="52:54:00:4e:46:02" # netfence's default --guest-mac; QEMU gets the same one

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "installing packages, building the guest image and netfence"
scripts/install-deps.sh
scripts/build-guest.sh
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
cargo build --release --quiet
NETFENCE="${CARGO_TARGET_DIR:-$ROOT/target}/release/netfence"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/netfence-demo.XXXXXX")"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# wait_port LOG: the port a server printed as "port N" in LOG
wait_port() {
    local port=""
    for _ in $(seq 1 100); do
        port="$(sed -n 's/.*port \([0-9][0-9]*\).*/\1/p' "$1" | head -n1)"
        [ -n "$port" ] && break
        sleep 0.05
    done
    [ -n "$port" ] || { echo "demo: a server did not start:" >&2; cat "$1" >&2; exit 1; }
    echo "$port"
}

step "starting a web server on the host's 127.0.0.1"
mkdir -p "$WORK/www"
TOKEN="demo-$(date +%s)-$$"
cat >"$WORK/www/index.html" <<EOF
<html><body><h1>Hello from the host!</h1>
<p>This page is served on 127.0.0.1 and reached the guest through netfence ($TOKEN).</p>
</body></html>
EOF
python3 -u -m http.server --bind 127.0.0.1 --directory "$WORK/www" 0 >"$WORK/http.log" 2>&1 &
PIDS+=($!)
PORT="$(wait_port "$WORK/http.log")"
echo "web server: http://127.0.0.1:$PORT/"

step "starting an HTTPS API for api.example.com on the host's 127.0.0.1"
# Its own CA (openssl), which netfence is told to trust upstream: the guest never sees it.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=netfence demo upstream CA" -keyout "$WORK/api-ca.key" -out "$WORK/api-ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=api.example.com" \
    -keyout "$WORK/api.key" -out "$WORK/api.csr" 2>/dev/null
printf 'subjectAltName=DNS:api.example.com\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$WORK/api.ext"
openssl x509 -req -in "$WORK/api.csr" -CA "$WORK/api-ca.pem" -CAkey "$WORK/api-ca.key" \
    -CAcreateserial -days 2 -extfile "$WORK/api.ext" -out "$WORK/api.pem" 2>/dev/null
cat >"$WORK/api.py" <<'EOF'
import http.server, ssl, sys

class Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print("API received: Authorization:", self.headers.get("Authorization"), flush=True)
        body = b"api.example.com says: hello, authorized client\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

server = http.server.HTTPServer(("127.0.0.1", 0), Api)
tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
tls.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = tls.wrap_socket(server.socket, server_side=True)
print("API listening on port", server.server_address[1], flush=True)
server.serve_forever()
EOF
python3 -u "$WORK/api.py" "$WORK/api.pem" "$WORK/api.key" >"$WORK/api.log" 2>&1 &
PIDS+=($!)
API_PORT="$(wait_port "$WORK/api.log")"
echo "HTTPS API: https://127.0.0.1:$API_PORT/ (certificate for api.example.com)"
# The real key: only netfence's environment holds it.
DEMO_KEY="sk-demo-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
cat >"$WORK/netfence.toml" <<EOF
[tls]                       # intercept TLS on port 443
upstream_ca_certs = ["$WORK/api-ca.pem"]

[[secrets]]
env_var = "DEMO_API_KEY"    # the guest holds a placeholder in \$DEMO_API_KEY
value_env = "DEMO_API_KEY"  # netfence reads the real value from its own environment
allowed_hosts = ["api.example.com"]
EOF
echo "netfence config ($WORK/netfence.toml):"
sed 's/^/    /' "$WORK/netfence.toml"
GUEST_ENV="$("$NETFENCE" secrets env --config "$WORK/netfence.toml")"
echo "\$ netfence secrets env --config netfence.toml   (what the guest is given)"
echo "    $GUEST_ENV"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
WEB_PORT="$(free_port)"     # the guest's web server, published on the host
CONTROL_PORT="$(free_port)" # tells the guest the host is done with it

step "starting netfence (default policy public-only; 203.0.113.7:80 mapped to 127.0.0.1:$PORT)"
SOCK="$WORK/netfence.sock"
echo "\$ DEMO_API_KEY=... netfence run --socket $SOCK --guest-mac $GUEST_MAC --config netfence.toml --ca-out www/ca.pem --map 203.0.113.7:80=127.0.0.1:$PORT --map '[2001:db8::7]:80=127.0.0.1:$PORT' --map 203.0.113.9:443=127.0.0.1:$API_PORT -p $WEB_PORT:80 -p $CONTROL_PORT:9000"
DEMO_API_KEY="$DEMO_KEY" NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$NETFENCE" run --socket "$SOCK" \
    --guest-mac "$GUEST_MAC" --config "$WORK/netfence.toml" --ca-out "$WORK/www/ca.pem" \
    --map "203.0.113.7:80=127.0.0.1:$PORT" --map "[2001:db8::7]:80=127.0.0.1:$PORT" \
    --map "203.0.113.9:443=127.0.0.1:$API_PORT" -p "$WEB_PORT:80" -p "$CONTROL_PORT:9000" \
    >"$WORK/netfence.log" 2>&1 &
NF_PID=$!
PIDS+=("$NF_PID")
# netfence's log, live, next to the guest's console
tail --pid="$NF_PID" -n +1 -F "$WORK/netfence.log" 2>/dev/null | sed -u 's/^/  netfence | /' &
PIDS+=($!)
for _ in $(seq 1 200); do
    grep -q "listening on" "$WORK/netfence.log" && break
    kill -0 "$NF_PID" 2>/dev/null || { echo "demo: netfence exited" >&2; exit 1; }
    sleep 0.05
done
grep -q "listening on" "$WORK/netfence.log" || { echo "demo: netfence is not listening" >&2; exit 1; }

step "booting the guest (QEMU TCG, about 10 s) attached to $SOCK"
{
    printf '%s\n' "$GUEST_ENV" | sed 's/^/export /'
    echo "export TOKEN=$TOKEN"
} >"$WORK/guest.sh"
cat >>"$WORK/guest.sh" <<'EOF'
echo "guest: \$ udhcpc -i eth0"
udhcpc -i eth0 -n -q -t 5 -T 2 && echo "DEMO dhcp ok" || echo "DEMO dhcp FAILED"
ip -4 addr show eth0 | grep inet
ip route
echo "guest: \$ ping -c 1 172.16.0.1   (the gateway is netfence)"
ping -c 1 -W 5 172.16.0.1 && echo "DEMO ping ok" || echo "DEMO ping FAILED"
echo "guest: \$ curl http://203.0.113.7/   (public address, mapped to the host's web server)"
curl -sS --max-time 20 http://203.0.113.7/ && echo "DEMO allowed ok" || echo "DEMO allowed FAILED"
echo "guest: \$ curl http://10.1.2.3/   (private address: the public-only policy denies it)"
curl -sS --connect-timeout 4 --max-time 6 http://10.1.2.3/ && echo "DEMO denied FAILED (it connected)" || echo "DEMO denied ok (curl failed as expected)"
echo "guest: IPv6 address from netfence's router advertisement (SLAAC)"
for i in $(seq 1 40); do
  ip -6 addr show dev eth0 | grep 'scope global' | grep -qv tentative && break
  sleep 0.25
done
ip -6 addr show dev eth0 | grep inet6
echo "guest: \$ curl 'http://[2001:db8::7]/'   (public IPv6 address, mapped to the same web server)"
curl -sS -g --max-time 20 'http://[2001:db8::7]/' && echo "DEMO allowed6 ok" || echo "DEMO allowed6 FAILED"
echo "guest: DEMO_API_KEY=$DEMO_API_KEY   (a placeholder; fetching netfence's CA from the web server)"
curl -sS --max-time 20 -o /ca.pem http://203.0.113.7/ca.pem && echo "DEMO ca ok" || echo "DEMO ca FAILED"
echo "guest: \$ curl --cacert /ca.pem -H \"Authorization: Bearer \$DEMO_API_KEY\" https://api.example.com/"
curl -sS --max-time 20 --cacert /ca.pem --resolve api.example.com:443:203.0.113.9 \
  -H "Authorization: Bearer $DEMO_API_KEY" https://api.example.com/ && echo "DEMO https ok" || echo "DEMO https FAILED"
echo "guest: \$ curl -H \"Authorization: Bearer \$DEMO_API_KEY\" http://203.0.113.7/   (not the key's host)"
curl -sS --max-time 10 -o /dev/null -H "Authorization: Bearer $DEMO_API_KEY" http://203.0.113.7/ \
  && echo "DEMO leak FAILED (it was sent)" || echo "DEMO leak ok (reset by netfence)"
echo "guest: \$ httpd -p 80   (the host reaches it through netfence's published port)"
mkdir -p /www && echo "<h1>Hello from the guest!</h1> ($TOKEN)" >/www/index.html
nc -l -p 9000 >/dev/null &
release=$!
# Listening on 9000 (0x2328) before the host hears "serving" and releases the guest.
for i in $(seq 1 40); do grep -q ':2328 00000000:0000 0A' /proc/net/tcp && break; sleep 0.25; done
httpd -p 80 -h /www && echo "DEMO serving"
wait $release; echo "DEMO released"
EOF
: >"$WORK/console.log"
(scripts/run-guest.sh --vhost-user "$SOCK" --mac "$GUEST_MAC" --script "$WORK/guest.sh" --timeout 120 2>&1 |
    sed -u 's/\r$//' | tee "$WORK/console.log" | sed -u 's/^/  guest    | /') &
GUEST_PID=$!
# When the guest serves its page, fetch it from the host through the published port.
for _ in $(seq 1 600); do
    grep -q "DEMO serving" "$WORK/console.log" && break
    kill -0 "$GUEST_PID" 2>/dev/null || break
    sleep 0.2
done
if grep -q "DEMO serving" "$WORK/console.log"; then
    echo "  host     | \$ curl http://127.0.0.1:$WEB_PORT/   (published: the guest's port 80)"
    curl -sS --max-time 20 "http://127.0.0.1:$WEB_PORT/" | tee "$WORK/guest-page.html" | sed 's/^/  host     | /' || true
fi
# Release the guest (it waits on its port 9000, published as $CONTROL_PORT).
(exec 3<>"/dev/tcp/127.0.0.1/$CONTROL_PORT" && echo done >&3) 2>/dev/null || true
wait "$GUEST_PID" || true
sleep 0.5 # let tail print netfence's last lines

step "summary"
result=0
check() { # check LABEL CONDITION-COMMAND...
    local label="$1"
    shift
    if "$@"; then
        printf '  [ok]   %s\n' "$label"
    else
        printf '  [FAIL] %s\n' "$label"
        result=1
    fi
}
check "guest got its address by DHCP (172.16.0.2/30, gateway 172.16.0.1)" \
    grep -q "DEMO dhcp ok" "$WORK/console.log"
check "guest pinged its gateway" grep -q "DEMO ping ok" "$WORK/console.log"
check "guest fetched the host's page via 203.0.113.7 (marker $TOKEN)" grep -q "$TOKEN" "$WORK/console.log"
check "netfence logged: allow 203.0.113.7:80" \
    grep -qE "decision.*action=allow.*203\.0\.113\.7:80" "$WORK/netfence.log"
check "guest could not reach 10.1.2.3" grep -q "DEMO denied ok" "$WORK/console.log"
check "guest fetched the same page over IPv6 via [2001:db8::7]" grep -q "DEMO allowed6 ok" "$WORK/console.log"
check "netfence logged: allow [2001:db8::7]:80" \
    grep -qE "decision.*action=allow.*\[2001:db8::7\]:80" "$WORK/netfence.log"
check "netfence logged: deny 10.1.2.3:80" grep -qE "decision.*action=deny.*10\.1\.2\.3:80" "$WORK/netfence.log"
check "the host web server served the guest" grep -q '"GET / ' "$WORK/http.log"
check "guest fetched netfence's CA and called https://api.example.com/ through interception" \
    grep -q "DEMO https ok" "$WORK/console.log"
check "the API received the real key (Bearer $DEMO_KEY)" \
    grep -q "Authorization: Bearer $DEMO_KEY" "$WORK/api.log"
check "the real key was never in the guest" bash -c '! grep -q "$1" "$2"' _ "$DEMO_KEY" "$WORK/console.log"
check "the real key is not in netfence's log" bash -c '! grep -q "$1" "$2"' _ "$DEMO_KEY" "$WORK/netfence.log"
check "the placeholder sent to 203.0.113.7 was blocked" grep -q "DEMO leak ok" "$WORK/console.log"
check "netfence logged the secret violation" grep -q "secret violation" "$WORK/netfence.log"
check "the host fetched the guest's page through -p $WEB_PORT:80" grep -q "Hello from the guest.*$TOKEN" "$WORK/guest-page.html"
check "netfence logged: allow ingress to the guest's port 80" \
    grep -qE "decision.*action=allow.*direction=ingress.*172\.16\.0\.2:80" "$WORK/netfence.log"
echo
echo "netfence's decisions:"
grep "decision action=" "$WORK/netfence.log" | sed 's/^/  /' || echo "  (none)"
echo "what the API received:"
grep "API received" "$WORK/api.log" | sed 's/^/  /' || echo "  (nothing)"
if [ "$result" = 0 ]; then
    echo
    echo "Demo complete: the guest reached the host's web server only where the policy allowed,"
    echo "used an API key it never held, only with the host the key belongs to, and served a page"
    echo "the host reached through a published port."
fi
exit "$result"
