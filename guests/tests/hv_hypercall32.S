/*
 * The 32-bit hypercall convention through the hypercall page, from 32-bit protected mode (the Multiboot entry;
 * no runtime): EDX:EAX control and result, EBX:ECX input GPA, EDI:ESI output GPA, every other register
 * preserved. Needs Hyper-V identification (e.g. -cpu host,hv-relaxed). The ELF64 entry only reports a skip.
 * Checks: unknown code -> 2; a reserved control bit in EDX (bit 44) -> 3; SignalEvent (slow) with an in-RAM
 * aligned input in ECX and EBX = 0 -> 3 (no SynIC), with EBX = 1 (input above 4 GiB, not RAM) -> 4;
 * NotifyLongSpinWait -> 0; EBX, ECX, ESI, EDI, EBP and ESP preserved by every call.
 */
    .section .multiboot, "a"
    .balign 4
    .long 0x1BADB002
    .long 0
    .long -0x1BADB002

    .section .text.entry, "ax"
    .code32
    .globl entry32, entry64
entry32:
    mov $stack_top, %esp
    /* GUEST_OS_ID = Linux, HYPERCALL = hcpage | 1 */
    mov $0x40000000, %ecx
    xor %eax, %eax
    mov $0x81000000, %edx
    wrmsr
    mov $0x40000001, %ecx
    mov $hcpage, %eax
    or $1, %eax
    xor %edx, %edx
    wrmsr

    /* call(control_lo, control_hi, ebx, ecx, expected status) via the macro below */
    .macro hcall lo, hi, b, c, want
    mov $\lo, %eax
    mov $\hi, %edx
    mov $\b, %ebx
    mov $\c, %ecx
    mov $0x5A5A5A5A, %esi
    mov $0x6B6B6B6B, %edi
    mov $0x7C7C7C7C, %ebp
    mov %esp, saved_esp
    call hcpage
    cmp $\want, %eax
    jne fail
    test %edx, %edx
    jne fail
    cmp $\b, %ebx
    jne fail
    cmp $\c, %ecx
    jne fail
    cmp $0x5A5A5A5A, %esi
    jne fail
    cmp $0x6B6B6B6B, %edi
    jne fail
    cmp $0x7C7C7C7C, %ebp
    jne fail
    cmp saved_esp, %esp
    jne fail
    .endm

    hcall 0x7FFF, 0, 0x11111111, 0x22222222, 2
    mov $msg_unknown, %esi
    call print
    hcall 0x7FFF, 0x1000, 0, 0, 3
    mov $msg_reserved, %esi
    call print
    hcall 0x005D, 0, 0, hcpage + 8, 3
    hcall 0x005D, 0, 1, 0, 4
    mov $msg_gpa, %esi
    call print
    hcall 0x0008, 0, 0xFFFFFFFF, 0xFFFFFFF1, 0
    mov $msg_spin, %esi
    call print
    mov $msg_summary, %esi
    call print
    mov $0xf4, %dx
    xor %eax, %eax
    out %eax, %dx
    jmp halt

fail:
    mov %eax, last_status
    mov $msg_fail, %esi
    call print
    mov $0xf4, %dx
    mov $1, %eax
    out %eax, %dx
halt:
    cli
    hlt
    jmp halt

/* Prints the NUL-terminated string at ESI on COM1. */
print:
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret

    .code64
entry64:
    lea msg_skip(%rip), %rsi
    mov $0x3f8, %dx
3:  lodsb
    test %al, %al
    jz 4f
    out %al, %dx
    jmp 3b
4:  mov $0xf4, %dx
    xor %eax, %eax
    out %eax, %dx
5:  cli
    hlt
    jmp 5b

    .section .rodata
msg_unknown:  .asciz "PASS: 32-bit unknown code: EDX:EAX = 2, EBX/ECX/ESI/EDI/EBP/ESP preserved\n"
msg_reserved: .asciz "PASS: 32-bit reserved control bit 44 (EDX bit 12): status 3\n"
msg_gpa:      .asciz "PASS: 32-bit input GPA from EBX:ECX: in RAM -> 3 (no SynIC), above 4 GiB -> 4\n"
msg_spin:     .asciz "PASS: 32-bit NotifyLongSpinWait: status 0\n"
msg_summary:  .asciz "SUMMARY: 4 tests, 0 failures, 0 skipped\n"
msg_fail:     .asciz "FAIL: 32-bit hypercall returned an unexpected status or changed a register\n"
msg_skip:     .asciz "SKIP: the 32-bit hypercall test needs the Multiboot (protected-mode) entry\nSUMMARY: 0 tests, 0 failures, 1 skipped\n"

    .section .bss
    .balign 4096
hcpage:
    .skip 4096
stack:
    .skip 4096
stack_top:
saved_esp:
    .skip 4
last_status:
    .skip 4
