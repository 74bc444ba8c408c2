#!/usr/bin/env bash
# Install the Debian packages netfence's scripts and tests need, idempotently.
#
#   scripts/install-deps.sh            # as root (CI) or as a user with sudo
#
# Packages:
#   qemu-system-x86   the VMM the real-guest tests, the demo and the benchmark boot (TCG)
#   linux-image-amd64 the guest kernel (and its virtio modules), packed by build-guest.sh
#   busybox-static    the guest's userland (sh, udhcpc, ping, nc, wget, ...)
#   curl iperf3       guest tools (copied into the guest image with their shared libraries)
#   socat             a UDP server in the test guest (published ports); handy by hand too
#   passt             the peer user-mode backend bench-guest.sh compares against
#   cpio gzip xz-utils zstd   packing the initramfs, unpacking compressed kernel modules
#   python3 openssl   the demo's host HTTP and HTTPS servers and the HTTPS server's certificates
#   tcpdump           reads the --pcap files in tests/harness_records.rs (is what operators use)
#   build-essential pkg-config   linking the Rust crate (cc) on a bare machine
#   dpdk-dev          dpdk-testpmd, the independent vhost-user frontend of tests/frontend_dpdk.rs
#                     (Debian 12 ships the binary in dpdk-dev; the `dpdk` package only has scripts)
#   librte-net-virtio23   the net_virtio_user driver testpmd loads as a plugin at run time
#                         (dpdk-dev pulls it in today, through libdpdk-dev; named so it stays)
#   systemd           systemd-analyze, which checks packaging/netfence@.service (tests/packaging.rs);
#                     nothing here runs systemd as init
#
# Then scripts/hugepages.sh reserves the hugepages and mounts the hugetlbfs dpdk-testpmd needs
# (every run: a reservation does not survive a reboot).
#
# `apt-get update` runs only when a package is missing, so a second run makes no network calls.
set -euo pipefail

PACKAGES=(
    qemu-system-x86 linux-image-amd64 busybox-static curl iperf3 socat passt
    cpio gzip xz-utils zstd python3 openssl procps iproute2 build-essential pkg-config
    dpdk-dev librte-net-virtio23 tcpdump systemd
)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "install-deps.sh: need root or sudo to install: ${PACKAGES[*]}" >&2
    exit 1
fi

# netfence carries guest pings over unprivileged ICMP sockets (no CAP_NET_RAW), which the kernel
# allows only to groups inside net.ipv4.ping_group_range (often "1 0": nobody).
"${SUDO[@]}" sh -c 'echo "0 2147483647" > /proc/sys/net/ipv4/ping_group_range' \
    || echo "install-deps.sh: could not set net.ipv4.ping_group_range; guest pings beyond the gateway will fail" >&2

missing=()
for p in "${PACKAGES[@]}"; do
    # "install ok installed" is the only state that means the package is there and configured.
    if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps.sh: all packages present"
else
    echo "install-deps.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

"$HERE/hugepages.sh" \
    || echo "install-deps.sh: hugepage set-up failed; tests/frontend_dpdk.rs will fail until it works" >&2

# A fresh linux-image-amd64 may pull a newer kernel ABI than the one running; build-guest.sh
# picks the newest /boot/vmlinuz-* that has a matching /lib/modules tree, so nothing else to do.
echo "install-deps.sh: done"
