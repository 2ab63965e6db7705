/* Executes `lock cmpxchg16b` in supervisor mode. This host's KVM emulates supervisor code and cannot
 * emulate that instruction: the VMM must stop with an `error:` message (registers, instruction bytes) and a
 * non-zero status. */
#include "rt.h"

static u64 target[2] __attribute__((aligned(16)));

int main(void)
{
    printf("bad_insn: executing lock cmpxchg16b at CPL 0\n");
    u64 lo = 0, hi = 0;
    asm volatile("lock cmpxchg16b %2" : "+a"(lo), "+d"(hi), "+m"(*(volatile u64(*)[2])target) : "b"(1UL), "c"(2UL)
                 : "memory");
    printf("FAIL: lock cmpxchg16b completed (target %lx %lx)\n", target[0], target[1]);
    debug_exit(1);
}
