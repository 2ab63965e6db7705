/* enlighten guest runtime. See rt.h for the API and entry.S for the boot paths. */
#include "rt.h"

/* ---------------------------------------------------------------- symbols from entry.S / the linker script */
extern u8 bsp_region[];
extern u64 gdt[];
extern u64 boot_magic, boot_mbi, ap_region_next, boot_via_elf64;
extern u8 ap_tramp_start[], ap_tramp_end[];
extern u8 isr_stubs[];
extern u8 rt_user_ret_insn[];
noreturn void rt_user_return(u64 saved_rsp, u64 result);
extern u8 __image_end[];
struct ex_entry { u64 insn, fixup; };
extern struct ex_entry __ex_table_start[], __ex_table_end[];
u64 rt_run_user_asm(u64 (*fn)(u64), u64 arg, u64 user_stack_top, u64 *tss_rsp0);

/* ---------------------------------------------------------------- per-CPU data */
struct tss {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2;
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} __attribute__((packed));

struct percpu {
    u32 id;
    u32 fault_vector; /* vector + 1 of the last exception fixed up through the exception table */
    u64 fault_error;
    u64 region;
    void (*volatile fn)(void *);
    void *volatile arg;
    volatile u32 waiter; /* CPU to wake when fn returns, or ~0 */
    struct tss tss __attribute__((aligned(16)));
};

static struct percpu cpus[MAX_CPUS];
static volatile u32 cpus_online = 1;
static u32 bsp_id;

static inline struct percpu *this_cpu(void)
{
    u64 rsp;
    asm volatile("mov %%rsp, %0" : "=r"(rsp));
    return *(struct percpu **)(rsp & ~(u64)(REGION_SIZE - 1));
}

/* ---------------------------------------------------------------- libc-like helpers */
/* One string instruction each: supervisor code is emulated here, instruction by instruction, and KVM's
 * emulator runs a whole `rep stos`/`rep movs` far faster than the equivalent byte loop. */
void *memset(void *d, int c, size_t n)
{
    void *p = d;
    asm volatile("rep stosb" : "+D"(p), "+c"(n) : "a"(c) : "memory");
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *p = d;
    asm volatile("rep movsb" : "+D"(p), "+S"(s), "+c"(n) : : "memory");
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p < *q ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return (u8)*a - (u8)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (u8)*a - (u8)*b;
        if (!*a)
            return 0;
    }
    return 0;
}

u64 strtou64(const char *s, const char **end)
{
    u64 v = 0;
    unsigned base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (;; s++) {
        unsigned d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = *s - 'A' + 10;
        else
            break;
        v = v * base + d;
    }
    if (end)
        *end = s;
    return v;
}

void spin_lock(struct spinlock *l)
{
    while (__atomic_exchange_n(&l->v, 1, __ATOMIC_ACQUIRE))
        while (READ_ONCE(l->v))
            pause();
}

void spin_unlock(struct spinlock *l)
{
    __atomic_store_n(&l->v, 0, __ATOMIC_RELEASE);
}

/* ---------------------------------------------------------------- serial and printf */
#define COM1 0x3F8

static void serial_init(void)
{
    outb(COM1 + 1, 0x00); /* IER: no interrupts */
    outb(COM1 + 3, 0x80); /* LCR: DLAB */
    outb(COM1 + 0, 0x01); /* DLL: 115200 baud */
    outb(COM1 + 1, 0x00); /* DLM */
    outb(COM1 + 3, 0x03); /* LCR: 8N1 */
    outb(COM1 + 2, 0xC7); /* FCR: FIFO on, cleared */
    outb(COM1 + 4, 0x0B); /* MCR: DTR, RTS, OUT2 */
}

static void serial_putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20))
        pause();
    outb(COM1, (u8)c);
}

static struct spinlock print_lock;

