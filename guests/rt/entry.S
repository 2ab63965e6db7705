/*
 * Guest runtime entry code.
 *
 * - Multiboot v1 header and the 32-bit entry (`entry32`) used by QEMU's -kernel and enlighten's multiboot
 *   loader: protected mode, paging off, EAX = 0x2BADB002, EBX = Multiboot info.
 * - The 64-bit entry (`entry64`) for enlighten's ELF64 direct boot: long mode, CPL 0, paging on with the VMM's
 *   identity map, EAX = 0x2BADB002, EBX = Multiboot info.
 * - The AP start-up trampoline, copied by the BSP to physical page 0 (real mode, CS:IP = 0000:0000).
 * - Interrupt stubs (one per vector) and the user-mode entry/return path.
 *
 * Both boot paths switch to the page tables below: an identity map of the low 4 GiB with 2 MiB pages, all
 * user-accessible, so that `run_user` can execute any code of the image at CPL 3.
 */
#include "layout.h"

    .section .multiboot, "a"
    .balign 4
multiboot_header:
    .long 0x1BADB002                  /* magic */
    .long 0                           /* flags: load by ELF program headers */
    .long -0x1BADB002                 /* checksum */

/* ---------------------------------------------------------------- 32-bit entry (Multiboot) */
    .section .text.entry, "ax"
    .code32
    .globl entry32
entry32:
    cli
    mov %eax, boot_magic
    mov %ebx, boot_mbi
    lgdt gdt_desc32
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $(bsp_region + REGION_SIZE), %esp
    call enter_long_mode32
    ljmp $SEL_KCODE, $bsp_entry64

/* Shared by the BSP and the APs: PAE, CR3, EFER.LME, CR0.PG. Returns in compatibility mode. */
enter_long_mode32:
    mov %cr4, %eax
    or $0x20, %eax                    /* CR4.PAE */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx             /* IA32_EFER */
    rdmsr
    or $0x100, %eax                   /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax              /* PG | PE */
    mov %eax, %cr0
    ret

/* ---------------------------------------------------------------- 64-bit entry (ELF64 direct boot) */
    .code64
    .globl entry64
entry64:
    cli
    movq $1, boot_via_elf64(%rip)
    mov %eax, boot_magic(%rip)
    mov %ebx, boot_mbi(%rip)
    lgdt gdt_desc64(%rip)
    lea pml4(%rip), %rax
    mov %rax, %cr3
    lea (bsp_region + REGION_SIZE)(%rip), %rsp
    pushq $SEL_KCODE
    lea bsp_entry64(%rip), %rax
    push %rax
    lretq

bsp_entry64:
    lgdt gdt_desc64(%rip)
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov $(bsp_region + REGION_SIZE), %rsp
    xor %ebp, %ebp
    call rt_bsp_main
1:  cli
    hlt
    jmp 1b

