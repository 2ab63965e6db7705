/* isa-debug-exit: writes the code given as code=N on the command line (32-bit out to 0xF4). */
#include "rt.h"

int main(void)
{
    u32 code = (u32)arg_u64("code", 0);
    printf("debug_exit: writing %u to port 0xf4\n", code);
    outl(0xF4, code);
    /* still running: the device is missing or ignored the write */
    printf("FAIL: still running after the debug-exit write\n");
    for (;;) {
        cli();
        hlt();
    }
}