void puts(const char *s)
{
    u64 flags = read_rflags();
    cli();
    spin_lock(&print_lock);
    for (; *s; s++)
        serial_putc(*s);
    spin_unlock(&print_lock);
    if (flags & 0x200)
        sti();
}

struct outbuf {
    char *buf;
    size_t size, len;
};

static void out_c(struct outbuf *o, char c)
{
    if (o->len + 1 < o->size)
        o->buf[o->len] = c;
    o->len++;
}

static void out_num(struct outbuf *o, u64 v, unsigned base, bool upper, int width, char pad, bool neg)
{
    char tmp[24];
    int n = 0;
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    if (neg && pad == '0') {
        out_c(o, '-');
        width--;
    }
    for (int w = n + ((neg && pad != '0') ? 1 : 0); w < width; w++)
        out_c(o, pad);
    if (neg && pad != '0')
        out_c(o, '-');
    while (n)
        out_c(o, tmp[--n]);
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct outbuf o = { buf, size, 0 };
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            out_c(&o, *fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, longs = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            longs++;
            fmt++;
        }
        switch (*fmt) {
        case 'd':
        case 'i': {
            s64 v = longs ? va_arg(ap, s64) : va_arg(ap, int);
            out_num(&o, v < 0 ? -(u64)v : (u64)v, 10, false, width, pad, v < 0);
            break;
        }
        case 'u':
            out_num(&o, longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, false, width, pad, false);
            break;
        case 'x':
        case 'X':
            out_num(&o, longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, *fmt == 'X', width, pad, false);
            break;
        case 'p':
            out_c(&o, '0');
            out_c(&o, 'x');
            out_num(&o, (u64)va_arg(ap, void *), 16, false, width, pad, false);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            int n = (int)strlen(s);
            for (; n < width; n++)
                out_c(&o, ' ');
            for (; *s; s++)
                out_c(&o, *s);
            break;
        }
        case 'c':
            out_c(&o, (char)va_arg(ap, int));
            break;
        case '%':
            out_c(&o, '%');
            break;
        case '\0':
            fmt--;
            break;
        default:
            out_c(&o, '%');
            out_c(&o, *fmt);
        }
    }
    if (o.size)
        o.buf[o.len < o.size ? o.len : o.size - 1] = '\0';
    return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

int printf(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    puts(buf);
    return n;
}

/* ---------------------------------------------------------------- results and exit */
static volatile u32 n_pass, n_fail, n_skip;

static void report_line(const char *prefix, const char *fmt, va_list ap)
{
    char buf[400];
    size_t p = strlen(prefix);
    memcpy(buf, prefix, p);
    vsnprintf(buf + p, sizeof(buf) - p - 1, fmt, ap);
    size_t n = strlen(buf);
    buf[n] = '\n';
    buf[n + 1] = '\0';
    puts(buf);
}

void report(bool ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    report_line(ok ? "PASS: " : "FAIL: ", fmt, ap);
    va_end(ap);
    atomic_inc(ok ? &n_pass : &n_fail);
}

void report_skip(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    report_line("SKIP: ", fmt, ap);
    va_end(ap);
    atomic_inc(&n_skip);
}

void report_info(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    report_line("INFO: ", fmt, ap);
    va_end(ap);
}

unsigned report_failures(void)
{
    return n_fail;
}

noreturn void debug_exit(u32 code)
{
    outl(0xF4, code);
    /* isa-debug-exit absent: the Bochs/QEMU power-off port. */
    for (const char *s = "Shutdown"; *s; s++)
        outb(0x8900, (u8)*s);
    for (;;) {
        cli();
        hlt();
    }
}

noreturn void report_summary(void)
{
    printf("SUMMARY: %u tests, %u failures, %u skipped\n", n_pass + n_fail, n_fail, n_skip);
    debug_exit(n_fail ? 1 : 0);
}

noreturn void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    report_line("FAIL: ", fmt, ap);
    va_end(ap);
    atomic_inc(&n_fail);
    report_summary();
}

