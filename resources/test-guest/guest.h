/* The test guest: definitions shared by kernel mode (kernel.c, entry.S),
 * user mode (user.c, regs.S). See README.md for what it does. */
#ifndef GUEST_H
#define GUEST_H

#define MAX_CPUS 32

/* GDT selectors (entry.S lays the GDT out in this order). */
#define KCODE 0x08
#define KDATA 0x10
#define UDATA 0x1b /* 0x18 | RPL 3 */
#define UCODE 0x23 /* 0x20 | RPL 3 */
#define KCODE32 0x28
#define TSS_SEL(cpu) (0x30 + 16 * (cpu))

/* Interrupt vectors. */
#define TIMER_VECTOR 0x40
#define SPURIOUS_VECTOR 0xff

/* Where the AP trampoline is copied (SIPI vector = TRAMPOLINE >> 12). */
#define TRAMPOLINE 0x6000

#define LAPIC_BASE 0xfee00000UL

/* struct regs_block field offsets, used by regs.S (checked in user.c). */
#define RB_TICK_PTR 0
#define RB_LAST 8
#define RB_AVX 16
#define RB_EXP_GP 32    /* 13 x u64: rbx rdx rsi rdi rbp r8..r15 */
#define RB_EXP_FCW 136  /* u64 */
#define RB_EXP_MXCSR 144
#define RB_EXP_ST 152   /* 8 x s64, loaded with fild: st0 = EXP_ST[0] */
#define RB_EXP_VEC 224  /* 16 x 32 bytes: xmm/ymm0..15 */
#define RB_OUT_GP 736
#define RB_OUT_FCW 840
#define RB_OUT_MXCSR 848
#define RB_OUT_ST 856
#define RB_OUT_VEC 928
#define RB_SIZE 1440

#ifndef __ASSEMBLER__

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;

#define NULL ((void *)0)

enum pattern { PAT_ZERO, PAT_TEXT, PAT_RANDOM, PAT_MIX };

/* What the kernel found and parsed at boot; user mode reads it. */
struct config {
    const char *cmdline;
    u32 ncpus;       /* processor entries in the MP table */
    u64 mem_mib;     /* usable RAM in e820, rounded to the nearest MiB */
    u32 hz;          /* timer ticks per second */
    int ticks;       /* print "tick N" */
    int has_exit;    /* exit= given */
    u32 exit_code;
    u64 exit_after;  /* 0: not given */
    int regs;
    int smp;
    int sum;
    int verify;
    u64 dirty_mib;
    enum pattern pattern;
    u32 rewrite;     /* percent of the dirtied pages rewritten per tick */
    u64 rate;        /* or this many pages per second (rate=), if set */
    int avx;         /* the kernel enabled AVX state (CR4.OSXSAVE, XCR0) */
    u32 n_ram;       /* usable RAM ranges from e820, sorted */
    u64 ram_start[32], ram_end[32];
};

/* Per-CPU data. The timer interrupt runs on IST1, whose top is `ticks`:
 * its handler increments the word just above the interrupt frame. */
struct tss {
    u32 res0;
    u64 rsp0, rsp1, rsp2;
    u64 res1;
    u64 ist[7];
    u64 res2;
    u16 res3, iomap;
    /* Ports 0-0x7ff allowed to user mode (IOPL 3 alone is not honoured on
     * every host), then the terminating 0xff byte. */
    u8 iobitmap[257];
} __attribute__((packed));

struct percpu {
    u64 ist_stack[510];
    volatile u64 ticks; /* IST1 top (16-byte aligned) */
    u64 id;
    u8 user_stack[32768];
    struct tss tss;
} __attribute__((aligned(4096)));

extern struct config cfg;
extern struct percpu cpus[MAX_CPUS];
extern volatile u32 cpus_online;
extern char _end[];

/* entry.S */
void enter_user(void (*fn)(u64), u64 rsp, u64 arg) __attribute__((noreturn));
extern char trampoline_start[], trampoline_end[];
extern char isr_timer[], isr_spurious[], isr_table[];
extern u64 gdt[];
extern u64 idt[];

/* user.c */
void user_bsp(u64 cpu) __attribute__((noreturn));
void user_ap(u64 cpu) __attribute__((noreturn));

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void *gmemset(void *d, int c, u64 n) {
    void *r = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return r;
}
static inline void *gmemcpy(void *d, const void *s, u64 n) {
    void *r = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return r;
}

#endif
#endif
