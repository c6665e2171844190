/* User mode (ring 3, IOPL 3) of the test guest: the workloads. Runs natively
 * even where guest kernel code is interpreted. It never enters the kernel:
 * it reads the tick counters the timer interrupt updates in memory, and does
 * port I/O to the serial port (0x3f8), the exit status port (0x510) and the
 * i8042 (0x64) itself. The output format is documented in README.md. */
#include "guest.h"

#define offsetof(t, f) __builtin_offsetof(t, f)

struct regs_block {
    volatile u64 *tick_ptr;
    u64 last;
    u64 avx;
    u64 pad0;
    u64 exp_gp[13];
    u64 exp_fcw, exp_mxcsr;
    s64 exp_st[8];
    u64 pad1;
    u64 exp_vec[16][4];
    u64 out_gp[13];
    u64 out_fcw, out_mxcsr;
    s64 out_st[8];
    u64 pad2;
    u64 out_vec[16][4];
};
_Static_assert(offsetof(struct regs_block, exp_gp) == RB_EXP_GP, "layout");
_Static_assert(offsetof(struct regs_block, exp_fcw) == RB_EXP_FCW, "layout");
_Static_assert(offsetof(struct regs_block, exp_mxcsr) == RB_EXP_MXCSR, "layout");
_Static_assert(offsetof(struct regs_block, exp_st) == RB_EXP_ST, "layout");
_Static_assert(offsetof(struct regs_block, exp_vec) == RB_EXP_VEC, "layout");
_Static_assert(offsetof(struct regs_block, out_gp) == RB_OUT_GP, "layout");
_Static_assert(offsetof(struct regs_block, out_fcw) == RB_OUT_FCW, "layout");
_Static_assert(offsetof(struct regs_block, out_mxcsr) == RB_OUT_MXCSR, "layout");
_Static_assert(offsetof(struct regs_block, out_st) == RB_OUT_ST, "layout");
_Static_assert(offsetof(struct regs_block, out_vec) == RB_OUT_VEC, "layout");
_Static_assert(sizeof(struct regs_block) == RB_SIZE, "layout");

u64 regs_wait(struct regs_block *b);

static struct regs_block blocks[MAX_CPUS];
static volatile u8 reported[MAX_CPUS];

/* gcc may emit calls to these. */
void *memset(void *d, int c, u64 n) { return gmemset(d, c, n); }
void *memcpy(void *d, const void *s, u64 n) { return gmemcpy(d, s, n); }

/* ---- console ---- */

struct line {
    char b[512];
    u32 n;
};

static void add_str(struct line *l, const char *s) {
    while (*s && l->n < sizeof l->b - 1)
        l->b[l->n++] = *s++;
}

static void add_dec(struct line *l, u64 v) {
    char t[21];
    int i = 20;
    t[i] = 0;
    do
        t[--i] = (char)('0' + v % 10);
    while (v /= 10);
    add_str(l, t + i);
}

static void add_hex(struct line *l, u64 v, int width) {
    char t[17];
    int i = 16;
    t[i] = 0;
    do
        t[--i] = "0123456789abcdef"[v & 15];
    while ((v >>= 4) && i > 0);
    while (16 - i < width)
        t[--i] = '0';
    add_str(l, t + i);
}

static volatile u32 console_lock;

static void lock_console(void) {
    while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
        while (console_lock)
            __asm__ volatile("pause");
}

static void unlock_console(void) { __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE); }

/* Writes one whole line; lines from different CPUs never interleave. */
static void emit(struct line *l) {
    l->b[l->n++] = '\n';
    lock_console();
    for (u32 i = 0; i < l->n; i++)
        outb(0x3f8, (u8)l->b[i]);
    unlock_console();
    l->n = 0;
}

static __attribute__((noreturn)) void guest_exit(u32 code) {
    lock_console(); /* nobody is halfway through a line */
    outb(0x510, (u8)code);
    outb(0x64, 0xfe);
    for (;;)
        __asm__ volatile("pause");
}

/* ---- registers ---- */

static u64 mix64(u64 x) {
    x += 0x9e3779b97f4a7c15UL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9UL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebUL;
    return x ^ (x >> 31);
}

static const char *const gp_names[13] = {"rbx", "rdx", "rsi", "rdi", "rbp", "r8",  "r9",
                                         "r10", "r11", "r12", "r13", "r14", "r15"};