/* ---------------------------------------------------------------- exception-safe MSR access */
int rdmsr_safe(u32 msr, u64 *val)
{
    struct percpu *c = this_cpu();
    u32 lo = 0, hi = 0;
    WRITE_ONCE(c->fault_vector, 0);
    asm volatile("1: rdmsr\n2:\n"
                 ".pushsection .ex_table, \"a\"\n.balign 8\n.quad 1b, 2b\n.popsection"
                 : "+a"(lo), "+d"(hi)
                 : "c"(msr)
                 : "memory");
    int f = (int)READ_ONCE(c->fault_vector);
    if (!f)
        *val = ((u64)hi << 32) | lo;
    return f;
}

int wrmsr_safe(u32 msr, u64 val)
{
    struct percpu *c = this_cpu();
    WRITE_ONCE(c->fault_vector, 0);
    asm volatile("1: wrmsr\n2:\n"
                 ".pushsection .ex_table, \"a\"\n.balign 8\n.quad 1b, 2b\n.popsection"
                 ::"c"(msr), "a"((u32)val), "d"((u32)(val >> 32))
                 : "memory");
    return (int)READ_ONCE(c->fault_vector);
}

u64 last_fault_error(void)
{
    return this_cpu()->fault_error;
}

/* ---------------------------------------------------------------- GDT, TSS, IDT */
struct idt_entry {
    u16 off0, sel;
    u8 ist, type;
    u16 off1;
    u32 off2, zero;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(16)));
static irq_handler_t handlers[256];

struct desc_ptr {
    u16 limit;
    u64 base;
} __attribute__((packed));

static void set_gate(unsigned vec, u64 addr, unsigned dpl)
{
    struct idt_entry *e = &idt[vec];
    e->off0 = (u16)addr;
    e->sel = SEL_KCODE;
    e->ist = 0;
    e->type = (u8)(0x8E | (dpl << 5)); /* present, 64-bit interrupt gate */
    e->off1 = (u16)(addr >> 16);
    e->off2 = (u32)(addr >> 32);
    e->zero = 0;
}

static void idt_init(void)
{
    for (unsigned v = 0; v < 256; v++)
        set_gate(v, (u64)isr_stubs + 16 * v, v == 3 ? 3 : 0);
}

static void cpu_tables_init(struct percpu *c)
{
    struct desc_ptr gdtr = { GDT_SIZE - 1, (u64)gdt };
    struct desc_ptr idtr = { sizeof(idt) - 1, (u64)idt };
    u64 base = (u64)&c->tss;
    u64 limit = sizeof(struct tss) - 1;
    unsigned idx = (SEL_TSS0 + 16 * c->id) / 8;

    c->tss.iomap_base = sizeof(struct tss);
    gdt[idx] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89ULL << 40) | (((limit >> 16) & 0xF) << 48) |
               (((base >> 24) & 0xFF) << 56);
    gdt[idx + 1] = base >> 32;
    asm volatile("lgdt %0" ::"m"(gdtr));
    asm volatile("lidt %0" ::"m"(idtr));
    asm volatile("ltr %w0" ::"r"((u16)(SEL_TSS0 + 16 * c->id)));
}

void set_irq_handler(u8 vector, irq_handler_t h)
{
    handlers[vector] = h;
}

static const char *exception_name(u64 v)
{
    static const char *const names[] = { "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO",
                                         "#TS", "#NP", "#SS", "#GP", "#PF", "?",   "#MF", "#AC", "#MC", "#XM",
                                         "#VE", "#CP" };
    return v < ARRAY_SIZE(names) ? names[v] : "exception";
}

static void dump_regs(struct regs *r)
{
    u64 cr2;
    asm volatile("mov %%cr2, %0" : "=r"(cr2));
    printf("  rip=%lx cs=%lx rflags=%lx rsp=%lx ss=%lx cr2=%lx\n", r->rip, r->cs, r->rflags, r->rsp, r->ss, cr2);
    printf("  rax=%lx rbx=%lx rcx=%lx rdx=%lx rsi=%lx rdi=%lx\n", r->rax, r->rbx, r->rcx, r->rdx, r->rsi, r->rdi);
}

