#!/usr/bin/env bash
# netfence demo: a QEMU guest fetches a page from a host server through netfence's policy.
#
#   scripts/demo.sh
#
# On a fresh Debian 12 machine (root or sudo), this:
#   1. installs the packages (scripts/install-deps.sh) and builds the guest image
#      (scripts/build-guest.sh) and netfence (cargo build --release);
#   2. starts a web server on the host's 127.0.0.1 (python3 -m http.server, a random port);
#   3. starts `netfence run` with `--map 203.0.113.7:80=127.0.0.1:PORT`: the guest sees a "public"
#      web server at 203.0.113.7 (a documentation address) that is really the loopback server;
#   4. boots a Linux guest under QEMU (TCG) attached to netfence's vhost-user socket; the guest
#      runs udhcpc, pings its gateway, curls http://203.0.113.7/ (allowed by the default
#      public-only policy) and http://10.1.2.3/ (a private address: denied), then does the same
#      over IPv6 (SLAAC address, http://[2001:db8::7]/ mapped to the same server);
#   5. prints the guest's console and netfence's log as they happen, then a summary.
# Nothing leaves the machine: the only host-side connection netfence makes goes to 127.0.0.1.
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
PORT=""
for _ in $(seq 1 100); do
    PORT="$(sed -n 's/.*port \([0-9][0-9]*\).*/\1/p' "$WORK/http.log" | head -n1)"
    [ -n "$PORT" ] && break
    sleep 0.05
done
[ -n "$PORT" ] || { echo "demo: the web server did not start:" >&2; cat "$WORK/http.log" >&2; exit 1; }
echo "web server: http://127.0.0.1:$PORT/"

step "starting netfence (default policy public-only; 203.0.113.7:80 mapped to 127.0.0.1:$PORT)"
SOCK="$WORK/netfence.sock"
echo "\$ netfence run --socket $SOCK --guest-mac $GUEST_MAC --map 203.0.113.7:80=127.0.0.1:$PORT --map '[2001:db8::7]:80=127.0.0.1:$PORT'"
NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$NETFENCE" run --socket "$SOCK" --guest-mac "$GUEST_MAC" \
    --map "203.0.113.7:80=127.0.0.1:$PORT" --map "[2001:db8::7]:80=127.0.0.1:$PORT" \
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
cat >"$WORK/guest.sh" <<'EOF'
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
EOF
set +e
scripts/run-guest.sh --vhost-user "$SOCK" --mac "$GUEST_MAC" --script "$WORK/guest.sh" --timeout 120 2>&1 |
    sed -u 's/\r$//' | tee "$WORK/console.log" | sed -u 's/^/  guest    | /'
set -e
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
echo
echo "netfence's decisions:"
grep "decision" "$WORK/netfence.log" | sed 's/^/  /' || echo "  (none)"
if [ "$result" = 0 ]; then
    echo
    echo "Demo complete: the guest reached the host's web server only where the policy allowed."
fi
exit "$result"