static void regs_setup(struct regs_block *b, u64 cpu) {
    b->tick_ptr = &cpus[cpu].ticks;
    b->avx = (u64)cfg.avx;
    for (int i = 0; i < 13; i++)
        b->exp_gp[i] = mix64(cpu << 8 | (u64)i);
    b->exp_fcw = 0x027f;    /* 53-bit precision, exceptions masked */
    b->exp_mxcsr = 0x7f80;  /* round toward zero, exceptions masked */
    for (int i = 0; i < 8; i++)
        b->exp_st[i] = (s64)(mix64(cpu << 8 | 0x40 | (u64)i) >> 12) * (i & 1 ? -1 : 1);
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 4; j++)
            b->exp_vec[i][j] = mix64(cpu << 8 | 0x80 | (u64)(4 * i + j));
}

/* Compares what regs_wait saw with what it loaded; adds the first mismatch to l. */
static int regs_check(struct regs_block *b, struct line *l) {
    for (int i = 0; i < 13; i++)
        if (b->out_gp[i] != b->exp_gp[i]) {
            add_str(l, gp_names[i]);
            add_str(l, "=0x");
            add_hex(l, b->out_gp[i], 16);
            add_str(l, " want 0x");
            add_hex(l, b->exp_gp[i], 16);
            return 0;
        }
    if ((b->out_fcw & 0xffff) != b->exp_fcw) {
        add_str(l, "fcw=0x");
        add_hex(l, b->out_fcw & 0xffff, 4);
        return 0;
    }
    if ((b->out_mxcsr & 0xffffffff) != b->exp_mxcsr) {
        add_str(l, "mxcsr=0x");
        add_hex(l, b->out_mxcsr & 0xffffffff, 4);
        return 0;
    }
    for (int i = 0; i < 8; i++)
        if (b->out_st[i] != b->exp_st[i]) {
            add_str(l, "st");
            add_dec(l, (u64)i);
            add_str(l, "=0x");
            add_hex(l, (u64)b->out_st[i], 16);
            add_str(l, " want 0x");
            add_hex(l, (u64)b->exp_st[i], 16);
            return 0;
        }
    int words = b->avx ? 4 : 2;
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < words; j++)
            if (b->out_vec[i][j] != b->exp_vec[i][j]) {
                add_str(l, b->avx ? "ymm" : "xmm");
                add_dec(l, (u64)i);
                add_str(l, "[");
                add_dec(l, (u64)j);
                add_str(l, "]=0x");
                add_hex(l, b->out_vec[i][j], 16);
                add_str(l, " want 0x");
                add_hex(l, b->exp_vec[i][j], 16);
                return 0;
            }
    return 1;
}

/* Clobbers the expected registers' outputs so a check never passes on stale data. */
static u64 wait_tick_regs(struct regs_block *b, u64 last) {
    gmemset(b->out_gp, 0xee, RB_SIZE - RB_OUT_GP);
    b->last = last;
    return regs_wait(b);
}

static u64 wait_tick(volatile u64 *t, u64 last) {
    u64 now;
    while ((now = *t) == last)
        __asm__ volatile("pause");
    return now;
}

/* ---- dirty memory ---- */

static struct {
    u64 start[32], end[32];
    u32 n;
    u64 pages;
    u64 cursor, gen;
    u64 count; /* pages rewritten per round: the same in every round */
} dirty;

static char text_page[4096];
static const char *const pattern_names[] = {"zero", "text", "random", "mix"};

static void text_template(void) {
    static const char *const words[] = {
        "checkpoint", "restore", "vcpu",  "memory",  "page",   "guest",  "kernel", "the",
        "of",         "and",     "timer", "console", "serial", "state",  "image",  "to",
        "register",   "a",       "dirty", "write",   "read",   "device", "queue",  "in"};
    u64 x = 1;
    u32 n = 0;
    while (n < sizeof text_page) {
        x = mix64(x);
        const char *w = words[x % (sizeof words / sizeof words[0])];
        while (*w && n < sizeof text_page)
            text_page[n++] = *w++;
        if (n < sizeof text_page)
            text_page[n++] = (x >> 32) % 9 == 0 ? '\n' : ' ';
    }
}

static enum pattern page_kind(u64 p) {
    if (cfg.pattern != PAT_MIX)
        return cfg.pattern;
    u64 h = mix64(p ^ 0x6d6978) % 100;
    return h < 50 ? PAT_ZERO : h < 85 ? PAT_TEXT : PAT_RANDOM;
}