void rt_interrupt(struct regs *r)
{
    u64 v = r->vector;
    if (v == 6 && r->rip == (u64)rt_user_ret_insn && (r->cs & 3) == 3) {
        struct percpu *c = this_cpu();
        rt_user_return(*(u64 *)((u8 *)&c->tss + 4), r->rax);
    }
    if (v < 32) {
        for (struct ex_entry *e = __ex_table_start; e < __ex_table_end; e++) {
            if (e->insn == r->rip) {
                struct percpu *c = this_cpu();
                c->fault_vector = (u32)v + 1;
                c->fault_error = r->error_code;
                r->rip = e->fixup;
                return;
            }
        }
        if (handlers[v]) {
            handlers[v](r);
            return;
        }
        printf("FAIL: unexpected exception %lu (%s) error code %lx at rip %lx on CPU %u\n", v, exception_name(v),
               r->error_code, r->rip, this_cpu()->id);
        dump_regs(r);
        atomic_inc(&n_fail);
        report_summary();
    }
    if (handlers[v]) {
        handlers[v](r);
        return;
    }
    if (v == SPURIOUS_VECTOR)
        return;
    printf("FAIL: unexpected interrupt vector %lu at rip %lx on CPU %u\n", v, r->rip, this_cpu()->id);
    atomic_inc(&n_fail);
    report_summary();
}

/* ---------------------------------------------------------------- command line and boot information */
static char cmdline_buf[1024];
static const char *cmdline_args = "";
static u32 mem_upper_kib;

static void mbi_init(void)
{
    const u32 *mbi = (const u32 *)(u64)(u32)boot_mbi;
    if (!mbi)
        return;
    u32 flags = mbi[0];
    if (flags & 1)
        mem_upper_kib = mbi[2];
    if (flags & 4) {
        const char *s = (const char *)(u64)mbi[4];
        size_t n = 0;
        while (s[n] && n < sizeof(cmdline_buf) - 1) {
            cmdline_buf[n] = s[n];
            n++;
        }
        cmdline_buf[n] = '\0';
        /* The first token is the kernel path. */
        const char *p = cmdline_buf;
        while (*p && *p != ' ')
            p++;
        while (*p == ' ')
            p++;
        cmdline_args = p;
    }
}

const char *cmdline(void)
{
    return cmdline_args;
}

const char *arg_str(const char *key)
{
    size_t k = strlen(key);
    const char *p = cmdline_args;
    while (*p) {
        while (*p == ' ')
            p++;
        if (!strncmp(p, key, k) && p[k] == '=')
            return p + k + 1;
        while (*p && *p != ' ')
            p++;
    }
    return NULL;
}

bool arg_is(const char *key, const char *value)
{
    const char *v = arg_str(key);
    if (!v)
        return false;
    size_t n = strlen(value);
    return !strncmp(v, value, n) && (v[n] == ' ' || v[n] == '\0');
}

u64 arg_u64(const char *key, u64 dflt)
{
    const char *v = arg_str(key);
    return v ? strtou64(v, NULL) : dflt;
}

u32 boot_mem_upper_kib(void)
{
    return mem_upper_kib;
}

u32 boot_entry_magic(void)
{
    return (u32)boot_magic;
}

bool booted_via_elf64(void)
{
    return boot_via_elf64 != 0;
}

/* ---------------------------------------------------------------- fw_cfg */
u64 fw_cfg_read(u16 key, unsigned size)
{
    u64 v = 0;
    outw(0x510, key);
    for (unsigned i = 0; i < size && i < 8; i++)
        v |= (u64)inb(0x511) << (8 * i);
    return v;
}

