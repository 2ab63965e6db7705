/* Runtime self-test: CPL 3 helper, exception fixups for MSR access, printf. */
#include "rt.h"

static u64 add_cpl(u64 x)
{
    u16 cs;
    asm volatile("mov %%cs, %0" : "=r"(cs));
    u64 s = 0;
    for (u64 i = 0; i < x; i++)
        s += i;
    return s * 4 + (cs & 3);
}

int main(void)
{
    u64 r = run_user(add_cpl, 1000);
    report(r == 499500 * 4 + 3, "run_user ran at CPL 3 and returned its result");
    report(run_user(add_cpl, 10) == 45 * 4 + 3, "run_user can be called again");
    u64 v = 0;
    int f = rdmsr_safe(0xDEADBEEF, &v);
    report(f == GP_FAULT, "rdmsr of a non-existent MSR raises #GP (fixup returned %d)", f);
    f = rdmsr_safe(MSR_IA32_APICBASE, &v);
    report(f == 0 && (v & 0xFFFFF000) == 0xFEE00000, "rdmsr_safe of IA32_APIC_BASE succeeds");
    f = wrmsr_safe(0xDEADBEEF, 1);
    report(f == GP_FAULT, "wrmsr of a non-existent MSR raises #GP");
    char buf[64];
    snprintf(buf, sizeof(buf), "%d %u %x %lx %s %c %05d %p", -5, 7u, 0xabcu, 0x123456789aUL, "s", 'c', 42,
             (void *)0x1000);
    report(!strcmp(buf, "-5 7 abc 123456789a s c 00042 0x1000"), "printf formats: '%s'", buf);
    report(irqs_enabled() == false, "interrupts are off at entry");
    return 0;
}
