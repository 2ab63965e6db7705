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

static u64 read_at_cpl3(u64 va)
{
    return *(volatile u64 *)va;
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

    /* pte_4k: alias a page of RAM at 2 GiB + 20 KiB (beyond RAM) and read it through the alias at CPL 3 */
    u64 *page = alloc_pages(2);
    page[0] = 0x1111222233334444ULL;
    page[512] = 0x5555666677778888ULL;
    u64 va = 0x80005000ULL;
    u64 *pte = pte_4k(va);
    report((*pte & ~0xFFFULL) == va && (*pte & (PTE_P | PTE_RW | PTE_US)) == 7,
           "pte_4k splits the 2 MiB page keeping the identity translation (pte %lx)", *pte);
    *pte = (u64)page | PTE_P | PTE_RW | PTE_US;
    invlpg((void *)va);
    report(run_user(read_at_cpl3, va) == 0x1111222233334444ULL, "a remapped 4 KiB page reads at CPL 3");
    *pte = ((u64)page + 4096) | PTE_P | PTE_RW | PTE_US;
    invlpg((void *)va);
    report(run_user(read_at_cpl3, va) == 0x5555666677778888ULL, "remapping it again is seen after invlpg");
    report(pte_4k(va + 4096) == pte + 1 && *(pte + 1) == ((va + 4096) | 7), "neighbouring PTEs stay identity");
    return 0;
}