u64 fw_cfg_ram_size(void)
{
    return fw_cfg_read(FW_CFG_RAM_SIZE, 8);
}

u32 fw_cfg_nb_cpus(void)
{
    return (u32)fw_cfg_read(FW_CFG_NB_CPUS, 2);
}

/* ---------------------------------------------------------------- memory */
static struct spinlock heap_lock;
static u64 heap_next;

static void *alloc_aligned_nozero(u64 size, u64 align)
{
    spin_lock(&heap_lock);
    if (!heap_next)
        heap_next = (u64)__image_end;
    u64 p = (heap_next + align - 1) & ~(align - 1);
    heap_next = p + size;
    spin_unlock(&heap_lock);
    return (void *)p;
}

static void *alloc_aligned(u64 size, u64 align)
{
    void *p = alloc_aligned_nozero(size, align);
    memset(p, 0, size);
    return p;
}

void *alloc_pages(unsigned n)
{
    return alloc_aligned((u64)n * 4096, 4096);
}

static struct spinlock pt_lock;

u64 *pte_4k(u64 va)
{
    u64 idx = (va >> 21) & 2047;
    spin_lock(&pt_lock);
    u64 pde = pd[idx];
    if (pde & PTE_PS) {
        u64 *pt = alloc_pages(1);
        u64 base = pde & 0xFFFFFFFFFFE00000ULL;
        u64 flags = pde & 0x1F; /* P, RW, US, PWT, PCD */
        for (u64 i = 0; i < 512; i++)
            pt[i] = (base + (i << 12)) | flags;
        WRITE_ONCE(pd[idx], (u64)pt | PTE_P | PTE_RW | PTE_US);
        write_cr3(read_cr3()); /* drop the large-page translation (same mapping, so other CPUs may keep it) */
    }
    spin_unlock(&pt_lock);
    return (u64 *)(pd[idx] & 0xFFFFFFFFFF000ULL) + ((va >> 12) & 511);
}

/* ---------------------------------------------------------------- local APIC */
static enum apic_mode g_apic_mode;

bool cpu_has_x2apic(void)
{
    return (cpuid(1).c >> 21) & 1;
}

enum apic_mode apic_mode(void)
{
    return g_apic_mode;
}

enum apic_mode apic_mode_from_cmdline(void)
{
    if (arg_is("mode", "xapic"))
        return APIC_XAPIC;
    if (arg_is("mode", "x2apic"))
        return APIC_X2APIC;
    return cpu_has_x2apic() ? APIC_X2APIC : APIC_XAPIC;
}

u32 apic_read(u32 reg)
{
    if (g_apic_mode == APIC_X2APIC)
        return (u32)rdmsr(0x800 + (reg >> 4));
    return *(volatile u32 *)(0xFEE00000UL + reg);
}

void apic_write(u32 reg, u32 val)
{
    if (g_apic_mode == APIC_X2APIC)
        wrmsr(0x800 + (reg >> 4), val);
    else
        *(volatile u32 *)(0xFEE00000UL + reg) = val;
}

void apic_icr_write(u32 dest, u32 lo)
{
    if (g_apic_mode == APIC_X2APIC) {
        wrmsr(0x830, ((u64)dest << 32) | lo);
        return;
    }
    apic_write(APIC_ICR2, dest << 24);
    apic_write(APIC_ICR, lo);
    while (apic_read(APIC_ICR) & APIC_ICR_BUSY)
        pause();
}

u32 apic_id(void)
{
    if (g_apic_mode == APIC_X2APIC)
        return (u32)rdmsr(0x802);
    return apic_read(APIC_ID) >> 24;
}

void apic_eoi(void)
{
    apic_write(APIC_EOI, 0);
}

void apic_send_ipi(u32 dest, u8 vector)
{
    apic_icr_write(dest, APIC_DM_FIXED | APIC_INT_ASSERT | vector);
}

