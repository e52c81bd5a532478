/* Calls two functions of known, very different durations a known number of times, from
 * THREADS threads, and says what it did:
 *
 *   latency THREADS SLOW FAST SLOW_US [wait]
 *
 * Each thread calls slow_call() SLOW times (each sleeps SLOW_US microseconds, at least,
 * and is followed by as long an untimed sleep) and fast_call() FAST times (a short spin).
 * First line: "PID SLOW_CALL_ADDRESS"; with "wait", it then waits for a line on stdin before calling
 * anything, and for another before exiting. Last line:
 * "slow=N fast=M elapsed_ns=E", E the sum over threads of the time from before each
 * thread's first call to after its last (monotonic clock): every timed call lies inside.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long slow_us;

static void sleep_us(long us)
{
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    while (nanosleep(&ts, &ts) != 0) {
    }
}

__attribute__((noipa)) void slow_call(void)
{
    sleep_us(slow_us);
}

__attribute__((noipa)) uint64_t fast_call(uint64_t x)
{
    for (int i = 0; i < 64; i++)
        x = x * 6364136223846793005ull + 1442695040888963407ull;
    return x;
}

struct job {
    long slow, fast;
    long slow_done, fast_done;
    uint64_t elapsed_ns, acc;
};

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}

static void *run(void *p)
{
    struct job *j = p;
    uint64_t t0 = now_ns();
    for (long i = 0; i < j->slow; i++) {
        slow_call();
        j->slow_done++;
        sleep_us(slow_us);
    }
    for (long i = 0; i < j->fast; i++) {
        j->acc = fast_call(j->acc + i);
        j->fast_done++;
    }
    j->elapsed_ns = now_ns() - t0;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: latency THREADS SLOW FAST SLOW_US [wait]\n");
        return 2;
    }
    int threads = atoi(argv[1]);
    long slow = atol(argv[2]), fast = atol(argv[3]);
    int wait = argc > 5 && strcmp(argv[5], "wait") == 0;
    char buf[64];
    slow_us = atol(argv[4]);
    if (threads < 1 || threads > 64)
        return 2;
    printf("%d %p\n", getpid(), (void *)slow_call);
    fflush(stdout);
    if (wait)
        (void)!read(0, buf, sizeof buf);
    struct job jobs[64];
    pthread_t th[64];
    memset(jobs, 0, sizeof jobs);
    for (int k = 0; k < threads; k++) {
        jobs[k].slow = slow;
        jobs[k].fast = fast;
        pthread_create(&th[k], 0, run, &jobs[k]);
    }
    long s = 0, f = 0;
    uint64_t e = 0;
    for (int k = 0; k < threads; k++) {
        pthread_join(th[k], 0);
        s += jobs[k].slow_done;
        f += jobs[k].fast_done;
        e += jobs[k].elapsed_ns;
    }
    printf("slow=%ld fast=%ld elapsed_ns=%llu\n", s, f, (unsigned long long)e);
    fflush(stdout);
    if (wait)
        (void)!read(0, buf, sizeof buf);
    return 0;
}
