#!/usr/bin/env bash
# Attach a QEMU guest to netfence.
#
#   vmm-configs/qemu.sh KERNEL INITRD [KERNEL-CMDLINE]
#
# netfence must already be serving the socket, e.g.
#   netfence run --socket /tmp/netfence.sock --guest-mac 52:54:00:4e:46:02
# (QEMU is the vhost-user client: netfence listens, QEMU connects.)
#
# What each netfence-related flag is for:
#   -object memory-backend-memfd,...,share=on + -numa node,memdev=mem
#       vhost-user shares guest RAM with the backend: it must be a shareable memfd (or a
#       hugetlbfs file with share=on). Its size must equal -m.
#   -chardev socket,id=c0,path=SOCK    the connection to netfence's socket (add
#       reconnect=1 to have QEMU reconnect when netfence restarts)
#   -netdev vhost-user,id=n0,chardev=c0
#       the network backend is netfence; for multiqueue (netfence run --queues N) add
#       queues=N here and mq=on to the -device (with KVM also vectors=2N+2), and give the
#       guest N vCPUs: it uses one pair per vCPU at most. QUEUES=N below does it.
#   -device virtio-net-pci,netdev=n0,mac=MAC
#       mac= must equal netfence's --guest-mac: QEMU 7.2 keeps its own virtio-net config
#       space (it ignores the backend's), so the guest uses QEMU's MAC.
#   vectors=0
#       only needed under TCG (no KVM): Debian's QEMU 7.2 segfaults starting a vhost-user
#       virtio-net-pci with MSI-X without KVM. With -accel kvm, drop it.
#   -smp N,maxcpus=2 (at least 2)
#       only matters under TCG: with maxcpus=1 TCG leaves out the guest's memory barriers, and
#       the virtio notification handshake with a vhost-user backend then loses a kick or a
#       call now and then (netfence recovers within a second, but the guest stalls that long).
#   -nodefaults (or -nic none)
#       so QEMU adds no default NIC with its own user-mode network next to netfence's.
set -euo pipefail

KERNEL="${1:?usage: qemu.sh KERNEL INITRD [CMDLINE]}"
INITRD="${2:?usage: qemu.sh KERNEL INITRD [CMDLINE]}"
CMDLINE="${3:-console=ttyS0}"
SOCK="${NETFENCE_SOCKET:-/tmp/netfence.sock}"
MAC="${GUEST_MAC:-52:54:00:4e:46:02}" # netfence's default --guest-mac
MEM="${MEM:-512}"                     # MiB; memory-backend size below follows it
QUEUES="${QUEUES:-1}"                 # queue pairs: netfence run --queues QUEUES

# KVM when /dev/kvm is usable, TCG otherwise (then vectors=0, see above). ACCEL=tcg forces TCG
# (needed where /dev/kvm exists but cannot boot a stock kernel, as on this project's CI machines).
if [ -w /dev/kvm ] && [ "${ACCEL:-auto}" != tcg ]; then
    ACCEL_ARGS=(-accel kvm -cpu host)
    SMP="$QUEUES"
    NIC="virtio-net-pci,netdev=n0,mac=$MAC"
    [ "$QUEUES" -gt 1 ] && NIC="$NIC,mq=on,vectors=$((2 * QUEUES + 2))"
else
    ACCEL_ARGS=(-accel tcg -cpu qemu64)
    SMP="$QUEUES,maxcpus=$((QUEUES > 2 ? QUEUES : 2))"
    NIC="virtio-net-pci,netdev=n0,mac=$MAC,vectors=0"
    [ "$QUEUES" -gt 1 ] && NIC="$NIC,mq=on"
fi
NETDEV="vhost-user,id=n0,chardev=c0"
[ "$QUEUES" -gt 1 ] && NETDEV="$NETDEV,queues=$QUEUES"

exec qemu-system-x86_64 "${ACCEL_ARGS[@]}" -m "$MEM" -smp "$SMP" \
    -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on" -numa node,memdev=mem \
    -nodefaults -nographic -serial mon:stdio \
    -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE" \
    -chardev "socket,id=c0,path=$SOCK" \
    -netdev "$NETDEV" \
    -device "$NIC"
