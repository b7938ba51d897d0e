/* Entry, trap stubs, CPL3 entry and the syscall entry of the test-guest runtime. */
    .section .text.start, "ax"
    .globl _start
_start:
    lea kernel_stack_top(%rip), %rsp
    call rt_init
    call main
    mov %eax, %edi
    call rt_exit

    .text
/* Trap stubs: vectors with a CPU error code push only the vector. */
.macro stub vec
    .align 16
trap_\vec:
    .if (\vec == 8 || (\vec >= 10 && \vec <= 14) || \vec == 17 || \vec == 21)
    .else
    push $0
    .endif
    push $\vec
    jmp trap_common
.endm
    .altmacro
    .set i, 0
    .rept 48
    stub %i
    .set i, i + 1
    .endr

trap_common:
    push %rax; push %rbx; push %rcx; push %rdx; push %rsi; push %rdi; push %rbp
    push %r8; push %r9; push %r10; push %r11; push %r12; push %r13; push %r14; push %r15
    mov %rsp, %rdi
    call rt_trap
    pop %r15; pop %r14; pop %r13; pop %r12; pop %r11; pop %r10; pop %r9; pop %r8
    pop %rbp; pop %rdi; pop %rsi; pop %rdx; pop %rcx; pop %rbx; pop %rax
    add $16, %rsp
    iretq

    .globl rt_trap_stub_base
    .set rt_trap_stub_base, trap_0

/* u64 rt_enter_user(void (*fn)(void)) */
    .globl rt_enter_user
rt_enter_user:
    push %rbx; push %rbp; push %r12; push %r13; push %r14; push %r15
    mov %rsp, saved_kernel_rsp(%rip)
    lea user_stack_top(%rip), %rax
    push $0x1b              /* SS: user data */
    push %rax               /* RSP */
    push $0x202             /* RFLAGS: IF */
    push $0x23              /* CS: user code */
    push %rdi               /* RIP */
    iretq

/* Back to rt_enter_user's caller with the value in RDI, on the kernel stack saved there. */
    .globl rt_kernel_resume
rt_kernel_resume:
    mov saved_kernel_rsp(%rip), %rsp
    mov %rdi, %rax
    pop %r15; pop %r14; pop %r13; pop %r12; pop %rbp; pop %rbx
    ret

/* rt_user_return: `syscall` with RAX = 0. LSTAR is rt_syscall_entry, a marked ud2 whose #UD
 * handler (rt_trap) calls rt_kernel_resume. The fault is what makes this work on kvm_pvm, which
 * runs a CPL3 `syscall` at LSTAR but leaves CS at the user selector (measured: an `out` there
 * takes #GP with CS 0x23): the #UD then enters the IDT at CPL0 through TSS.RSP0. On a CPU that
 * does switch to CPL0, the same ud2 faults at CPL0 and takes the same path. */
    .globl rt_user_return
rt_user_return:
    xor %eax, %eax
    syscall
1:  jmp 1b

    .globl rt_syscall_entry
rt_syscall_entry:
    ud2

    .bss
    .align 16
saved_kernel_rsp: .quad 0
    .align 4096
    .globl kernel_stack_top, trap_stack_top
    .skip 16384
kernel_stack_top:
    .skip 16384
trap_stack_top:
    .skip 16384
user_stack_top:

    .section .note.GNU-stack, "", @progbits
