/*
 * Snapshot/restore guest (also the benchmark's guest, under enlighten and QEMU): writes a distinct non-zero
 * value (its address | 1) into the first word of every 4 KiB page from 16 MiB to the end of RAM (at most
 * 3 GiB), prints "touched N pages", then runs `ticks=N` ticks (0: forever), each a `spin=N` iteration delay,
 * one more page written and a "t K" line, so a restored VM shows when it runs again. Finally every page is
 * checked: a snapshot restored in between must have kept them all.
 */
#include "rt.h"

#define START (16ull << 20)
#define LIMIT (3ull << 30)

int main(void)
{
    u64 ram = fw_cfg_ram_size();
    u64 end = ram < LIMIT ? ram : LIMIT;
    if (end <= START + (1 << 20))
        fail("needs more than 17 MiB of RAM (has %lu bytes)", (unsigned long)ram);
    u64 ticks = arg_u64("ticks", 0), spin = arg_u64("spin", 2000);
    for (u64 p = START; p < end; p += 4096)
        *(volatile u64 *)p = p | 1;
    printf("touched %lu pages\n", (unsigned long)((end - START) / 4096));
    /* Each tick rewrites one page (its value | 2) after the delay: writes that land after a restore. */
    u64 next = START;
    for (u64 t = 1; ticks == 0 || t <= ticks; t++) {
        for (volatile u64 i = 0; i < spin; i++)
            ;
        *(volatile u64 *)next = next | 3;
        next = next + 4096 < end ? next + 4096 : START;
        printf("t %lu\n", (unsigned long)t);
    }
    u64 bad = 0, rewritten = 0;
    for (u64 p = START; p < end; p += 4096) {
        u64 v = *(volatile u64 *)p;
        if (v == (p | 3))
            rewritten++;
        else if (v != (p | 1))
            bad++;
    }
    report(bad == 0 && rewritten == (ticks < (end - START) / 4096 ? ticks : (end - START) / 4096),
           "every page kept its value (%lu wrong, %lu rewritten by %lu ticks)", (unsigned long)bad,
           (unsigned long)rewritten, (unsigned long)ticks);
    return 0;
}
