/*
 * Startup benchmark kernel, no runtime: its first instruction sends 'X' to the serial port, then it exits
 * through isa-debug-exit with code 0. The same bytes run in 32-bit protected mode (Multiboot entry) and in
 * long mode (ELF64 entry).
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
entry64:
    mov $0x3f8, %dx
    mov $'X', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    mov $0xf4, %dx
    xor %eax, %eax
    out %eax, %dx
1:  cli
    hlt
    jmp 1b
