#!/usr/bin/env bash
# Build the test guest: a Debian kernel plus a busybox initramfs with curl, iperf3 and socat.
#
#   scripts/build-guest.sh [--force]
#
# Outputs (both gitignored, under the repository's target/):
#   target/guest/vmlinuz            the installed linux-image-amd64 kernel
#   target/guest/initramfs.cpio.gz  busybox-static + its applets, curl, iperf3, socat (with the shared
#                                   libraries ldd finds), the virtio-net modules, and /init
#
# /init mounts proc/sys/dev, loads virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev
# virtio_pci failover net_failover virtio_net (in that order: the Debian kernel has them as
# modules), then decodes the base64 `script=` kernel-command-line argument (gzip-compressed when it
# starts with the gzip magic), runs it with sh, prints
#     NETFENCE-GUEST-END rc=<exit status>
# and powers off. scripts/run-guest.sh builds that command line.
#
# The build is skipped when its inputs (this script, the kernel, package versions) are unchanged.
# Needs: scripts/install-deps.sh (qemu is not needed here, only the packages that are packed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${NETFENCE_GUEST_DIR:-$ROOT/target/guest}"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net)
# socat: a UDP server for the published-port tests (busybox's nc here has no -u).
BINARIES=(/usr/bin/curl /usr/bin/iperf3 /usr/bin/socat)

die() { echo "build-guest.sh: $*" >&2; exit 1; }

# --- which kernel: the newest /boot/vmlinuz-* whose module tree is installed -------------------
KVER=""
for k in $(ls /boot/vmlinuz-* 2>/dev/null | sed 's|/boot/vmlinuz-||' | sort -V); do
    [ -d "/lib/modules/$k" ] && KVER="$k"
done
[ -n "$KVER" ] || die "no /boot/vmlinuz-* with /lib/modules/<version>; run scripts/install-deps.sh"
[ -x /bin/busybox ] || die "/bin/busybox missing; run scripts/install-deps.sh (busybox-static)"
for b in "${BINARIES[@]}"; do [ -x "$b" ] || die "$b missing; run scripts/install-deps.sh"; done

# --- skip when nothing changed ----------------------------------------------------------------
stamp_of_inputs() {
    sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1
    echo "kernel $KVER $(stat -c '%s %Y' "/boot/vmlinuz-$KVER")"
    dpkg-query -W -f='${Package} ${Version}\n' busybox-static curl iperf3 socat libcurl4 "linux-image-$KVER" 2>/dev/null || true
    for b in /bin/busybox "${BINARIES[@]}"; do stat -c '%n %s %Y' "$b"; done
}
STAMP="$(stamp_of_inputs)"
if [ "$FORCE" = 0 ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ] &&
    [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$STAMP" ]; then
    echo "build-guest.sh: $OUT is up to date (kernel $KVER)"
    exit 0
fi

echo "build-guest.sh: building guest image for kernel $KVER into $OUT"
mkdir -p "$OUT"
STAGE="$(mktemp -d "$OUT/.stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
cd "$STAGE"
mkdir -p bin sbin usr/bin usr/sbin lib lib64 etc proc sys dev tmp run var/run root \
    etc/udhcpc lib/modules

# --- kernel (root-only readable on some systems) ----------------------------------------------
if [ -r "/boot/vmlinuz-$KVER" ]; then
    cp "/boot/vmlinuz-$KVER" "$OUT/vmlinuz.new"
else
    sudo cat "/boot/vmlinuz-$KVER" >"$OUT/vmlinuz.new"
fi

# --- modules, decompressed so the guest's busybox insmod needs nothing -------------------------
for m in "${MODULES[@]}"; do
    src="$(find "/lib/modules/$KVER/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) | head -n1)"
    if [ -z "$src" ]; then
        # Built into this kernel instead of a module: nothing to load.
        if grep -qw "$m" "/lib/modules/$KVER/modules.builtin" 2>/dev/null ||
            grep -q "/$m.ko" "/lib/modules/$KVER/modules.builtin" 2>/dev/null; then
            echo "build-guest.sh: $m is built in"
            continue
        fi
        die "kernel module $m not found under /lib/modules/$KVER"
    fi
    case "$src" in
        *.ko.xz) xz -dc "$src" >"lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$src" >"lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$src" >"lib/modules/$m.ko" ;;
        *) cp "$src" "lib/modules/$m.ko" ;;
    esac