bool apic_vector_set(u32 base, u8 vector)
{
    return (apic_read(base + 0x10 * (vector / 32)) >> (vector % 32)) & 1;
}

static void apic_enable_mode(enum apic_mode mode)
{
    u64 base = rdmsr(MSR_IA32_APICBASE);
    if (!(base & (1 << 11))) {
        base |= 1 << 11;
        wrmsr(MSR_IA32_APICBASE, base);
    }
    if (mode == APIC_X2APIC && !(base & (1 << 10)))
        wrmsr(MSR_IA32_APICBASE, base | (1 << 10));
}

static void apic_local_setup(void)
{
    apic_write(APIC_SPIV, 0x100 | SPURIOUS_VECTOR);
    apic_write(APIC_TPR, 0);
}

void apic_init(enum apic_mode mode)
{
    if (mode == APIC_X2APIC && !cpu_has_x2apic())
        fail("x2APIC mode requested but CPUID.1:ECX[21] is clear");
    outb(0x21, 0xFF); /* mask both 8259s: their interrupts would come through LINT0 */
    outb(0xA1, 0xFF);
    apic_enable_mode(mode);
    g_apic_mode = mode;
    apic_local_setup();
}

/* ---------------------------------------------------------------- SMP */
static u32 initial_apic_id(void)
{
    if (cpuid(0).a >= 0xB && cpuid_count(0xB, 0).b != 0)
        return cpuid_count(0xB, 0).d;
    return cpuid(1).b >> 24;
}

static void wake_handler(struct regs *r)
{
    (void)r;
    apic_eoi();
}

u32 nr_cpus(void)
{
    return cpus_online;
}

u32 smp_id(void)
{
    return this_cpu()->id;
}

static volatile u32 smp_expected;

void rt_ap_main(u64 region)
{
    u32 id = initial_apic_id();
    if (id >= MAX_CPUS)
        for (;;)
            hlt();
    struct percpu *c = &cpus[id];
    *(struct percpu **)region = c;
    c->id = id;
    c->region = region;
    c->waiter = ~0u;
    cpu_tables_init(c);
    asm volatile("mov %0, %%ds; mov %0, %%es; mov %0, %%ss" ::"r"(SEL_KDATA));
    apic_enable_mode(g_apic_mode);
    apic_local_setup();
    atomic_inc(&cpus_online);
    if (READ_ONCE(cpus_online) == smp_expected)
        apic_send_ipi(bsp_id, WAKE_VECTOR);
    for (;;) {
        cli();
        while (!READ_ONCE(c->fn)) {
            safe_halt();
            cli();
        }
        void (*fn)(void *) = c->fn;
        void *arg = c->arg;
        sti();
        fn(arg);
        cli();
        u32 waiter = c->waiter;
        c->waiter = ~0u;
        WRITE_ONCE(c->fn, NULL);
        if (waiter != ~0u)
            apic_send_ipi(waiter, WAKE_VECTOR);
    }
}

void smp_init(void)
{
    if (!g_apic_mode)
        apic_init(apic_mode_from_cmdline());
    u32 n = fw_cfg_nb_cpus();
    if (n == 0)
        n = 1;
    if (n > MAX_CPUS)
        fail("fw_cfg NB_CPUS %u exceeds the runtime's limit of %u", n, MAX_CPUS);
    if (n == 1 || cpus_online == n)
        return;
    smp_expected = n;
    outb(0x21, 0xFF); /* mask both 8259s */
    outb(0xA1, 0xFF);
    /* Stacks need no zeroing (each AP writes its per-CPU pointer itself). */
    ap_region_next = (u64)alloc_aligned_nozero((u64)(n - 1) * REGION_SIZE, REGION_SIZE);
    memcpy((void *)0, ap_tramp_start, (size_t)(ap_tramp_end - ap_tramp_start));
    /* Watchdog: a one-shot APIC timer on the wake vector, about 8.6 s at a 1 GHz APIC clock. */
    apic_write(APIC_TDCR, 0x0); /* divide by 2 */
    apic_write(APIC_LVTT, WAKE_VECTOR);
    apic_write(APIC_TMICT, 0xFFFFFFFF);
    apic_icr_write(0, APIC_DEST_ALLBUT | APIC_DM_INIT | APIC_INT_ASSERT);
    apic_icr_write(0, APIC_DEST_ALLBUT | APIC_DM_STARTUP | 0x00);
    u64 flags = read_rflags();
    cli();
    while (READ_ONCE(cpus_online) < n && apic_read(APIC_TMCCT) != 0) {
        safe_halt();
        cli();
    }
    apic_write(APIC_LVTT, APIC_LVT_MASKED);
    apic_write(APIC_TMICT, 0);
    if (flags & 0x200)
        sti();
    if (READ_ONCE(cpus_online) < n)
        fail("only %u of %u CPUs came online", cpus_online, n);
}

