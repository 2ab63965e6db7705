/*
 * SMP bring-up: every vCPU comes online through INIT + one SIPI, reports its APIC ID (which must equal its
 * index), runs a function on request, and runs code at CPL 3. Arguments: mode=xapic|x2apic, cpus=N (expected
 * count; default fw_cfg NB_CPUS).
 */
#include "rt.h"

static volatile u32 seen_apic_id[MAX_CPUS];
static volatile u32 seen_initial_id[MAX_CPUS];
static volatile u32 ran[MAX_CPUS];
static volatile u64 user_result[MAX_CPUS];

static u64 user_fn(u64 x)
{
    /* CPL 3: the low two bits of CS are the privilege level. */
    u16 cs;
    asm volatile("mov %%cs, %0" : "=r"(cs));
    return x * 3 + (cs & 3);
}

static void report_id(void *arg)
{
    u32 me = smp_id();
    (void)arg;
    seen_apic_id[me] = apic_id();
    seen_initial_id[me] = cpuid(1).b >> 24;
    user_result[me] = run_user(user_fn, me + 100);
    printf("CPU %u: APIC ID %u (%s), initial APIC ID %u\n", me, seen_apic_id[me],
           apic_mode() == APIC_X2APIC ? "x2APIC" : "xAPIC", seen_initial_id[me]);
    atomic_inc(&ran[me]);
}

int main(void)
{
    u32 expected = (u32)arg_u64("cpus", fw_cfg_nb_cpus());
    smp_init();
    u32 n = nr_cpus();
    report(n == expected, "%u CPUs online, expected %u", n, expected);
    report(smp_id() == 0, "BSP has APIC ID 0");
    for (u32 i = 0; i < n; i++)
        on_cpu(i, report_id, NULL);
    bool ids_ok = true, ran_ok = true, user_ok = true;
    for (u32 i = 0; i < n; i++) {
        ids_ok &= seen_apic_id[i] == i && seen_initial_id[i] == (i & 0xFF);
        ran_ok &= ran[i] == 1;
        user_ok &= user_result[i] == (i + 100) * 3 + 3;
    }
    report(ids_ok, "every vCPU reports APIC ID == index");
    report(ran_ok, "on_cpu ran once on every vCPU");
    report(user_ok, "every vCPU ran a function at CPL 3");
    u64 base = rdmsr(MSR_IA32_APICBASE);
    report((base & 0xFFFFF000) == 0xFEE00000 && (base & (1 << 8)) && (base & (1 << 11)),
           "IA32_APIC_BASE of the BSP is %lx (0xFEE00000, BSP, enabled)", base);
    report(((base >> 10) & 1) == (apic_mode() == APIC_X2APIC), "IA32_APIC_BASE.EXTD matches %s mode",
           apic_mode() == APIC_X2APIC ? "x2APIC" : "xAPIC");
    return 0;
}