done
printf '%s\n' "${MODULES[@]}" >lib/modules/order

# --- busybox and its applets --------------------------------------------------------------------
cp /bin/busybox bin/busybox
/bin/busybox --list-full | while read -r applet; do
    [ "$applet" = "bin/busybox" ] && continue
    mkdir -p "$(dirname "$applet")"
    [ -e "$applet" ] || ln -s /bin/busybox "$applet"
done

# --- curl and iperf3 with their shared libraries ------------------------------------------------
copy_with_path() { mkdir -p "$STAGE$(dirname "$1")" && cp -L "$1" "$STAGE$1"; }
for b in "${BINARIES[@]}"; do
    rm -f "$STAGE$b"
    copy_with_path "$b"
    # "libx.so => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)"
    ldd "$b" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}' | while read -r lib; do
        [ -e "$STAGE$lib" ] || copy_with_path "$lib"
    done
done

# --- small /etc ---------------------------------------------------------------------------------
echo "root:x:0:0:root:/root:/bin/sh" >etc/passwd
echo "root:x:0:" >etc/group
echo "127.0.0.1 localhost" >etc/hosts
printf 'hosts: files dns\n' >etc/nsswitch.conf
: >etc/resolv.conf

# udhcpc calls this (Debian busybox: /etc/udhcpc/default.script) on every lease event; it
# ships none, this one configures the interface.
cat >etc/udhcpc/default.script <<'DHCP'
#!/bin/sh
# udhcpc hook: $1 is the event, the lease is in the environment (ip, subnet, router, dns, mtu).
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        if [ -n "$mask" ]; then
            ip addr add "$ip/$mask" dev "$interface"
        else
            ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}"
        fi
        [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
        for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
        : >/etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        echo "udhcpc: lease ip=$ip mask=${mask:-?} router=${router:-none} dns=${dns:-none} mtu=${mtu:-none} lease=${lease:-?}"
        ;;
esac
exit 0
DHCP
chmod +x etc/udhcpc/default.script

# --- /init --------------------------------------------------------------------------------------
cat >init <<'INIT'
#!/bin/sh
# netfence test guest init: set up, run the script from the kernel command line, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ip link set lo up
while read -r m; do
    [ -f "/lib/modules/$m.ko" ] || continue
    insmod "/lib/modules/$m.ko" || echo "NETFENCE-GUEST: insmod $m failed"
done </lib/modules/order
# eth0 appears once virtio_net has probed the device (if there is a virtio device at all).
i=0
while [ -n "$(ls /sys/bus/virtio/devices 2>/dev/null)" ] && [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do
    sleep 0.1
    i=$((i + 1))
done
[ -e /sys/class/net/eth0 ] && ip link set eth0 up
b64=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in script=*) b64="${arg#script=}" ;; esac
done
if [ -z "$b64" ]; then
    echo "NETFENCE-GUEST: no script= on the kernel command line"
    rc=127
else
    echo "$b64" | base64 -d >/tmp/script.raw
    if [ "$(head -c2 /tmp/script.raw | od -An -tx1 | tr -d ' ')" = "1f8b" ]; then
        gunzip -c /tmp/script.raw >/tmp/script.sh
    else
        mv /tmp/script.raw /tmp/script.sh
    fi
    echo "NETFENCE-GUEST-START uptime=$(cut -d' ' -f1 /proc/uptime)"
    sh /tmp/script.sh
    rc=$?
fi
echo "NETFENCE-GUEST-END rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
INIT
chmod +x init

# --- pack ---------------------------------------------------------------------------------------
find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -6 >"$OUT/initramfs.cpio.gz.new"
mv "$OUT/vmlinuz.new" "$OUT/vmlinuz"
mv "$OUT/initramfs.cpio.gz.new" "$OUT/initramfs.cpio.gz"
echo "$STAMP" >"$OUT/.stamp"
echo "build-guest.sh: wrote $OUT/vmlinuz and $OUT/initramfs.cpio.gz ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1))"
