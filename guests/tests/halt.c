/*
 * Halting with interrupts disabled. case=all: the only vCPU executes `cli; hlt`, so the VM can never run
 * again (the VMM should say so on stderr and exit non-zero; QEMU just waits forever). case=ap: one AP parks in
 * `cli; hlt` while the BSP carries on and passes: a normal situation, not a dead VM.
 */
#include "rt.h"

static void park(void *arg)
{
    (void)arg;
    for (;;) {
        cli();
        hlt();
    }
}

int main(void)
{
    if (arg_is("case", "all")) {
        printf("halt: every vCPU halts with interrupts disabled\n");
        park(NULL);
    }
    smp_init();
    if (nr_cpus() < 2) {
        report_skip("case=ap needs 2 or more vCPUs");
        return 0;
    }
    on_cpu_async(1, park, NULL);
    tsc_delay(100000000); /* give the AP time to park, and the VMM time to look at it */
    report(!cpu_idle(1), "vCPU 1 is parked in cli; hlt");
    report(true, "the BSP keeps running while an AP is parked");
    return 0;
}
