/* User mode: u64 regs_wait(struct regs_block *b)
 *
 * Loads the expected values into the general registers (all but RAX, RCX
 * and RSP, which the wait loop uses), the x87 stack and control word, MXCSR
 * and xmm0-15 (ymm0-15 when b->avx), spins until *b->tick_ptr differs from
 * b->last, then stores every one of those registers into b->out_* and
 * returns the new tick value. Whatever happened in between (the timer
 * interrupt, a snapshot and restore) must have preserved them. */
#include "guest.h"

    .text
    .globl regs_wait
regs_wait:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    push %rdi

    fninit
    fldcw RB_EXP_FCW(%rdi)
    .irp i, 7, 6, 5, 4, 3, 2, 1, 0
    fildll RB_EXP_ST + 8 * \i(%rdi)
    .endr
    ldmxcsr RB_EXP_MXCSR(%rdi)
    cmpq $0, RB_AVX(%rdi)
    jne 1f
    .irp i, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
    movdqu RB_EXP_VEC + 32 * \i(%rdi), %xmm\i
    .endr
    jmp 2f
1:
    .irp i, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
    vmovdqu RB_EXP_VEC + 32 * \i(%rdi), %ymm\i
    .endr
2:
    mov RB_TICK_PTR(%rdi), %rcx
    mov RB_LAST(%rdi), %rax
    mov RB_EXP_GP + 8 * 0(%rdi), %rbx
    mov RB_EXP_GP + 8 * 1(%rdi), %rdx
    mov RB_EXP_GP + 8 * 2(%rdi), %rsi
    mov RB_EXP_GP + 8 * 4(%rdi), %rbp
    mov RB_EXP_GP + 8 * 5(%rdi), %r8
    mov RB_EXP_GP + 8 * 6(%rdi), %r9
    mov RB_EXP_GP + 8 * 7(%rdi), %r10
    mov RB_EXP_GP + 8 * 8(%rdi), %r11
    mov RB_EXP_GP + 8 * 9(%rdi), %r12
    mov RB_EXP_GP + 8 * 10(%rdi), %r13
    mov RB_EXP_GP + 8 * 11(%rdi), %r14
    mov RB_EXP_GP + 8 * 12(%rdi), %r15
    mov RB_EXP_GP + 8 * 3(%rdi), %rdi
3:  pause
    cmp (%rcx), %rax
    je 3b

    mov (%rcx), %rax
    xchg %rdi, (%rsp)               /* rdi = block; the checked value on the stack */
    mov %rbx, RB_OUT_GP + 8 * 0(%rdi)
    mov %rdx, RB_OUT_GP + 8 * 1(%rdi)
    mov %rsi, RB_OUT_GP + 8 * 2(%rdi)
    mov (%rsp), %rcx
    mov %rcx, RB_OUT_GP + 8 * 3(%rdi)
    mov %rbp, RB_OUT_GP + 8 * 4(%rdi)
    mov %r8, RB_OUT_GP + 8 * 5(%rdi)
    mov %r9, RB_OUT_GP + 8 * 6(%rdi)
    mov %r10, RB_OUT_GP + 8 * 7(%rdi)
    mov %r11, RB_OUT_GP + 8 * 8(%rdi)
    mov %r12, RB_OUT_GP + 8 * 9(%rdi)
    mov %r13, RB_OUT_GP + 8 * 10(%rdi)
    mov %r14, RB_OUT_GP + 8 * 11(%rdi)
    mov %r15, RB_OUT_GP + 8 * 12(%rdi)
    cmpq $0, RB_AVX(%rdi)
    jne 4f
    .irp i, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
    movdqu %xmm\i, RB_OUT_VEC + 32 * \i(%rdi)
    .endr
    jmp 5f
4:
    .irp i, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
    vmovdqu %ymm\i, RB_OUT_VEC + 32 * \i(%rdi)
    .endr
    vzeroupper
5:
    fnstcw RB_OUT_FCW(%rdi)
    stmxcsr RB_OUT_MXCSR(%rdi)
    .irp i, 0, 1, 2, 3, 4, 5, 6, 7
    fistpll RB_OUT_ST + 8 * \i(%rdi)
    .endr

    add $8, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

    .section .note.GNU-stack, "", @progbits
