/* Callers that rely on GCC's interprocedural register allocation (-fipa-ra) and stack
 * alignment (-fipa-stack-alignment), built with -O2 as a non-PIE executable so that every
 * function binds locally: `mix`, `small` and `blend` keep values in call-clobbered
 * registers (rdi rsi rdx rcx r8-r11 rax, xmm1-8) across calls to leaves that do not
 * touch them, and `small` and `blend` call them with rsp 16-byte aligned, 8 off what the
 * ABI says. A trampoline that changes any register breaks the results.
 *
 * Usage: ipa_ra N (calls of each function: tick, tock and grow 3N times, the others N). */
#include <stdio.h>
#include <stdlib.h>

/* Leaves that touch no register but the flags and memory: with -fipa-ra their callers
 * keep values in call-clobbered registers across calls to them. */
static unsigned long ticks;
static double scale = 1.0;

__attribute__((noinline)) static void tick(void) { ticks++; }
__attribute__((noinline)) static void tock(void) { ticks += 3; }
__attribute__((noinline)) static void grow(void) { scale *= 1.0000001; }

/* Keeps a..f (and their mixes) in rdi rsi rdx rcx r8 r9 r10 r11 rax across tick/tock;
 * no frame of its own, so the callees are entered with rsp 16-byte aligned, 8 off what
 * the ABI says (-fipa-stack-alignment). */
__attribute__((noinline)) static unsigned long mix(unsigned long a, unsigned long b,
                                                   unsigned long c, unsigned long d,
                                                   unsigned long e, unsigned long f) {
    unsigned long x = a * 3 + f, y = b ^ (c << 1), z = d + e * 7, w = a ^ e;
    tick();
    x += y * 5;
    tock();
    y ^= z + w;
    tick();
    z += x ^ w;
    tock();
    return x * 31 + y * 17 + z * 13 + w + a + b + c + d + e + f;
}

/* Fewer values, no frame: calls tick with rsp 16-byte aligned, 8 off what the ABI says
 * (-fipa-stack-alignment), keeping values in rdi rsi rdx rcx r8 across it. */
__attribute__((noinline)) static unsigned long small(unsigned long a, unsigned long b,
                                                     unsigned long c) {
    unsigned long x = a * 3 + c, y = b ^ (a << 1);
    tick();
    x += y * 5 + c;
    tock();
    return x * 31 + y * 17 + a + b + c;
}

/* Keeps doubles in xmm registers across grow. */
__attribute__((noinline)) static double blend(double p, double q, double r, double s) {
    double u = p * q + r, v = q - s * r, t = p / (s + 1.0);
    grow();
    u += v * t;
    grow();
    v -= u * 0.5;
    grow();
    return u * 3.0 + v * 7.0 + t + p + q + r + s;
}

int main(int argc, char **argv) {
    unsigned long n = argc > 1 ? strtoul(argv[1], 0, 10) : 1000, acc = 0;
    double dacc = 0;
    for (unsigned long i = 0; i < n; i++) {
        acc = acc * 1000003 ^ mix(i, i * 7, acc, i + 11, acc >> 3, i * i);
        acc += small(acc, i, i ^ 5);
        dacc += blend((double)i, (double)(i % 17) + 0.5, dacc * 1e-9, 2.25);
    }
    printf("acc=%lu dacc=%.17g ticks=%lu scale=%.17g calls=%lu\n", acc, dacc,
           ticks, scale, n);
    return 0;
}
