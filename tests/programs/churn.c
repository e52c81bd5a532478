/* Creates threads nonstop: batches of 50 threads, each calling f (which calls g) 200
 * times, one in five ending with pthread_exit, joined before the next batch. Prints a
 * checksum of the threads' results and its own counts of f and g calls at the end.
 * Argument: the number of batches (100). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

static atomic_long n_f, n_g;

__attribute__((noinline)) long g(long i) { n_g++; return i ^ 3; }

__attribute__((noinline)) long f(long i) {
    n_f++;
    long r = g(i);
    asm volatile("");
    return r + 1;
}

static void *body(void *a) {
    long s = 0;
    for (long i = 0; i < 200; i++) s += f(i + (long)a);
    if ((long)a % 5 == 0) pthread_exit((void *)s);
    return (void *)s;
}

int main(int argc, char **argv) {
    int batches = argc > 1 ? atoi(argv[1]) : 100;
    long s = 0;
    for (int b = 0; b < batches; b++) {
        pthread_t t[50];
        for (long i = 0; i < 50; i++) pthread_create(&t[i], 0, body, (void *)i);
        for (int i = 0; i < 50; i++) {
            void *r;
            pthread_join(t[i], &r);
            s += (long)r;
        }
    }
    printf("s=%ld f=%ld g=%ld\n", s, (long)n_f, (long)n_g);
    return 0;
}
