#!/usr/bin/env bash
# Builds the default guest that `vmm run` boots when given no --kernel/--rootfs:
#
#   $guest/vmlinux       the kernel (build-kernel.sh)
#   $guest/bzImage       the same kernel as a bzImage
#   $guest/System.map    its symbols, to look up a stuck guest's RIP
#   $guest/release       its release string (what `uname -r` prints in the guest)
#   $guest/rootfs.ext4   Debian bookworm minbase + criu, busybox + the guest agent
#                        as /sbin/vmm-agent (build-rootfs.sh)
#   $guest/vmm-agent     the guest agent, which `vmm run --image` adds to the
#                        root disks it makes from container images
#
# where $guest is ${VMM_GUEST_DIR:-${VMM_CACHE_DIR:-~/.cache/vmm}/guest}.
# Idempotent: each piece is cached and only rebuilt when its inputs change. The
# rootfs image is replaced only when it is rebuilt (new agent, packages or
# script), so what a guest wrote to it survives a rerun; pass --fresh-rootfs
# to start from a pristine image. Files are replaced atomically (temp + rename).
# Prints $guest.
set -euo pipefail

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

fresh=0
for arg in "$@"; do
    case "$arg" in
    --fresh-rootfs) fresh=1 ;;
    -h | --help)
        sed -n '2,/^set -e/{/^#/s/^# \{0,1\}//p}' "$0"
        exit 0
        ;;
    *) die "unknown argument $arg (known: --fresh-rootfs)" ;;
    esac
done

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}
guest=${VMM_GUEST_DIR:-$cache/guest}
mkdir -p "$guest"

# Replaces $2 by $1's content atomically, unless it already has it. Hard-links
# when possible (the kernel cache is read-only by convention), else copies.
place() {
    local src=$1 dst=$2 tmp="$2.tmp.$$"
    if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
        return 0
    fi
    rm -f "$tmp"
    ln "$src" "$tmp" 2>/dev/null || cp "$src" "$tmp"
    mv -f "$tmp" "$dst"
}

# 1. Kernel (about 12 minutes on 2 cores the first time, then cached).
vmlinux=$("$here/build-kernel.sh")
[ -f "$vmlinux" ] || die "build-kernel.sh printed '$vmlinux', which is not a file"
kdir=$(dirname "$vmlinux")
place "$vmlinux" "$guest/vmlinux"
for f in System.map release bzImage; do
    if [ -f "$kdir/$f" ]; then place "$kdir/$f" "$guest/$f"; fi
done

# 2. Guest agent: a static, non-PIE release binary (no dynamic loader, no
#    self-relocation at startup: fewer page faults while the guest kernel is
#    interpreted).
command -v cargo >/dev/null || die "cargo not found (install Rust: https://rustup.rs)"
target=x86_64-unknown-linux-gnu
log "building the guest agent"
(
    cd "$repo"
    RUSTFLAGS='-C target-feature=+crt-static -C relocation-model=static' \
        nice cargo build --release -p guest-agent -p vmm-ckpt --bins --lib --target "$target" >&2
)
bindir="${CARGO_TARGET_DIR:-$repo/target}/$target/release"
agent="$bindir/vmm-agent"
[ -x "$agent" ] || die "cargo did not produce $agent"
if command -v file >/dev/null && ! file -b "$agent" | grep -q 'statically linked'; then
    die "$agent is not statically linked: the guest image has no dynamic loader for it"
fi
# The in-guest checkpoint library's C test program, linked as a user would:
# static, against libvmm_ckpt.a and its header.
log "building vmm-ckpt-counter"
cc -static -O2 -Wall -Werror -I "$repo/guest-agent/ckpt/include" \
    -o "$bindir/vmm-ckpt-counter.tmp" "$here/guest-programs/ckpt-counter.c" \
    "$bindir/libvmm_ckpt.a" -lpthread -ldl -lm -lrt >&2
mv -f "$bindir/vmm-ckpt-counter.tmp" "$bindir/vmm-ckpt-counter"

place "$agent" "$guest/vmm-agent"

# 3. Root filesystem image, assembled in place in the guest dir.
if [ "$fresh" = 1 ]; then
    rm -f "$guest/rootfs.ext4.stamp"
fi
"$here/build-rootfs.sh" "$agent" "$guest/rootfs.ext4" >/dev/null

echo "$guest"
