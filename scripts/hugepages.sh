#!/usr/bin/env bash
# Reserve 2 MiB hugepages and mount hugetlbfs for dpdk-testpmd, idempotently.
#
#   scripts/hugepages.sh [PAGES]        # as root (CI) or as a user with sudo; default 256
#
# Why: tests/frontend_dpdk.rs runs dpdk-testpmd as an independent vhost-user frontend, and DPDK
# takes its memory (mbufs and the virtqueues netfence reads) from hugepages, which the
# vhost-user frontend shares with the backend by file descriptor.
#
# How many: each testpmd runs with `-m 256` (256 MiB = 128 pages of 2 MiB, allocated at start,
# with --single-file-segments in one file per memseg list) and the tests run one testpmd at a
# time. 256 pages (512 MiB) leave room for a second instance (someone running a benchmark
# beside the tests) without touching the rest of a small machine's RAM.
#
# The reservation only ever grows here: a machine that already has more pages keeps them. The
# kernel may grant fewer pages than asked when memory is fragmented; that is reported, and a
# testpmd that cannot get its memory fails its test with DPDK's own error.
set -euo pipefail

PAGES="${1:-256}"
NR=/proc/sys/vm/nr_hugepages
MOUNTPOINT=/dev/hugepages

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "hugepages.sh: need root or sudo to reserve hugepages" >&2
    exit 1
fi

if [ "$(grep -s '^Hugepagesize:' /proc/meminfo | awk '{print $2}')" != "2048" ]; then
    echo "hugepages.sh: the default hugepage size is not 2048 kB; sizes assumed here are wrong" >&2
fi

have="$(cat "$NR")"
if [ "$have" -lt "$PAGES" ]; then
    "${SUDO[@]}" sh -c "echo $PAGES > $NR"
    have="$(cat "$NR")"
    if [ "$have" -lt "$PAGES" ]; then
        echo "hugepages.sh: asked for $PAGES hugepages, the kernel granted $have" >&2
    fi
fi

# hugetlbfs on /dev/hugepages (systemd mounts it on a full system; containers often lack it).
if ! awk -v m="$MOUNTPOINT" '$2 == m && $3 == "hugetlbfs" { found = 1 } END { exit !found }' /proc/mounts; then
    "${SUDO[@]}" mkdir -p "$MOUNTPOINT"
    "${SUDO[@]}" mount -t hugetlbfs -o pagesize=2M nodev "$MOUNTPOINT"
fi

free="$(grep -s '^HugePages_Free:' /proc/meminfo | awk '{print $2}')"
echo "hugepages.sh: $have hugepages of 2 MiB reserved ($free free), hugetlbfs on $MOUNTPOINT"
