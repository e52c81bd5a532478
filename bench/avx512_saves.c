/* What keeping the AVX-512 state across a call costs, saved and restored back to back:
 * ymm0-15 moves (what the general paths did before), zmm0-31 + k0-7 moves (what they do
 * where the OS enabled AVX-512), and xsavec/xsaveopt + xrstor of the same components.
 * Build and run on a CPU with AVX-512F and BW:
 *   gcc -O2 -mavx512f -mavx512bw -o /tmp/avx512_saves bench/avx512_saves.c && /tmp/avx512_saves
 * Prints ns per save+restore pair, three rounds. */
#include <stdio.h>
#include <string.h>
#include <time.h>

#define N 10000000
static char area[4096] __attribute__((aligned(64)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

__attribute__((noinline)) static void zmm_moves(void) {
    for (long i = 0; i < N; i++)
        asm volatile(
            ".irp r,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n"
            "vmovdqa64 %%zmm\\r, \\r*64(%0)\n.endr\n"
            ".irp r,0,1,2,3,4,5,6,7\nkmovq %%k\\r, 2048+\\r*8(%0)\n.endr\n"
            ".irp r,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n"
            "vmovdqa64 \\r*64(%0), %%zmm\\r\n.endr\n"
            ".irp r,0,1,2,3,4,5,6,7\nkmovq 2048+\\r*8(%0), %%k\\r\n.endr\n" ::"r"(area)
            : "memory");
}

__attribute__((noinline)) static void ymm_moves(void) {
    for (long i = 0; i < N; i++)
        asm volatile(".irp r,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n"
                     "vmovdqu %%ymm\\r, \\r*32(%0)\n.endr\n"
                     ".irp r,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n"
                     "vmovdqu \\r*32(%0), %%ymm\\r\n.endr\n" ::"r"(area)
                     : "memory");
}

/* AVX, opmask, ZMM_Hi256, Hi16_ZMM (and SSE): XCR0 bits 1, 2, 5, 6, 7. */
__attribute__((noinline)) static void xsavec_xrstor(void) {
    for (long i = 0; i < N; i++)
        asm volatile("xsavec64 (%0)\nxrstor64 (%0)\n" ::"r"(area), "a"(0xe6), "d"(0) : "memory");
}

__attribute__((noinline)) static void xsaveopt_xrstor(void) {
    for (long i = 0; i < N; i++)
        asm volatile("xsaveopt64 (%0)\nxrstor64 (%0)\n" ::"r"(area), "a"(0xe6), "d"(0) : "memory");
}

int main(void) {
    /* The state in use, as after glibc's EVEX functions and an -mavx512f caller. */
    asm volatile("vpternlogd $0xff, %%zmm16, %%zmm16, %%zmm16\n"
                 "vpternlogd $0xff, %%zmm3, %%zmm3, %%zmm3\nkxnorq %%k1, %%k1, %%k1" ::
                     : "xmm16", "xmm3", "k1");
    struct {
        const char *name;
        void (*f)(void);
    } runs[] = {{"ymm0-15 moves", ymm_moves},
                {"zmm0-31 + k0-7 moves", zmm_moves},
                {"xsavec + xrstor", xsavec_xrstor},
                {"xsaveopt + xrstor", xsaveopt_xrstor}};
    for (int round = 0; round < 3; round++)
        for (int k = 0; k < 4; k++) {
            memset(area, 0, sizeof area);
            double t = now();
            runs[k].f();
            printf("%-22s %7.2f ns\n", runs[k].name, (now() - t) / N);
        }
    return 0;
}
