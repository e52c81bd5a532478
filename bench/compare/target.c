/* Target of bench/compare.sh. Calls one tiny function (lib_fn in libtiny.so, or exe_fn in
 * this PIE executable) N times in a dependent loop, times the loop itself and prints
 *   result which=W calls=N ns_per_call=X best_chunk_ns=B main_ns=T0 live_ns=T1 sum=S
 * calls is the program's own count of calls to the function, to compare with a tool's.
 * main_ns is CLOCK_REALTIME at main's start; live_ns is when the function's first bytes
 * were first seen changed (a jump patch or an int3: the probe is live), 0 if never.
 *
 * Usage: target lib|exe N [wait] [hold] [threads=T]
 *   wait: print "ready PID" and poll the function's first 8 bytes every 50 us, without
 *         calling it, until they change (a tool attached); then start the loop.
 *   hold: after the result line, read stdin until EOF before exiting, so a tool can read
 *         its count while the process still exists.
 *   threads=T: the N calls split over T threads running at once; ns_per_call is then CPU
 *         time per call (see threaded_loops) and best_chunk_ns repeats it. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define CHUNKS 50
#define MAX_THREADS 64

unsigned long lib_fn(unsigned long a, unsigned long b);

__attribute__((noinline, noipa)) unsigned long exe_fn(unsigned long a, unsigned long b)
{
    return ((a + a) ^ b) + 7;
}

static long long now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int changed(const volatile unsigned char *code, const unsigned char *orig)
{
    for (int i = 0; i < 8; i++)
        if (code[i] != orig[i])
            return 1;
    return 0;
}

/* Calls fn for i in [from, to) in a dependent chain, in CHUNKS equal parts, each timed:
 * on a shared machine a part that was preempted or shared its core shows up slow, and
 * the fastest part (*best, ns per call) is the cost of a call undisturbed. */
static unsigned long timed_loop(unsigned long (*fn)(unsigned long, unsigned long), long from,
                                long to, double *best)
{
    unsigned long x = 1;
    long n = to - from, per = n / CHUNKS > 0 ? n / CHUNKS : 1, done = from;
    *best = 0;
    while (done < to) {
        long end = to - done < 2 * per ? to : done + per;
        long long c0 = now_ns(CLOCK_MONOTONIC);
        for (long i = done; i < end; i++)
            x = fn(x, (unsigned long)i);
        double ns = (double)(now_ns(CLOCK_MONOTONIC) - c0) / (double)(end - done);
        if (done == from || ns < *best)
            *best = ns;
        done = end;
    }
    return x;
}

struct part {
    unsigned long (*fn)(unsigned long, unsigned long);
    long from, to;
    unsigned long x;
    double best;
};

static void *run_part(void *p)
{
    struct part *part = p;
    part->x = timed_loop(part->fn, part->from, part->to, &part->best);
    return 0;
}

/* n calls split over `threads` threads at once. *per_call is CPU time per call: the wall
 * time of the whole phase times the CPUs the threads can occupy, over n (what one call
 * costs when every CPU is busy calling; contention on a shared counter shows here). */
static unsigned long threaded_loops(unsigned long (*fn)(unsigned long, unsigned long), long n,
                                    int threads, double *per_call)
{
    struct part parts[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    long long t0 = now_ns(CLOCK_MONOTONIC);
    for (int t = 0; t < threads; t++) {
        parts[t] = (struct part){fn, n * t / threads, n * (t + 1) / threads, 0, 0};
        pthread_create(&tids[t], 0, run_part, &parts[t]);
    }
    unsigned long x = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(tids[t], 0);
        x ^= parts[t].x;
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    long busy = threads < cpus ? threads : cpus;
    *per_call = n ? (double)(now_ns(CLOCK_MONOTONIC) - t0) * (double)busy / (double)n : 0.0;
    return x;
}

int main(int argc, char **argv)
{
    long long main_ns = now_ns(CLOCK_REALTIME);
    if (argc < 3 || (strcmp(argv[1], "lib") && strcmp(argv[1], "exe"))) {
        fprintf(stderr, "usage: %s lib|exe N [wait] [hold] [threads=T]\n", argv[0]);
        return 2;
    }
    int wait = 0, hold = 0, threads = 1;
    for (int i = 3; i < argc; i++) {
        wait |= !strcmp(argv[i], "wait");
        hold |= !strcmp(argv[i], "hold");
        if (!strncmp(argv[i], "threads=", 8))
            threads = atoi(argv[i] + 8);
    }
    if (threads < 1 || threads > MAX_THREADS) {
        fprintf(stderr, "threads=T: T from 1 to %d\n", MAX_THREADS);
        return 2;
    }
    unsigned long (*volatile fnp)(unsigned long, unsigned long) =
        strcmp(argv[1], "lib") ? exe_fn : lib_fn;
    unsigned long (*fn)(unsigned long, unsigned long) = fnp;
    long n = atol(argv[2]);
    /* What the function's bytes were before any tool: a tool started before main
     * (tracer run, uftrace) has already changed them, so take them from the twin
     * function, which no tool touches and which is compiled from the same expression to
     * the same 11 bytes (an untraced run reports live_ns=0, which the script checks). */
    const volatile unsigned char *code = (const volatile unsigned char *)fn;
    unsigned char orig[8];
    memcpy(orig, (const void *)(fn == exe_fn ? (void *)lib_fn : (void *)exe_fn), 8);
    long long live_ns = changed(code, orig) ? main_ns : 0;

    if (wait) {
        printf("ready %d %p\n", getpid(), (void *)fn);
        fflush(stdout);
        struct timespec nap = {0, 50000};
        while (!changed(code, orig))
            nanosleep(&nap, 0);
        live_ns = now_ns(CLOCK_REALTIME);
        /* A tool may still be finishing (Frida patches while the target runs): settle
         * before the first call. Not part of any figure. */
        struct timespec settle = {0, 20000000};
        nanosleep(&settle, 0);
    }

    double best, per_call;
    unsigned long x;
    if (threads == 1) {
        long long t0 = now_ns(CLOCK_MONOTONIC);
        x = timed_loop(fn, 0, n, &best);
        per_call = n ? (double)(now_ns(CLOCK_MONOTONIC) - t0) / n : 0.0;
    } else {
        x = threaded_loops(fn, n, threads, &per_call);
        best = per_call;
    }
    printf("result which=%s calls=%ld ns_per_call=%.3f best_chunk_ns=%.3f main_ns=%lld "
           "live_ns=%lld sum=%lu\n",
           argv[1], n, per_call, best, main_ns, live_ns, x);
    fflush(stdout);
    if (hold) {
        char buf[256];
        while (read(0, buf, sizeof buf) > 0)
            ;
    }
    return 0;
}
