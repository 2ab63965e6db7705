/*
 * enlighten guest runtime: the API available to guest test programs.
 *
 * A program defines `int main(void)`; the runtime calls it on the BSP (in long mode, CPL 0, interrupts off)
 * after setting up the GDT/IDT, serial port, command line and fw_cfg. When main returns, the runtime prints the
 * summary of `report()` calls and exits through isa-debug-exit: code 0 (QEMU status 1) if every report passed
 * and main returned 0, code 1 (status 3) otherwise.
 */
#ifndef RT_H
#define RT_H

#include "layout.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed char s8;
typedef short s16;
typedef int s32;
typedef long s64;
typedef u64 size_t;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define noreturn __attribute__((noreturn))
#define barrier() asm volatile("" ::: "memory")
#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* ---- libc-like */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
/* Parses decimal or 0x-prefixed hex; *end (if given) gets the first unparsed character. */
u64 strtou64(const char *s, const char **end);

/* ---- output: 16550 COM1 at 0x3F8, polled. printf supports %d %i %u %x %X %p %s %c %% with l/ll, width and 0. */
typedef __builtin_va_list va_list;
#define va_start(v, l) __builtin_va_start(v, l)
#define va_end(v) __builtin_va_end(v)
#define va_arg(v, t) __builtin_va_arg(v, t)
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
void puts(const char *s); /* no newline added */

