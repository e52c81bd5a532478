/* A caller that keeps AVX-512 state live across calls, as GCC's interprocedural register
 * allocation (-fipa-ra) allows with -mavx512f: `sum512` holds 24 vectors in zmm0-31
 * (most of them in zmm16-31, all 512 bits used) and two masks in k registers across
 * every call to `tick` and `first`, leaves that touch no vector register. A trampoline
 * whose handler (or the libc string functions it calls: glibc picks EVEX and AVX-512
 * variants on CPUs with AVX-512) changes any of that state breaks the result.
 *
 * Build: -O2 -mavx512f -mavx512vl -fipa-ra -no-pie -fno-pie (run only where the CPU has
 * AVX-512F and AVX512VL). Usage: avx512 N [R] (R rounds, 1 by default, of N calls of tick
 * and first each, each round starting from the last one's vectors), or avx512 - N (prints
 * "running", then runs rounds until SIGUSR1: for attaching mid-loop; the result line says
 * how many rounds ran, for an untraced run of as many to compare). */
#include <immintrin.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned long ticks;
static volatile sig_atomic_t stop;

static void on_usr1(int sig) {
    (void)sig;
    stop = 1;
}
static const char *names[] = {"alpha", "beta", "gamma"};

__attribute__((noinline)) static void tick(void) { ticks++; }
__attribute__((noinline)) static int first(const char *s) { return s[0]; }

#define STEP(k) a[k] = _mm512_add_epi32(_mm512_xor_si512(a[k], v), a[(k + 1) % 24]);
#define STEPS(k0, k1, k2, k3, k4, k5) STEP(k0) STEP(k1) STEP(k2) STEP(k3) STEP(k4) STEP(k5)

__attribute__((noinline)) static void sum512(int n, const int *in, int *out) {
    __m512i a[24];
    for (int k = 0; k < 24; k++)
        a[k] = _mm512_loadu_si512(in + 16 * k);
    __mmask16 m1 = _mm512_cmpgt_epi32_mask(a[0], a[1]);
    __mmask16 m2 = _mm512_cmpgt_epi32_mask(a[2], a[3]);
    for (int i = 0; i < n; i++) {
        __m512i v = _mm512_set1_epi32(i);
        tick();
        STEPS(0, 1, 2, 3, 4, 5) STEPS(6, 7, 8, 9, 10, 11)
        a[5] = _mm512_mask_add_epi32(a[5], m1, a[5], v);
        v = _mm512_set1_epi32(first(names[i % 3]));
        STEPS(12, 13, 14, 15, 16, 17) STEPS(18, 19, 20, 21, 22, 23)
        a[9] = _mm512_mask_sub_epi32(a[9], m2, a[9], v);
    }
    for (int k = 0; k < 24; k++)
        _mm512_storeu_si512(out + 16 * k, a[k]);
}

int main(int argc, char **argv) {
    int forever = argc > 1 && argv[1][0] == '-';
    int n = argc > 1 + forever ? atoi(argv[1 + forever]) : 1000;
    long rounds = !forever && argc > 2 ? atol(argv[2]) : 1, r = 0;
    int in[384], out[384];
    for (int i = 0; i < 384; i++)
        in[i] = (int)(i * 2654435761u);
    if (forever) {
        signal(SIGUSR1, on_usr1);
        printf("running\n");
        fflush(stdout);
    }
    do {
        sum512(n, in, out);
        memcpy(in, out, sizeof in);
        r++;
    } while (forever ? !stop : r < rounds);
    unsigned long h = 0;
    for (int i = 0; i < 384; i++)
        h = h * 1000003 ^ (unsigned)out[i];
    printf("h=%lu ticks=%lu rounds=%ld\n", h, ticks, r);
    return 0;
}