static void fill_page(u64 *pg, u64 p, u64 gen) {
    switch (page_kind(p)) {
    case PAT_ZERO:
        gmemset(pg, 0, 4096);
        break;
    case PAT_TEXT: {
        gmemcpy(pg, text_page, 4096);
        struct line l = {.n = 0};
        add_str(&l, "page ");
        add_hex(&l, p, 8);
        add_str(&l, " gen ");
        add_hex(&l, gen, 8);
        gmemcpy(pg, l.b, l.n);
        break;
    }
    default: {
        u64 x = mix64(p * 0x10001 + gen) | 1;
        for (int i = 0; i < 512; i++) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            pg[i] = x * 0x2545f4914f6cdd1dUL;
        }
    }
    }
}

static u64 *page_addr(u64 p) {
    for (u32 i = 0; i < dirty.n; i++) {
        u64 np = (dirty.end[i] - dirty.start[i]) >> 12;
        if (p < np)
            return (u64 *)(dirty.start[i] + (p << 12));
        p -= np;
    }
    return NULL;
}

static void dirty_fill(void) {
    u64 want = cfg.dirty_mib << 20;
    u64 from = ((u64)_end + (2UL << 20) - 1) & ~((2UL << 20) - 1);
    for (u32 i = 0; i < cfg.n_ram && want && dirty.n < 32; i++) {
        u64 s = cfg.ram_start[i] > from ? cfg.ram_start[i] : from;
        u64 e = cfg.ram_end[i] < (64UL << 30) ? cfg.ram_end[i] : (64UL << 30);
        s = (s + 4095) & ~4095UL;
        e &= ~4095UL;
        if (s >= e)
            continue;
        if (e - s > want)
            e = s + want;
        dirty.start[dirty.n] = s;
        dirty.end[dirty.n++] = e;
        dirty.pages += (e - s) >> 12;
        want -= e - s;
    }
    text_template();
    u64 p = 0;
    for (u32 i = 0; i < dirty.n; i++)
        for (u64 a = dirty.start[i]; a < dirty.end[i]; a += 4096)
            fill_page((u64 *)a, p++, 0);
    struct line l = {.n = 0};
    add_str(&l, "dirty ");
    add_dec(&l, dirty.pages >> 8);
    add_str(&l, " MiB pattern=");
    add_str(&l, pattern_names[cfg.pattern]);
    add_str(&l, " rewrite=");
    add_dec(&l, cfg.rewrite);
    if (cfg.rate) {
        dirty.count = cfg.rate / cfg.hz;
        if (!dirty.count)
            dirty.count = 1;
        if (dirty.count > dirty.pages)
            dirty.count = dirty.pages;
    } else if (cfg.rewrite) {
        dirty.count = dirty.pages * cfg.rewrite / 100;
        if (!dirty.count)
            dirty.count = 1;
    }
    add_str(&l, " pages-per-round=");
    add_dec(&l, dirty.count);
    emit(&l);
}

/* The generation page p was last written with: rounds write dirty.count
   pages each, round-robin from page 0, so after dirty.gen rounds the last
   of the writes that fell on p tells. 0: only the first fill. */
static u64 page_gen(u64 p) {
    u64 writes = dirty.gen * dirty.count;
    if (writes <= p)
        return 0;
    u64 last = p + dirty.pages * ((writes - 1 - p) / dirty.pages);
    return last / dirty.count + 1;
}

static u64 scratch[512];

/* Checks that every dirtied page holds what it was last written with;
   prints "verify ok N" or the first page that does not. */
static void dirty_verify(void) {
    struct line l = {.n = 0};
    u64 bad = 0, first = 0;
    for (u64 p = 0; p < dirty.pages; p++) {
        const u64 *pg = page_addr(p);
        fill_page(scratch, p, page_gen(p));
        for (int i = 0; i < 512; i++)
            if (pg[i] != scratch[i]) {
                if (!bad++)
                    first = p;
                break;
            }
    }
    if (!bad) {
        add_str(&l, "verify ok ");
        add_dec(&l, dirty.pages);
    } else {
        add_str(&l, "verify BAD ");
        add_dec(&l, bad);
        add_str(&l, " pages, first ");
        add_dec(&l, first);
        add_str(&l, " gen ");
        add_dec(&l, page_gen(first));
    }
    emit(&l);
}

static void dirty_rewrite(void) {
    if (!dirty.pages || !dirty.count)
        return;
    dirty.gen++;
    for (u64 k = 0; k < dirty.count; k++) {
        fill_page(page_addr(dirty.cursor), dirty.cursor, dirty.gen);
        if (++dirty.cursor == dirty.pages)
            dirty.cursor = 0;
    }
}

