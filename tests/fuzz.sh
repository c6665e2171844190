#!/usr/bin/env bash
# Fuzzes the parsers of untrusted input, FUZZ_SECONDS (default 60) each,
# from their committed seeds: the image reader (snapshot/fuzz), the
# control channel's frames (guest-agent/abi/fuzz) and the API's requests
# (vmm/fuzz). Installs cargo-fuzz if it is missing; needs the nightly
# toolchain (libFuzzer, sanitizers).
# Prints libFuzzer's figures per target; a crash fails the run, and its
# reproducer (under CRATE/fuzz/artifacts/TARGET/) belongs in the target's
# corpus once fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: the nightly toolchain is required (rustup toolchain install nightly)"
    exit 1
fi
if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz: installing cargo-fuzz"
    cargo install --locked --quiet cargo-fuzz
fi

fuzz() {
    local dir=$1 target=$2
    local work log
    work=$(mktemp -d)
    log=$(mktemp)
    # New inputs go to a scratch corpus; the committed seeds are read only.
    # No leak checks: std::thread::scope returns once its threads' closures
    # end, before their thread-local destructors have run, and LeakSanitizer
    # then reports glibc's TLS-destructor record of an exiting worker
    # (32 bytes from __cxa_thread_atexit_impl, not reproducible from the
    # input alone). Panics, overflows and out-of-bounds are what we hunt.
    if ! (cd "$dir" && cargo +nightly fuzz run --release "$target" "$work" "fuzz/corpus/$target" -- \
        -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 -detect_leaks=0) >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz: $dir $target FAILED (reproducer under $dir/fuzz/artifacts/$target/)"
        exit 1
    fi
    local done_line
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
    echo "fuzz: $dir $target: $(grep -E '^Done [0-9]+ runs' "$log" | tail -n 1) | ${done_line:-no final status} | $(grep -E '^stat::(average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" | tr '\n' ' ')"
    rm -rf "$work" "$log"
}

fuzz snapshot read_image
fuzz guest-agent/abi read_frame
fuzz vmm parse_request
