#!/usr/bin/env bash
# Runs every test of the project on a fresh Debian machine with /dev/kvm:
# installs what it needs, builds the default guest and the VMM, then runs the
# unit tests, the image-format tests and the real-guest integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
need=()
for cmd in gcc make flex bison bc mkfs.ext4 debugfs mmdebstrap unshare xz patch ip sysctl; do
    command -v "$cmd" >/dev/null || need+=("$cmd")
done
[ -f /usr/src/linux-source-6.1.tar.xz ] || need+=(linux-source)
# The container-image tests build their image from a static busybox.
[ -x /usr/bin/busybox ] && file -L /usr/bin/busybox 2>/dev/null | grep -q 'statically linked' || need+=(busybox-static)
if [ "${#need[@]}" -gt 0 ]; then
    echo "run-all: installing build dependencies (missing: ${need[*]})"
    apt-get update -qq
    apt-get install -y -qq build-essential flex bison bc libelf-dev libssl-dev \
        e2fsprogs mmdebstrap util-linux xz-utils patch linux-source-6.1 iproute2 procps \
        busybox-static file >/dev/null
fi
command -v cargo >/dev/null || { echo "run-all: cargo is required (rustup)"; exit 1; }

start=$(date +%s)
bash resources/build-guest.sh
echo "run-all: guest ready after $(($(date +%s) - start)) s"

cargo build --release --workspace
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
echo "run-all: build and lints done after $(($(date +%s) - start)) s"

# Linux boots are long here; run test binaries one test at a time so two
# guests never fight over the 2 cores and time out.
cargo test --release --workspace -- --test-threads=1
echo "run-all: all tests passed after $(($(date +%s) - start)) s"

# The parsers of untrusted input, fuzzed for a bounded time on every run.
bash tests/fuzz.sh
echo "run-all: fuzzing done after $(($(date +%s) - start)) s"
