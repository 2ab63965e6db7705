/* 16550 serial output: a known text that the harness compares with the captured stdout. */
#include "rt.h"

int main(void)
{
    /* LSR: transmitter empty (THRE) must be set, or guests stall */
    u8 lsr = inb(0x3FD);
    report(lsr & 0x20, "LSR reads %x with THRE set", lsr);
    /* Line control reads back what was written by the runtime (8N1) */
    report((inb(0x3FB) & 0x7F) == 0x03, "LCR reads back 8N1");
    /* the scratch register holds a byte */
    outb(0x3FF, 0x5A);
    report(inb(0x3FF) == 0x5A, "scratch register holds a byte");
    printf("serial-begin\n");
    for (int c = 0x20; c < 0x7F; c++)
        printf("%c", c);
    printf("\n");
    for (int i = 0; i < 10; i++)
        printf("line %d of 10: %08x %s\n", i, i * 0x11111111u, "the quick brown fox jumps over the lazy dog");
    printf("serial-end\n");
    return 0;
}
