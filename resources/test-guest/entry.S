/* Kernel-mode entry points of the test guest: the 64-bit boot entry (Linux
 * 64-bit boot protocol: long mode, RSI = boot_params), the AP trampoline,
 * interrupt and exception stubs, the drop to user mode, and the static
 * GDT and page tables. Everything here runs interpreted on hosts without
 * hardware virtualization, so it is kept short. */
#include "guest.h"

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    lea boot_stack_top(%rip), %rsp
    mov %rsi, %rdi                  /* boot_params */
    lgdt gdt_ptr(%rip)
    pushq $KCODE
    lea 1f(%rip), %rax
    push %rax
    lretq
1:  mov $KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    lea pml4(%rip), %rax
    mov %rax, %cr3
    call kmain_bsp
2:  hlt
    jmp 2b

/* APs arrive here from the trampoline, in long mode on the shared GDT and
 * page tables, without a stack. */
    .globl ap_entry64
ap_entry64:
    mov $KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    movabs $(LAPIC_BASE + 0x20), %rax
    mov (%rax), %eax
    shr $24, %eax                   /* LAPIC id = cpu index */
    cmp $MAX_CPUS, %eax
    jae 2b
    mov %eax, %edi
    lea 1(%rax), %rax
    shl $12, %rax
    lea ap_stacks(%rip), %rsp
    add %rax, %rsp
    call kmain_ap
    jmp 2b

/* enter_user(fn, rsp, arg): iretq to fn(arg) in ring 3, IF=1, IOPL=3. */
    .globl enter_user
enter_user:
    pushq $UDATA
    push %rsi
    pushq $0x3202
    pushq $UCODE
    push %rdi
    mov %rdx, %rdi
    mov $UDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    xor %eax, %eax
    xor %esi, %esi
    xor %edx, %edx
    iretq

/* Timer: count the tick in the word above the interrupt frame (IST1 top,
 * this CPU's struct percpu.ticks), EOI, return. Touches no FPU/SSE state. */
    .globl isr_timer
isr_timer:
    push %rax
    movabs $(LAPIC_BASE + 0xb0), %rax
    movl $0, (%rax)
    pop %rax
    incq 40(%rsp)
    iretq

    .globl isr_spurious
isr_spurious:
    iretq

/* Exceptions: a uniform frame (vector, error code, then the CPU's), then C. */
    .macro exc_noerr n
    .balign 16
    pushq $0
    pushq $\n
    jmp exc_common
    .endm
    .macro exc_err n
    .balign 16
    pushq $\n
    jmp exc_common
    .endm

    .balign 16
    .globl isr_table
isr_table:
    exc_noerr 0
    exc_noerr 1
    exc_noerr 2
    exc_noerr 3
    exc_noerr 4
    exc_noerr 5
    exc_noerr 6
    exc_noerr 7
    exc_err 8
    exc_noerr 9
    exc_err 10
    exc_err 11
    exc_err 12
    exc_err 13
    exc_err 14
    exc_noerr 15
    exc_noerr 16
    exc_err 17
    exc_noerr 18
    exc_noerr 19
    exc_noerr 20
    exc_err 21
    exc_noerr 22
    exc_noerr 23
    exc_noerr 24
    exc_noerr 25
    exc_noerr 26
    exc_noerr 27
    exc_noerr 28
    exc_err 29
    exc_err 30
    exc_noerr 31

exc_common:
    mov %rsp, %rdi                  /* -> vector, error, rip, cs, rflags, rsp, ss */
    and $-16, %rsp
    call kexception
3:  hlt
    jmp 3b

/* AP trampoline: copied to TRAMPOLINE; entered in real mode at CS=TRAMPOLINE>>4. */
    .section .rodata.trampoline, "a"
    .code16
    .globl trampoline_start, trampoline_end
trampoline_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl tramp_gdtr - trampoline_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $KCODE32, $(TRAMPOLINE + tramp32 - trampoline_start)
    .code32
tramp32:
    mov $KDATA, %eax
    mov %eax, %ds
    mov %eax, %ss
    mov %cr4, %eax
    or $0x20, %eax                  /* PAE */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx           /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax            /* PG */
    mov %eax, %cr0
    ljmpl $KCODE, $ap_entry64
    .balign 8
tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
trampoline_end:

    .code64
    .data
    .balign 16
    .globl gdt
gdt:
    .quad 0
    .quad 0x00af9b000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf93000000ffff        /* 0x10 kernel data */
    .quad 0x00cff3000000ffff        /* 0x18 user data */
    .quad 0x00affb000000ffff        /* 0x20 user code, 64-bit */
    .quad 0x00cf9b000000ffff        /* 0x28 kernel code, 32-bit (trampoline) */
    .fill 2 * MAX_CPUS, 8, 0        /* 0x30: one TSS descriptor per CPU */
gdt_end:
    .balign 8
    .word 0, 0, 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

/* Identity map with 2 MiB pages, user-accessible (user mode does port I/O and
 * reads the tick counters in place). The first 4 GiB are static; PDs for RAM
 * above 4 GiB are filled by the kernel at boot (kernel.c). */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl pml4, pdpt, pd_low
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd_low + 0x0000 + 0x7
    .quad pd_low + 0x1000 + 0x7
    .quad pd_low + 0x2000 + 0x7
    .quad pd_low + 0x3000 + 0x7
    .fill 508, 8, 0
pd_low:
    .set i, 0
    .rept 2048
    .if i >= 0x7f0
    .quad (i << 21) | 0x9f          /* LAPIC/IOAPIC area: cache disabled */
    .else
    .quad (i << 21) | 0x87
    .endif
    .set i, i + 1
    .endr

    .bss
    .balign 4096
    .globl boot_stack_top
    .space 16384
boot_stack_top:
ap_stacks:
    .space 4096 * MAX_CPUS

    .section .note.GNU-stack, "", @progbits