/* ---------------------------------------------------------------- AP trampoline (copied to 0x0) */
    .code16
    .globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl (ap_tramp_gdt_desc - ap_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $SEL_KCODE32, $ap_entry32
    .balign 8
ap_tramp_gdt_desc:
    .word GDT_SIZE - 1
    .long gdt
ap_tramp_end:

    .code32
ap_entry32:
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %ax, %ax
    mov %ax, %fs
    mov %ax, %gs
    /* A tiny temporary stack for the `call` below: the first word of the trampoline page. The APs share it
     * but only for one return address, which every AP writes with the same value. */
    mov $0x1000, %esp
    call enter_long_mode32
    ljmp $SEL_KCODE, $ap_entry64

    .code64
ap_entry64:
    mov $REGION_SIZE, %rax
    lock xadd %rax, ap_region_next(%rip)
    lea REGION_SIZE(%rax), %rsp
    mov %rax, %rdi
    xor %ebp, %ebp
    call rt_ap_main
1:  cli
    hlt
    jmp 1b

/* ---------------------------------------------------------------- interrupts */
    .text
    .balign 16
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    push %r15
    push %r14
    push %r13
    push %r12
    push %r11
    push %r10
    push %r9
    push %r8
    push %rbp
    push %rdi
    push %rsi
    push %rdx
    push %rcx
    push %rbx
    push %rax
    mov %rsp, %rdi
    cld
    call rt_interrupt
    pop %rax
    pop %rbx
    pop %rcx
    pop %rdx
    pop %rsi
    pop %rdi
    pop %rbp
    pop %r8
    pop %r9
    pop %r10
    pop %r11
    pop %r12
    pop %r13
    pop %r14
    pop %r15
    add $16, %rsp
    iretq

/*
 * u64 rt_run_user_asm(u64 (*fn)(u64) [rdi], u64 arg [rsi], u64 user_stack_top [rdx], u64 *tss_rsp0 [rcx])
 * Runs fn(arg) at CPL 3 and returns its result. The kernel stack pointer after saving the callee-saved
 * registers becomes TSS.RSP0, so interrupts taken at CPL 3 land below it; the user code comes back with a
 * ud2 at rt_user_ret_insn, whose #UD handler calls rt_user_return(RSP0, RAX).
 */
    .globl rt_run_user_asm
rt_run_user_asm:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    pushfq                            /* the caller's IF; also keeps RSP0 16-byte aligned */
    mov %rsp, (%rcx)
    pushfq
    pop %rax
    pushq $(SEL_UDATA | 3)            /* SS */
    push %rdx                         /* RSP */
    push %rax                         /* RFLAGS (IF as the caller had it) */
    pushq $(SEL_UCODE | 3)            /* CS */
    lea user_trampoline(%rip), %rax
    push %rax                         /* RIP */
    mov %rdi, %rax
    mov %rsi, %rdi
    mov %rax, %rsi
    xor %ebx, %ebx
    xor %ebp, %ebp
    xor %r12d, %r12d
    xor %r13d, %r13d
    xor %r14d, %r14d
    xor %r15d, %r15d
    iretq

user_trampoline:                      /* CPL 3: rdi = arg, rsi = fn */
    call *%rsi
    /* Back to CPL 0 through #UD at a known address. (`int n` from CPL 3 raises #UD on this host's KVM.) */
    .globl rt_user_ret_insn
rt_user_ret_insn:
    ud2

/* noreturn void rt_user_return(u64 saved_rsp [rdi], u64 result [rsi]): called by the #UD handler at CPL 0;
 * resumes rt_run_user_asm's caller with `result`. */
    .globl rt_user_return
rt_user_return:
    mov %rdi, %rsp
    mov %rsi, %rax
    mov $SEL_KDATA, %cx
    mov %cx, %ds
    mov %cx, %es
    popfq
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

/* ---------------------------------------------------------------- data: GDT and page tables */
    .data
    .balign 16
gdt_desc32:
    .word GDT_SIZE - 1
    .long gdt
    .balign 16
gdt_desc64:
    .word GDT_SIZE - 1
    .quad gdt

    .globl gdt
    .balign 16
gdt:
    .quad 0                           /* 0x00 null */
    .quad 0x00af9a000000ffff          /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff          /* 0x10 kernel data */
    .quad 0x00cf9a000000ffff          /* 0x18 kernel code, 32-bit */
    .quad 0x00cff2000000ffff          /* 0x20 user data */
    .quad 0x00affa000000ffff          /* 0x28 user code, 64-bit */
    .fill 2 * MAX_CPUS, 8, 0          /* 0x30.. one 16-byte TSS descriptor per CPU, filled at run time */
gdt_end:

    .globl boot_magic, boot_mbi, ap_region_next, boot_via_elf64
    .balign 8
boot_via_elf64: .quad 0
boot_magic: .quad 0
boot_mbi: .quad 0
ap_region_next: .quad 0

    .balign 4096
    .globl pml4
pml4:
    .quad pdpt + 0x7                  /* P | RW | US */
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0000 + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
    .globl pd
pd:                                   /* 2048 x 2 MiB = 4 GiB, P | RW | US | PS */
    .set i, 0
    .rept 2048
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr

    .bss
    .balign REGION_SIZE
    .globl bsp_region
bsp_region:
    .skip REGION_SIZE
