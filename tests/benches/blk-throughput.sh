#!/usr/bin/env bash
# virtio-blk sequential throughput in the Linux guest, for one or more vmm
# binaries in the same run (the first is the baseline):
#
#     tests/benches/blk-throughput.sh OLD_VMM NEW_VMM
#
# Each binary boots the default guest once on its own sparse copy of the
# rootfs and runs, RUNS times (default 3), an MIB MiB (default 16) O_DIRECT
# write and read with dd; prints the median and spread (min..max) of each,
# in MB/s. Here the guest kernel is interpreted, so the figures are bounded
# by the guest's own block layer more than by the device.
set -euo pipefail
runs=${RUNS:-3}
mib=${MIB:-16}
[ $# -ge 1 ] || { echo "usage: $0 VMM [VMM...]" >&2; exit 2; }
guest=$("$(dirname "$0")/../../resources/build-guest.sh" 2>/dev/null | tail -1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
script="for i in \$(seq $runs); do
  dd if=/dev/zero of=/ddtest bs=1M count=$mib oflag=direct 2>&1 | tail -1 | sed 's/^/write: /'
  dd if=/ddtest of=/dev/null bs=1M iflag=direct 2>&1 | tail -1 | sed 's/^/read: /'
  rm -f /ddtest
done"
stats() { # label, then MB/s values on stdin
    sort -g | awk -v l="$1" '{v[NR]=$1} END {
        if (NR == 0) { printf "%-6s no samples\n", l; exit 1 }
        printf "%-6s median %7.1f MB/s (%.1f..%.1f, %d runs)\n", l, v[int((NR+1)/2)], v[1], v[NR], NR }'
}
for bin in "$@"; do
    cp --sparse=always "$guest/rootfs.ext4" "$work/rootfs.ext4"
    out=$("$bin" run --rootfs "$work/rootfs.ext4" -- sh -c "$script")
    echo "== $bin"
    # dd prints "67108864 bytes (67 MB, 64 MiB) copied, 1.23 s, 54.6 MB/s"
    for what in write read; do
        grep "^$what: " <<<"$out" | sed -E 's/.*, ([0-9.]+) ([kMG]?B)\/s.*/\1 \2/' |
            awk '{ f = ($2 == "GB") ? 1000 : ($2 == "kB") ? 0.001 : ($2 == "B") ? 0.000001 : 1; print $1 * f }' |
            stats "$what"
    done
done
