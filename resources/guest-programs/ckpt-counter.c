/*
 * vmm-ckpt-counter NAME BEFORE AFTER: counts to BEFORE, checkpoints the VM
 * with vmm_checkpoint(NAME), prints "original 0" or "restored 1" (or
 * "failed ERRNO TEXT" and exits 2), then counts on to BEFORE + AFTER. In
 * the original run it also prints "took-us N": how long the call took.
 * The tests run it in the default guest: a restored VM must print
 * "restored 1" and carry on counting from where the checkpoint was.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
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
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int r = vmm_checkpoint(name);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (r < 0) {
        int e = errno;
        printf("failed %d %s\n", e, strerror(e));
        return 2;
    }
    printf("%s %d\n", r ? "restored" : "original", r);
    if (r == 0)
        printf("took-us %ld\n", (long)((t1.tv_sec - t0.tv_sec) * 1000000L + (t1.tv_nsec - t0.tv_nsec) / 1000));
    fflush(stdout);
    for (; i < before + after; i++) {
        printf("count %d\n", i);
        fflush(stdout);
        usleep(100 * 1000);
    }
    return 0;
}