/* FNV-1a over 64-bit words of the dirtied memory, in address order. */
static u64 dirty_sum(void) {
    u64 h = 0xcbf29ce484222325UL;
    for (u32 i = 0; i < dirty.n; i++)
        for (const u64 *w = (const u64 *)dirty.start[i]; w < (const u64 *)dirty.end[i]; w++)
            h = (h ^ *w) * 0x100000001b3UL;
    return h;
}

/* ---- the CPUs' loops ---- */

static void say_regs(u64 cpu, struct regs_block *b, int with_cpu) {
    struct line l = {.n = 0};
    if (with_cpu) {
        add_str(&l, "cpu ");
        add_dec(&l, cpu);
        add_str(&l, " ");
    }
    struct line why = {.n = 0};
    if (regs_check(b, &why)) {
        add_str(&l, "regs ok");
    } else {
        add_str(&l, "regs BAD ");
        why.b[why.n] = 0;
        add_str(&l, why.b);
    }
    emit(&l);
}

void user_bsp(u64 cpu) {
    __atomic_fetch_add(&cpus_online, 1, __ATOMIC_SEQ_CST);
    struct line l = {.n = 0};
    add_str(&l, "test-guest: ready cpus=");
    add_dec(&l, cfg.ncpus);
    add_str(&l, " mem=");
    add_dec(&l, cfg.mem_mib);
    add_str(&l, " cmdline=\"");
    add_str(&l, cfg.cmdline);
    add_str(&l, "\"");
    emit(&l);
    if (cfg.dirty_mib)
        dirty_fill();
    if (cfg.has_exit && !cfg.exit_after)
        guest_exit(cfg.exit_code);

    struct regs_block *b = &blocks[cpu];
    regs_setup(b, cpu);
    volatile u64 *t = &cpus[cpu].ticks;
    u64 seen = *t, base = seen, printed = 0, waited = 0;
    int online_said = 0;
    for (;;) {
        seen = (cfg.regs || cfg.smp) ? wait_tick_regs(b, seen) : wait_tick(t, seen);
        while (printed < seen - base && !(cfg.exit_after && printed >= cfg.exit_after)) {
            printed++;
            if (cfg.ticks) {
                l.n = 0;
                add_str(&l, "tick ");
                add_dec(&l, printed);
                emit(&l);
            }
        }
        if (cfg.regs)
            say_regs(cpu, b, 0);
        if (cfg.smp) {
            say_regs(cpu, b, 1);
            reported[cpu] = 1;
            if (!online_said && cpus_online >= cfg.ncpus) {
                online_said = 1;
                l.n = 0;
                add_str(&l, "smp ");
                add_dec(&l, cfg.ncpus);
                add_str(&l, " cpus online");
                emit(&l);
            }
        }
        if (cfg.verify && dirty.pages)
            dirty_verify();
        dirty_rewrite();
        if (cfg.sum) {
            l.n = 0;
            add_str(&l, "sum ");
            add_hex(&l, dirty_sum(), 16);
            emit(&l);
        }
        if (cfg.exit_after && printed >= cfg.exit_after) {
            /* With smp, wait (up to 10 s) until every CPU has checked its registers once. */
            u32 missing = cfg.ncpus;
            if (cfg.smp) {
                missing = 0;
                for (u32 k = 0; k < cfg.ncpus; k++)
                    missing += !reported[k];
            }
            if (!cfg.smp || (!missing && online_said))
                guest_exit(cfg.exit_code);
            if (++waited > 10 * cfg.hz) {
                l.n = 0;
                add_str(&l, "smp BAD ");
                add_dec(&l, cpus_online);
                add_str(&l, " of ");
                add_dec(&l, cfg.ncpus);
                add_str(&l, " cpus online, ");
                add_dec(&l, missing);
                add_str(&l, " have not reported");
                emit(&l);
                guest_exit(cfg.exit_code);
            }
        }
    }
}

void user_ap(u64 cpu) {
    __atomic_fetch_add(&cpus_online, 1, __ATOMIC_SEQ_CST);
    struct regs_block *b = &blocks[cpu];
    regs_setup(b, cpu);
    u64 seen = cpus[cpu].ticks;
    for (;;) {
        seen = wait_tick_regs(b, seen);
        say_regs(cpu, b, 1);
        reported[cpu] = 1;
    }
}
