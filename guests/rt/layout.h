/* Constants shared by entry.S and the C runtime. */
#ifndef RT_LAYOUT_H
#define RT_LAYOUT_H

#define MAX_CPUS 1024
/* Each CPU owns one naturally aligned region: word 0 points to its per-CPU data, the lower half is its user
 * stack, the upper half its kernel stack. `this_cpu()` masks RSP to find the region. */
#define REGION_SIZE 0x8000
#define USER_STACK_TOP_OFFSET 0x4000

#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_KCODE32 0x18
#define SEL_UDATA 0x20
#define SEL_UCODE 0x28
#define SEL_TSS0 0x30
#define GDT_SIZE (SEL_TSS0 + 16 * MAX_CPUS)

#define WAKE_VECTOR 0xF0
#define SPURIOUS_VECTOR 0xFF

#endif
