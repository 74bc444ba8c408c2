#!/usr/bin/env bash
# Attach a cloud-hypervisor guest to netfence.
#
#   vmm-configs/cloud-hypervisor.sh KERNEL [DISK] [KERNEL-CMDLINE]
#
# netfence must already be serving the socket:
#   netfence run --socket /tmp/netfence.sock --guest-mac 52:54:00:4e:46:02
#
#   --memory size=512M,shared=on
#       vhost-user shares guest RAM with the backend: the memory must be shared.
#   --net vhost_user=true,socket=SOCK,num_queues=2,mac=MAC
#       the guest NIC is served by netfence over SOCK (cloud-hypervisor is the client);
#       num_queues=2 is one RX/TX pair, which netfence serves by default. For multiqueue run
#       netfence with --queues N and set num_queues=2N and --cpus boot=N (QUEUES=N below):
#       cloud-hypervisor refuses to start if num_queues exceeds what the backend reports.
#       mac= keeps the guest's MAC equal to netfence's --guest-mac.
#       vhost_mode=client (the default) means netfence listens and cloud-hypervisor connects.
#
# cloud-hypervisor needs KVM (/dev/kvm usable by a stock guest kernel).
set -euo pipefail

KERNEL="${1:?usage: cloud-hypervisor.sh KERNEL [DISK] [CMDLINE]}"
DISK="${2:-}"
CMDLINE="${3:-console=hvc0 root=/dev/vda1 rw}"
SOCK="${NETFENCE_SOCKET:-/tmp/netfence.sock}"
MAC="${GUEST_MAC:-52:54:00:4e:46:02}"
QUEUES="${QUEUES:-1}" # queue pairs: netfence run --queues QUEUES

DISK_ARGS=()
[ -n "$DISK" ] && DISK_ARGS=(--disk "path=$DISK")

exec cloud-hypervisor \
    --kernel "$KERNEL" --cmdline "$CMDLINE" "${DISK_ARGS[@]}" \
    --cpus "boot=$QUEUES" \
    --memory size=512M,shared=on \
    --net "vhost_user=true,socket=$SOCK,num_queues=$((2 * QUEUES)),mac=$MAC" \
    --console off --serial tty