/* ---- results */
void report(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void report_skip(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void report_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Prints "SUMMARY: ..." and exits (0 if no failure, else 1). */
noreturn void report_summary(void);
/* Prints "FAIL: ..." and exits with code 1. */
noreturn void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* isa-debug-exit (port 0xF4, 32-bit write); QEMU exits with (code << 1) | 1. Falls back to the Bochs port. */
noreturn void debug_exit(u32 code);
unsigned report_failures(void);

/* ---- port I/O and CPU helpers */
static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { asm volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { asm volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; asm volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; asm volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cli(void) { asm volatile("cli" ::: "memory"); }
static inline void sti(void) { asm volatile("sti" ::: "memory"); }
/* sti; hlt with the interrupt shadow: no wake-up is lost between the two. */
static inline void safe_halt(void) { asm volatile("sti; hlt" ::: "memory"); }
static inline void hlt(void) { asm volatile("hlt" ::: "memory"); }
static inline void pause(void) { asm volatile("pause" ::: "memory"); }
static inline u64 read_rflags(void) { u64 f; asm volatile("pushfq; pop %0" : "=r"(f)); return f; }
static inline bool irqs_enabled(void) { return (read_rflags() >> 9) & 1; }
static inline u64 rdtsc(void) { u32 lo, hi; asm volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline u64 read_cr0(void) { u64 v; asm volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { u64 v; asm volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline u64 read_cr4(void) { u64 v; asm volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { asm volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline void write_cr4(u64 v) { asm volatile("mov %0, %%cr4" ::"r"(v) : "memory"); }
static inline void invlpg(const void *va) { asm volatile("invlpg (%0)" ::"r"(va) : "memory"); }

struct cpuid { u32 a, b, c, d; };
static inline struct cpuid cpuid_count(u32 leaf, u32 sub)
{
    struct cpuid r;
    asm volatile("cpuid" : "=a"(r.a), "=b"(r.b), "=c"(r.c), "=d"(r.d) : "a"(leaf), "c"(sub));
    return r;
}
static inline struct cpuid cpuid(u32 leaf) { return cpuid_count(leaf, 0); }

static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr) : "memory");
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
    asm volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
/*
 * Exception-safe MSR access: returns 0 on success, or the vector + 1 of the exception the instruction raised
 * (GP_FAULT for #GP). The error code of that exception is in last_fault_error().
 */
#define GP_FAULT (13 + 1)
int rdmsr_safe(u32 msr, u64 *val);
int wrmsr_safe(u32 msr, u64 val);
u64 last_fault_error(void);

static inline void atomic_inc(volatile u32 *p) { asm volatile("lock incl %0" : "+m"(*p) :: "memory"); }
static inline u32 atomic_fetch_add(volatile u32 *p, u32 v)
{
    asm volatile("lock xaddl %0, %1" : "+r"(v), "+m"(*p) :: "memory");
    return v;
}
static inline u64 atomic_or64(volatile u64 *p, u64 v)
{
    u64 old = *p;
    while (!__atomic_compare_exchange_n(p, &old, old | v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}
struct spinlock { volatile u32 v; };
void spin_lock(struct spinlock *l);
void spin_unlock(struct spinlock *l);

/* ---- command line (Multiboot cmdline without its first token, the kernel path) */
const char *cmdline(void);
/* Value of `key=value` in the arguments (NULL if absent); the returned string ends at a space or NUL. */
const char *arg_str(const char *key);
bool arg_is(const char *key, const char *value);
u64 arg_u64(const char *key, u64 dflt);
/* Multiboot information: mem_upper (KiB) and magic seen at entry. */
u32 boot_mem_upper_kib(void);
u32 boot_entry_magic(void);
bool booted_via_elf64(void);

/* ---- fw_cfg (legacy I/O 0x510/0x511) */
#define FW_CFG_SIGNATURE 0x0000
#define FW_CFG_ID 0x0001
#define FW_CFG_RAM_SIZE 0x0003
#define FW_CFG_NB_CPUS 0x0005
u64 fw_cfg_read(u16 key, unsigned size);
u64 fw_cfg_ram_size(void);
u32 fw_cfg_nb_cpus(void);

/* ---- interrupts */
struct regs {
    u64 rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15;
    u64 vector, error_code;
    u64 rip, cs, rflags, rsp, ss;
};
typedef void (*irq_handler_t)(struct regs *r);
/* Handler for vector (32..255, or an exception vector to override the default report-and-fail). */
void set_irq_handler(u8 vector, irq_handler_t h);

/* ---- local APIC: xAPIC (MMIO 0xFEE00000) or x2APIC (MSR 0x800 + reg/16), selected at run time */
enum apic_mode { APIC_XAPIC = 1, APIC_X2APIC = 2 };
#define APIC_ID 0x20
#define APIC_VERSION 0x30
#define APIC_TPR 0x80
#define APIC_PPR 0xA0
#define APIC_EOI 0xB0
#define APIC_LDR 0xD0
#define APIC_DFR 0xE0
#define APIC_SPIV 0xF0
#define APIC_ISR 0x100
#define APIC_TMR 0x180
#define APIC_IRR 0x200
#define APIC_ESR 0x280
#define APIC_ICR 0x300
#define APIC_ICR2 0x310
#define APIC_LVTT 0x320
#define APIC_LVTTHMR 0x330
#define APIC_LVTPC 0x340
#define APIC_LVT0 0x350
#define APIC_LVT1 0x360
#define APIC_LVTERR 0x370
#define APIC_TMICT 0x380
#define APIC_TMCCT 0x390
#define APIC_TDCR 0x3E0
#define APIC_SELF_IPI 0x3F0 /* x2APIC only */
#define APIC_LVT_MASKED (1u << 16)
#define APIC_LVT_TIMER_ONESHOT (0u << 17)
#define APIC_LVT_TIMER_PERIODIC (1u << 17)
#define APIC_LVT_TIMER_TSCDEADLINE (2u << 17)
#define APIC_DM_FIXED 0x000
#define APIC_DM_NMI 0x400
#define APIC_DM_INIT 0x500
#define APIC_DM_STARTUP 0x600
#define APIC_ICR_BUSY (1u << 12)
#define APIC_INT_ASSERT (1u << 14)
#define APIC_DEST_SELF (1u << 18)
#define APIC_DEST_ALLINC (2u << 18)
#define APIC_DEST_ALLBUT (3u << 18)
#define MSR_IA32_APICBASE 0x1B
#define MSR_IA32_TSC_DEADLINE 0x6E0
#define MSR_IA32_TSC 0x10

/* Enables the APIC of the calling CPU in `mode` (SPIV = 0x1FF) and makes `mode` the mode for APs brought up
 * later. */
void apic_init(enum apic_mode mode);
/* The mode from the `mode=xapic|x2apic` argument; default x2APIC when CPUID.1:ECX[21] says it exists. */
enum apic_mode apic_mode_from_cmdline(void);
enum apic_mode apic_mode(void);
bool cpu_has_x2apic(void);
u32 apic_read(u32 reg);
void apic_write(u32 reg, u32 val);
/* Writes the ICR (destination APIC ID, low word) and waits for delivery in xAPIC mode. */
void apic_icr_write(u32 dest, u32 lo);
u32 apic_id(void);
void apic_eoi(void);
void apic_send_ipi(u32 dest, u8 vector);
/* True if `vector` is set in the 256-bit register array at `base` (APIC_ISR, APIC_IRR, APIC_TMR). */
bool apic_vector_set(u32 base, u8 vector);

/* ---- SMP */
/* Brings up the APs (INIT + one SIPI vector 0, all-excluding-self) and waits until fw_cfg NB_CPUS CPUs are
 * online. Calls apic_init(apic_mode_from_cmdline()) first if the APIC is not initialised yet. */
void smp_init(void);
u32 nr_cpus(void);                  /* CPUs online (1 before smp_init) */
u32 smp_id(void);                   /* this CPU's APIC ID, which is its index */
/* Runs fn(arg) on `cpu` (interrupts enabled there) and waits for it to return. On the caller's own CPU it
 * just calls it. */
void on_cpu(u32 cpu, void (*fn)(void *), void *arg);
void on_cpu_async(u32 cpu, void (*fn)(void *), void *arg);
bool cpu_idle(u32 cpu);             /* the AP finished its last on_cpu_async function */

/* ---- user mode (CPL 3, long mode, paging on: the mode this host runs natively) */
/* Runs fn(arg) at CPL 3 on this CPU's user stack and returns its result. Interrupts keep the caller's IF. */
u64 run_user(u64 (*fn)(u64), u64 arg);

/* ---- memory */
/* Page-aligned, zeroed memory above the image; never freed. Safe from any CPU. */
void *alloc_pages(unsigned n);
/* The 2 MiB page-directory entries of the identity map (index = address >> 21). */
extern u64 pd[2048];
#define PTE_P 0x1ULL
#define PTE_RW 0x2ULL
#define PTE_US 0x4ULL
#define PTE_PS 0x80ULL
/* The 4 KiB page-table entry that maps `va` (below 4 GiB). The first call for a 2 MiB region splits its
 * large page into 512 small ones with the same translation and flags. Whoever changes a PTE flushes the TLB
 * (invlpg, CR3, or a remote flush) as the test requires. Safe from any CPU. */
u64 *pte_4k(u64 va);

/* ---- time */
/* TSC frequency in Hz from CPUID 0x15, 0x16 or the hypervisor leaf 0x40000010; 0 if unknown. */
u64 tsc_hz_from_cpuid(void);
/* Busy-waits roughly `tsc_ticks` TSC ticks. */
void tsc_delay(u64 tsc_ticks);

int main(void);

#endif
