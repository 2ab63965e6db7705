/* Loads an empty IDT and faults: the exception cannot be delivered, so the CPU shuts down (triple fault).
 * Under --no-reboot QEMU then exits with status 0. */
#include "rt.h"

int main(void)
{
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) empty = { 0, 0 };
    printf("triple_fault: loading an empty IDT and executing ud2\n");
    asm volatile("lidt %0" ::"m"(empty));
    asm volatile("ud2");
    printf("FAIL: survived a triple fault\n");
    debug_exit(1);
}