static void on_cpu_start(u32 cpu, void (*fn)(void *), void *arg, u32 waiter)
{
    if (cpu >= MAX_CPUS || !cpus[cpu].region)
        fail("on_cpu: CPU %u is not online", cpu);
    struct percpu *c = &cpus[cpu];
    while (READ_ONCE(c->fn))
        pause();
    c->arg = arg;
    c->waiter = waiter;
    barrier();
    WRITE_ONCE(c->fn, fn);
    apic_send_ipi(cpu, WAKE_VECTOR);
}

void on_cpu_async(u32 cpu, void (*fn)(void *), void *arg)
{
    if (cpu == smp_id()) {
        fn(arg);
        return;
    }
    on_cpu_start(cpu, fn, arg, ~0u);
}

void on_cpu(u32 cpu, void (*fn)(void *), void *arg)
{
    u32 self = smp_id();
    if (cpu == self) {
        fn(arg);
        return;
    }
    u64 flags = read_rflags();
    cli();
    on_cpu_start(cpu, fn, arg, self);
    while (READ_ONCE(cpus[cpu].fn)) {
        safe_halt();
        cli();
    }
    if (flags & 0x200)
        sti();
}

bool cpu_idle(u32 cpu)
{
    return cpu < MAX_CPUS && !READ_ONCE(cpus[cpu].fn);
}

/* ---------------------------------------------------------------- user mode */
u64 run_user(u64 (*fn)(u64), u64 arg)
{
    struct percpu *c = this_cpu();
    return rt_run_user_asm(fn, arg, c->region + USER_STACK_TOP_OFFSET, (u64 *)((u8 *)&c->tss + 4));
}

/* ---------------------------------------------------------------- time */
u64 tsc_hz_from_cpuid(void)
{
    u32 max = cpuid(0).a;
    if (max >= 0x15) {
        struct cpuid r = cpuid(0x15);
        if (r.a && r.b && r.c)
            return (u64)r.c * r.b / r.a;
    }
    struct cpuid hv = cpuid(0x40000000);
    if (hv.a >= 0x40000010 && hv.a < 0x40000100) {
        struct cpuid t = cpuid(0x40000010);
        if (t.a)
            return (u64)t.a * 1000;
    }
    return 0;
}

void tsc_delay(u64 ticks)
{
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < ticks)
        pause();
}

/* ---------------------------------------------------------------- BSP entry */
void rt_bsp_main(void)
{
    u32 id = initial_apic_id();
    if (id >= MAX_CPUS)
        id = 0;
    struct percpu *c = &cpus[id];
    *(struct percpu **)bsp_region = c;
    c->id = id;
    c->region = (u64)bsp_region;
    c->waiter = ~0u;
    bsp_id = id;
    serial_init();
    idt_init();
    cpu_tables_init(c);
    set_irq_handler(WAKE_VECTOR, wake_handler);
    mbi_init();
    int r = main();
    if (r)
        report(false, "main returned %d", r);
    report_summary();
}
