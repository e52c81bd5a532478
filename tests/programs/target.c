/* Calls libtarget's work() argv[1] times, prints its own call counter and the result,
 * then exits with status 3, or dies of SIGUSR1 when a second argument is given.
 * `mainfn` is a function of the (PIE) executable itself, called argv[1] / 2 times. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

unsigned long work(unsigned long);

__attribute__((noipa)) unsigned long mainfn(unsigned long x)
{
    return (x << 7) ^ (x >> 3) ^ 0x5bd1e995u;
}

int main(int argc, char **argv)
{
    unsigned long n = argc > 1 ? strtoul(argv[1], 0, 10) : 1000;
    unsigned long calls = 0, main_calls = 0, r = 0;
    for (unsigned long i = 0; i < n; i++) {
        r ^= work(i);
        calls++;
        if (i % 2 == 0) {
            r += mainfn(i);
            main_calls++;
        }
    }
    printf("calls=%lu main_calls=%lu result=%lu\n", calls, main_calls, r);
    fflush(stdout);
    if (argc > 2)
        raise(SIGUSR1);
    return 3;
}
