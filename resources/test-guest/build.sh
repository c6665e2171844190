#!/bin/sh
# Builds the test guest: build.sh [OUTPUT.elf [OBJDIR]]
# (default: <workspace>/target/test-guest.elf). Needs only gcc and binutils.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/test-guest.elf}
obj=${2:-$(dirname "$out")/test-guest-obj}
CC=${TEST_GUEST_CC:-gcc}
command -v "$CC" >/dev/null 2>&1 || {
    echo "test-guest: $CC not found: install gcc (apt-get install gcc) to build the test guest" >&2
    exit 1
}
mkdir -p "$obj" "$(dirname "$out")"
# Kernel-mode code is interpreted on hosts without hardware virtualization:
# no SSE/x87, no red zone (interrupts), no stack protector, no PIC.
cflags="-std=gnu11 -O2 -Wall -Wextra -Werror -ffreestanding -fno-builtin -nostdlib
 -fno-pic -fno-pie -mcmodel=small -mno-red-zone -mgeneral-regs-only
 -fno-stack-protector -fno-asynchronous-unwind-tables -fcf-protection=none
 -fno-tree-loop-distribute-patterns"
for src in entry.S regs.S kernel.c user.c; do
    # shellcheck disable=SC2086
    "$CC" $cflags -c "$here/$src" -o "$obj/${src%.*}.o"
done
"$CC" -nostdlib -static -no-pie -Wl,--build-id=none -Wl,-T,"$here/linker.ld" \
    -Wl,-z,max-page-size=4096 -o "$obj/test-guest.elf" \
    "$obj/entry.o" "$obj/regs.o" "$obj/kernel.o" "$obj/user.o"
cp "$obj/test-guest.elf" "$out.tmp"
mv "$out.tmp" "$out"
