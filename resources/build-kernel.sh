#!/usr/bin/env bash
# Builds the default guest's kernel: Debian's linux-source-6.1, our patches,
# tinyconfig + kernel/guest.config. Prints the path of the resulting ELF vmlinux;
# a bzImage of the same kernel is left next to it (`vmm run --kernel` takes both).
#
# The build is cached outside the checkout, keyed by a hash of the source
# tarball's name and size, the config fragment, the patches and this script, so a
# second run is instant and a changed config rebuilds.
#
# Environment: VMM_CACHE_DIR (default ~/.cache/vmm), JOBS (default: nproc).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}
tarball=/usr/src/linux-source-6.1.tar.xz
jobs=${JOBS:-$(nproc)}

log() { echo "build-kernel: $*" >&2; }

if [ ! -f "$tarball" ]; then
    log "$tarball missing; installing linux-source-6.1"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq linux-source-6.1 flex bison bc libelf-dev libssl-dev xz-utils >&2
fi
for tool in flex bison bc; do
    command -v "$tool" >/dev/null || {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq flex bison bc libelf-dev libssl-dev >&2
        break
    }
done

key=$( {
    stat -c '%n %s' "$tarball"
    cat "$here/kernel/guest.config" "$here"/kernel/patches/*.patch "$here/build-kernel.sh"
} | sha256sum | cut -c1-16)
out="$cache/kernel/$key"

if [ -f "$out/vmlinux" ]; then
    echo "$out/vmlinux"
    exit 0
fi

work="$cache/kernel/build-$key"
rm -rf "$work"
mkdir -p "$work"
log "extracting $tarball"
tar -C "$work" -xf "$tarball"
src="$work/linux-source-6.1"
for p in "$here"/kernel/patches/*.patch; do
    log "applying $(basename "$p")"
    patch -s -d "$src" -p1 <"$p"
done

log "configuring (tinyconfig + guest.config)"
make -s -C "$src" ARCH=x86_64 tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/kernel/guest.config" >/dev/null
make -s -C "$src" ARCH=x86_64 olddefconfig >&2

# Every line of the fragment must have survived olddefconfig.
missing=0
while IFS= read -r line; do
    case "$line" in CONFIG_*=*) ;; *) continue ;; esac
    name=${line%%=*}
    value=${line#*=}
    if [ "$value" = n ]; then
        if grep -q "^$name=" "$src/.config"; then
            log "config: $name should be off but is $(grep "^$name=" "$src/.config")"
            missing=1
        fi
    elif ! grep -qxF "$line" "$src/.config"; then
        log "config: wanted $line, got: $(grep "^$name=\|^# $name is" "$src/.config" || echo unset)"
        missing=1
    fi
done <"$here/kernel/guest.config"
[ "$missing" = 0 ] || { log "guest.config does not apply cleanly"; exit 1; }

log "compiling with $jobs jobs (about 12 minutes on 2 cores)"
start=$(date +%s)
make -s -C "$src" ARCH=x86_64 -j"$jobs" vmlinux bzImage >&2
log "compiled in $(($(date +%s) - start)) s"

mkdir -p "$out.tmp"
cp "$src/vmlinux" "$src/System.map" "$src/.config" "$src/arch/x86/boot/bzImage" "$out.tmp/"
make -s -C "$src" ARCH=x86_64 kernelrelease >"$out.tmp/release"
rm -rf "$out"
mv "$out.tmp" "$out"
rm -rf "$work"
echo "$out/vmlinux"
