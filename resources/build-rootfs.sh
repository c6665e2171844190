#!/usr/bin/env bash
# Builds the default guest's root filesystem image.
#
#   build-rootfs.sh AGENT_BINARY OUTPUT_IMAGE
#
# Two stages, each skipped when its inputs have not changed:
#  1. base: a Debian bookworm minbase tree made by mmdebstrap from the host's apt
#     sources, cached under $cache/rootfs/<key>/base, where <key> hashes the
#     mmdebstrap arguments (package list included) and the host's apt sources
#     (about 25 s here).
#  2. image: base + the guest agent (/sbin/vmm-agent) + a few /etc files, packed
#     with mkfs.ext4 -d into OUTPUT_IMAGE (a 1 GiB sparse file; a few seconds).
#     OUTPUT_IMAGE.stamp records what it was built from; the image is rebuilt
#     only when that changes (a new agent, a new base, a new script), so the
#     state a guest left in the image survives reruns.
# Prints OUTPUT_IMAGE.
#
# Environment: VMM_CACHE_DIR (default ~/.cache/vmm), VMM_ROOTFS_SIZE (default 1G).
set -euo pipefail

log() { echo "build-rootfs: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ $# -eq 2 ] || die "usage: $0 AGENT_BINARY OUTPUT_IMAGE"
agent=$1
out=$2
[ -f "$agent" ] || die "agent binary $agent not found (build it with: cargo build --release -p guest-agent)"
[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap and mkfs.ext4 -d keep file ownership)"

here=$(cd "$(dirname "$0")" && pwd)
self="$here/$(basename "$0")"
cache=${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}
size=${VMM_ROOTFS_SIZE:-1G}
sources=/etc/apt/sources.list.d/debian.sources
suite=bookworm

# What the guest needs beyond minbase: criu and busybox for checkpointing and
# small tools; procps (ps, top) and iproute2 (ip) for looking inside a guest.
packages=(criu busybox procps iproute2)

# Install what this script runs, once.
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v flock >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "${need[@]}" >&2
fi
[ -f "$sources" ] || die "$sources missing: mmdebstrap takes the Debian mirror from the host's apt sources"

inc=$(IFS=,; echo "${packages[*]}")
# Docs, man pages and translations are useless in the guest; copyright files
# stay. The hooks drop the apt sources (the guest has no network to use them)
# and the host's resolver config mmdebstrap copies in.
mmdebstrap_args=(
    --variant=minbase --mode=root --include="$inc"
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --customize-hook='rm -f "$1"/etc/apt/sources.list "$1"/etc/apt/sources.list.d/* "$1"/etc/resolv.conf'
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin'
    "$suite"
)
# The base depends on exactly this: the mmdebstrap arguments (package list
# included) and the host's apt sources. Bump base_version to force a rebuild.
base_version=1
key=$( {
    echo "$base_version"
    printf '%s\n' "${mmdebstrap_args[@]}"
    cat "$sources"
} | sha256sum | cut -c1-16)
dir="$cache/rootfs/$key"
base="$dir/base"
mkdir -p "$dir"

# One builder at a time per key; a second caller waits and then reuses.
exec 9>"$dir/.lock"
flock 9

if [ ! -f "$base/.complete" ]; then
    log "mmdebstrap $suite minbase + ${packages[*]}"
    start=$(date +%s)
    rm -rf "$base" "$base.tmp"
    mmdebstrap "${mmdebstrap_args[@]}" "$base.tmp" - <"$sources" >&2
    touch "$base.tmp/.complete"
    mv "$base.tmp" "$base"
    log "base built in $(($(date +%s) - start)) s"
fi

# The in-guest tools built next to the agent (vmm-ckpt, the system-call
# benchmark, the network test server, the checkpoint library's test program)
# go in too, and the checkpoint library with its header.
bindir=$(dirname "$agent")
tools=()
for t in vmm-ckpt vmm-syscall-bench vmm-netserve vmm-ckpt-counter; do
    if [ -f "$bindir/$t" ]; then tools+=("$bindir/$t"); fi
done
lib="$bindir/libvmm_ckpt.a"
header="$here/../guest-agent/ckpt/include/vmm_ckpt.h"
stamp=$( {
    echo "$key $size"
    sha256sum <"$agent"
    for t in "${tools[@]}"; do sha256sum <"$t"; done
    if [ -f "$lib" ]; then sha256sum <"$lib"; fi
    cat "$header"
    cat "$self"
} | sha256sum | cut -c1-16)
if [ -f "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "$out"
    exit 0
fi

log "assembling $out"
start=$(date +%s)
outdir=$(dirname "$out")
mkdir -p "$outdir"
stage=$(mktemp -d "$dir/stage.XXXXXX")
tmp="$out.tmp.$$"
trap 'rm -rf "$stage" "$tmp"' EXIT
cp -a "$base/." "$stage/"
rm -f "$stage/.complete"

install -m 0755 -o 0 -g 0 "$agent" "$stage/sbin/vmm-agent"
for t in "${tools[@]}"; do
    install -m 0755 -o 0 -g 0 "$t" "$stage/usr/local/bin/$(basename "$t")"
done
if [ -f "$lib" ]; then
    install -D -m 0644 -o 0 -g 0 "$lib" "$stage/usr/local/lib/libvmm_ckpt.a"
fi
install -D -m 0644 -o 0 -g 0 "$header" "$stage/usr/local/include/vmm_ckpt.h"
install -d -m 0755 "$stage/etc/vmm/restore.d"
echo vmm >"$stage/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tvmm\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$stage/etc/hosts"
: >"$stage/etc/fstab"
install -d -m 0700 "$stage/root"
# An empty /dev: the kernel mounts devtmpfs there, and the agent mounts it
# itself if /dev/null is missing; mmdebstrap's static nodes would hide that.
rm -rf "$stage/dev"
install -d -m 0755 "$stage/proc" "$stage/sys" "$stage/dev"
install -d -m 1777 "$stage/tmp"

rm -f "$tmp"
truncate -s "$size" "$tmp"
# The guest kernel is interpreted on hosts without hardware virtualization, so
# do on the host what it would otherwise do at run time:
# - no metadata_csum: every metadata block read or written would be checksummed
#   by software crc32c in the guest, milliseconds per block here;
# - lazy_itable_init=0, lazy_journal_init=0: zero the inode tables and journal
#   now instead of in the guest's ext4lazyinit thread after mount;
# - no reserved blocks: nothing runs as a non-root user that needs them.
mkfs.ext4 -q -F -L vmm-root -m 0 -O ^metadata_csum \
    -E root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0 \
    -d "$stage" "$tmp" >&2
mv -f "$tmp" "$out"
echo "$stamp" >"$out.stamp"
log "image assembled in $(($(date +%s) - start)) s"
echo "$out"
