/* Kernel mode of the test guest: the least setup that lets user mode run the
 * workloads. On hosts without hardware virtualization every instruction here
 * is interpreted by KVM (about 1000x slower than native), so it avoids loops
 * over anything big and leaves all real work to user mode (user.c). Built
 * without SSE/x87 (-mgeneral-regs-only). */
#include "guest.h"

struct config cfg;
struct percpu cpus[MAX_CPUS];
volatile u32 cpus_online;

u64 idt[512] __attribute__((aligned(4096)));
static struct {
    u16 pad[3];
    u16 limit;
    u64 base;
} __attribute__((packed, aligned(8))) idt_ptr;

/* Page directories for RAM above 4 GiB (up to 64 GiB). */
extern u64 pdpt[512];
static u64 pd_high[60][512] __attribute__((aligned(4096)));

static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

/* Kernel-mode console output, for fatal errors only. */
static void kputs(const char *s) {
    for (; *s; s++)
        outb(0x3f8, *s);
}

static void kputhex(u64 v) {
    char b[19];
    b[0] = '0';
    b[1] = 'x';
    for (int i = 0; i < 16; i++)
        b[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 15];
    b[18] = 0;
    kputs(b);
}

static void kexit(u8 code) {
    outb(0x510, code);
    outb(0x64, 0xfe);
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* From the exception stubs: frame = vector, error, rip, cs, rflags, rsp, ss. */
void kexception(u64 *f) {
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    kputs("\ntest-guest: exception ");
    kputhex(f[0]);
    kputs(" err=");
    kputhex(f[1]);
    kputs(" rip=");
    kputhex(f[2]);
    kputs(" cs=");
    kputhex(f[3]);
    kputs(" rsp=");
    kputhex(f[5]);
    kputs(" cr2=");
    kputhex(cr2);
    kputs("\n");
    kexit(99);
}

/* ---- command line ---- */

static int word_is(const char *w, const char *end, const char *name, const char **val) {
    const char *p = w;
    while (*name && p < end && *p == *name)
        p++, name++;
    if (*name)
        return 0;
    if (p == end) {
        *val = NULL;
        return 1;
    }
    if (*p == '=' || *p == ',') {
        *val = p + 1;
        return 1;
    }
    return 0;
}

static u64 number(const char **pp, const char *end) {
    const char *p = *pp;
    u64 v = 0;
    while (p < end && *p >= '0' && *p <= '9')
        v = v * 10 + (u64)(*p++ - '0');
    *pp = p;
    return v;
}

static int prefix(const char **pp, const char *end, const char *s) {
    const char *p = *pp;
    while (*s && p < end && *p == *s)
        p++, s++;
    if (*s)
        return 0;
    *pp = p;
    return 1;
}

static void parse_dirty(const char *p, const char *end) {
    cfg.dirty_mib = number(&p, end);
    while (p < end && *p == ',') {
        p++;
        if (prefix(&p, end, "pattern=")) {
            if (prefix(&p, end, "zero"))
                cfg.pattern = PAT_ZERO;
            else if (prefix(&p, end, "text"))
                cfg.pattern = PAT_TEXT;
            else if (prefix(&p, end, "random"))
                cfg.pattern = PAT_RANDOM;
            else if (prefix(&p, end, "mix"))
                cfg.pattern = PAT_MIX;
        } else if (prefix(&p, end, "rewrite=")) {
            cfg.rewrite = (u32)number(&p, end);
            if (cfg.rewrite > 100)
                cfg.rewrite = 100;
        } else if (prefix(&p, end, "rate=")) {
            cfg.rate = number(&p, end);
        }
        while (p < end && *p != ',')
            p++;
    }
}

static void parse_cmdline(const char *s) {
    cfg.hz = 10;
    cfg.pattern = PAT_MIX;
    cfg.rewrite = 10;
    while (*s) {
        while (*s == ' ')
            s++;
        const char *w = s;
        while (*s && *s != ' ')
            s++;
        const char *v;
        if (w == s)
            break;
        if (word_is(w, s, "ticks", &v)) {
            cfg.ticks = 1;
            if (v) {
                u64 hz = number(&v, s);
                cfg.hz = hz < 1 ? 1 : hz > 1000 ? 1000 : (u32)hz;
            }
        } else if (word_is(w, s, "exit-after", &v) && v) {
            cfg.exit_after = number(&v, s);
        } else if (word_is(w, s, "exit", &v) && v) {
            cfg.has_exit = 1;
            cfg.exit_code = (u32)number(&v, s) & 0xff;
        } else if (word_is(w, s, "regs", &v) && !v) {
            cfg.regs = 1;
        } else if (word_is(w, s, "smp", &v) && !v) {
            cfg.smp = 1;
        } else if (word_is(w, s, "sum", &v) && !v) {
            cfg.sum = 1;
        } else if (word_is(w, s, "verify", &v) && !v) {
            cfg.verify = 1;
        } else if (word_is(w, s, "dirty", &v) && v) {
            parse_dirty(v, s);
        }
    }
}

/* ---- boot information ---- */

static void read_e820(const u8 *bp) {
    u32 n = bp[0x1e8];
    u64 total = 0;
    for (u32 i = 0; i < n && i < 128; i++) {
        const u8 *e = bp + 0x2d0 + 20 * i;
        u64 addr = *(const u64 *)e, size = *(const u64 *)(e + 8);
        u32 type = *(const u32 *)(e + 16);
        if (type != 1 || size == 0)
            continue;
        total += size;
        if (cfg.n_ram < 32) {
            /* Insertion by start address: the table is usually sorted already. */
            u32 j = cfg.n_ram++;
            while (j > 0 && cfg.ram_start[j - 1] > addr) {
                cfg.ram_start[j] = cfg.ram_start[j - 1];
                cfg.ram_end[j] = cfg.ram_end[j - 1];
                j--;
            }
            cfg.ram_start[j] = addr;
            cfg.ram_end[j] = addr + size;
        }
    }
    cfg.mem_mib = (total + (1UL << 19)) >> 20;
}

static int count_cpus_at(u64 base, u64 len) {
    for (u64 a = base; a + 16 <= base + len; a += 16) {
        if (*(volatile u32 *)a != 0x5f504d5f) /* "_MP_" */
            continue;
        u64 t = *(volatile u32 *)(a + 4);
        if (!t || *(volatile u32 *)t != 0x504d4350) /* "PCMP" */
            continue;
        u32 count = *(volatile u16 *)(t + 34), cpus_found = 0;
        u8 *e = (u8 *)(t + 44);
        for (u32 i = 0; i < count; i++) {
            if (e[0] == 0) {
                if (e[3] & 1)
                    cpus_found++;
                e += 20;
            } else {
                e += 8;
            }
        }
        cfg.ncpus = cpus_found ? cpus_found : 1;
        return 1;
    }
    return 0;
}

/* Identity-map RAM above 4 GiB, 2 MiB pages, as far as e820 goes (max 64 GiB). */
static void map_high(void) {
    u64 top = 0;
    for (u32 i = 0; i < cfg.n_ram; i++)
        if (cfg.ram_end[i] > top)
            top = cfg.ram_end[i];
    if (top > (64UL << 30))
        top = 64UL << 30;
    for (u64 a = 4UL << 30; a < top; a += 2UL << 20) {
        u64 gib = a >> 30, idx = (a >> 21) & 511;
        u64 *pd = pd_high[gib - 4];
        if (idx == 0)
            pdpt[gib] = (u64)pd | 7;
        pd[idx] = a | 0x87;
    }
}

static void set_gate(int v, void *handler) {
    u64 h = (u64)handler;
    idt[2 * v] = (h & 0xffff) | ((u64)KCODE << 16) | (1UL << 32) /* IST1 */ | (0x8eUL << 40) |
                 ((h >> 16) & 0xffff) << 48;
    idt[2 * v + 1] = h >> 32;
}

/* Per-CPU: TSS (IST1 = the tick counter's stack), LAPIC, timer, SSE. */
static void cpu_init(u32 id) {
    struct percpu *c = &cpus[id];
    c->id = id;
    c->tss.ist[0] = (u64)&c->ticks;
    c->tss.rsp0 = (u64)&c->ticks;
    c->tss.iomap = __builtin_offsetof(struct tss, iobitmap);
    c->tss.iobitmap[256] = 0xff;
    u64 base = (u64)&c->tss, limit = sizeof(struct tss) - 1;
    u32 sel = TSS_SEL(id);
    gdt[sel / 8] = (limit & 0xffff) | (base & 0xffffff) << 16 | 0x89UL << 40 |
                   ((limit >> 16) & 0xf) << 48 | ((base >> 24) & 0xff) << 56;
    gdt[sel / 8 + 1] = base >> 32;
    __asm__ volatile("ltr %w0" ::"r"(sel));
    __asm__ volatile("lidt %0" ::"m"(idt_ptr.limit));

    /* SSE for user mode: CR0.MP, !EM, !TS; CR4.OSFXSR|OSXMMEXCPT. */
    u64 cr0, cr4;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    cr0 = (cr0 | 2) & ~(u64)0xc;
    __asm__ volatile("mov %0, %%cr0" ::"r"(cr0));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    cr4 |= (1 << 9) | (1 << 10);
    if (cfg.avx)
        cr4 |= 1 << 18; /* OSXSAVE */
    __asm__ volatile("mov %0, %%cr4" ::"r"(cr4));
    if (cfg.avx)
        __asm__ volatile("xsetbv" ::"c"(0), "a"(7), "d"(0)); /* x87|SSE|AVX */

    lapic_write(0xf0, 0x100 | SPURIOUS_VECTOR); /* enable */
    lapic_write(0x3e0, 0xb);                    /* divide by 1 */
    lapic_write(0x320, (1 << 17) | TIMER_VECTOR); /* periodic */
    lapic_write(0x380, 1000000000u / cfg.hz);  /* KVM's APIC bus runs at 1 GHz */
}

static void start_aps(void) {
    gmemcpy((void *)TRAMPOLINE, trampoline_start, (u64)(trampoline_end - trampoline_start));
    lapic_write(0x310, 0);
    lapic_write(0x300, 0xc4500); /* INIT, all but self */
    lapic_write(0x300, 0xc4600 | (TRAMPOLINE >> 12)); /* SIPI */
    lapic_write(0x300, 0xc4600 | (TRAMPOLINE >> 12));
}

void kmain_bsp(const u8 *bp) {
    cfg.cmdline = (const char *)(u64) * (const u32 *)(bp + 0x228);
    parse_cmdline(cfg.cmdline);
    read_e820(bp);
    cfg.ncpus = 1;
    if (!count_cpus_at(0x9fc00, 0x400))
        count_cpus_at(0xf0000, 0x10000);
    if (cfg.ncpus > MAX_CPUS)
        cfg.ncpus = MAX_CPUS;
    map_high();

    u32 a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    cfg.avx = (c & (1 << 26)) && (c & (1 << 28)); /* XSAVE and AVX advertised */

    for (int v = 0; v < 32; v++)
        set_gate(v, isr_table + 16 * v);
    set_gate(TIMER_VECTOR, isr_timer);
    set_gate(SPURIOUS_VECTOR, isr_spurious);
    idt_ptr.limit = 256 * 16 - 1;
    idt_ptr.base = (u64)idt;

    outb(0x21, 0xff); /* mask the 8259s: only the LAPIC timer interrupts */
    outb(0xa1, 0xff);
    cpu_init(0);
    if (cfg.smp && cfg.ncpus > 1)
        start_aps();
    enter_user(user_bsp, (u64)(cpus[0].user_stack + sizeof cpus[0].user_stack - 8), 0);
}

void kmain_ap(u32 id) {
    cpu_init(id);
    enter_user(user_ap, (u64)(cpus[id].user_stack + sizeof cpus[id].user_stack - 8), id);
}
