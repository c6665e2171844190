/*
 * vmm-ckpt-counter NAME BEFORE AFTER: counts to BEFORE, checkpoints the VM
 * with vmm_checkpoint(NAME), prints "original 0" or "restored 1" (or
 * "failed ERRNO TEXT" and exits 2), then counts on to BEFORE + AFTER.
 * The tests run it in the default guest: a restored VM must print
 * "restored 1" and carry on counting from where the checkpoint was.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <vmm_ckpt.h>

int main(int argc, char **argv)
{
    const char *name = argc > 1 ? argv[1] : "t1";
    int before = argc > 2 ? atoi(argv[2]) : 3;
    int after = argc > 3 ? atoi(argv[3]) : 5;
    int i = 0;

    for (; i < before; i++)
        printf("count %d\n", i);
    fflush(stdout);
    int r = vmm_checkpoint(name);
    if (r < 0) {
        int e = errno;
        printf("failed %d %s\n", e, strerror(e));
        return 2;
    }
    printf("%s %d\n", r ? "restored" : "original", r);
    fflush(stdout);
    for (; i < before + after; i++) {
        printf("count %d\n", i);
        fflush(stdout);
        usleep(100 * 1000);
    }
    return 0;
}
