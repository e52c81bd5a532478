/* Stress target: 8 threads call two probed functions of this (PIE) executable nonstop.
 * `hammer` is called whenever the window is closed, `in_window` only while it is open;
 * both compute the same value, so the per-thread checksum does not depend on which one
 * ran. Each thread counts its own calls with atomics.
 *
 * Commands on stdin, one per line, answered on stdout:
 *   (start)  -> "ready PID &hammer &in_window"
 *   on       -> opens the window; "on"
 *   off      -> closes it, waits until every thread has finished any call it began while
 *               it was open, then "off N": the number of in_window calls since the last
 *               "off" (exact: nothing calls in_window while the window is closed)
 *   stop     -> the threads stop; "done n0 c0 n1 c1 ...": iterations and checksum per thread
 * `stress check T N` prints the checksum thread T has after N iterations, computed
 * without threads: the untraced reference. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define THREADS 8

__attribute__((noipa)) unsigned long hammer(unsigned long t, unsigned long i)
{
    unsigned long x = (t << 40) ^ i;
    x ^= x >> 17;
    x *= 0x9e3779b97f4a7c15ul;
    return x ^ (x >> 29);
}

__attribute__((noipa)) unsigned long in_window(unsigned long t, unsigned long i)
{
    unsigned long x = (t << 40) ^ i;
    x ^= x >> 17;
    x *= 0x9e3779b97f4a7c15ul;
    return x ^ (x >> 29);
}

static atomic_int window_open;
static atomic_int stop;
static atomic_ulong epoch;

struct worker {
    pthread_t th;
    unsigned long t;
    atomic_ulong window_calls;
    atomic_ulong seen_epoch;
    unsigned long iterations, checksum;
    char pad[64];
};
static struct worker workers[THREADS];

static void *run(void *arg)
{
    struct worker *w = arg;
    unsigned long i = 0, sum = 0;
    while (!atomic_load(&stop)) {
        unsigned long e = atomic_load(&epoch);
        if (atomic_load(&window_open)) {
            sum += in_window(w->t, i);
            atomic_fetch_add_explicit(&w->window_calls, 1, memory_order_relaxed);
        } else {
            sum += hammer(w->t, i);
        }
        i++;
        /* Published after the call: once the main thread sees the epoch it bumped after
         * closing the window, this thread's calls inside the window are all finished. */
        atomic_store(&w->seen_epoch, e);
    }
    w->iterations = i;
    w->checksum = sum;
    return 0;
}

static unsigned long window_total(void)
{
    unsigned long n = 0;
    for (int k = 0; k < THREADS; k++)
        n += atomic_load(&workers[k].window_calls);
    return n;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "check")) {
        unsigned long t = strtoul(argv[2], 0, 10), n = strtoul(argv[3], 0, 10), sum = 0;
        for (unsigned long i = 0; i < n; i++)
            sum += hammer(t, i);
        printf("%lu\n", sum);
        return 0;
    }
    for (int k = 0; k < THREADS; k++) {
        workers[k].t = k;
        pthread_create(&workers[k].th, 0, run, &workers[k]);
    }
    printf("ready %d %p %p\n", getpid(), (void *)hammer, (void *)in_window);
    fflush(stdout);
    char line[64];
    unsigned long reported = 0;
    while (fgets(line, sizeof line, stdin)) {
        if (!strcmp(line, "on\n")) {
            atomic_store(&window_open, 1);
            printf("on\n");
        } else if (!strcmp(line, "off\n")) {
            atomic_store(&window_open, 0);
            unsigned long e = atomic_fetch_add(&epoch, 1) + 1;
            for (int k = 0; k < THREADS; k++)
                while (atomic_load(&workers[k].seen_epoch) != e)
                    usleep(50);
            unsigned long total = window_total();
            printf("off %lu\n", total - reported);
            reported = total;
        } else if (!strcmp(line, "stop\n")) {
            break;
        }
        fflush(stdout);
    }
    atomic_store(&stop, 1);
    printf("done");
    for (int k = 0; k < THREADS; k++) {
        pthread_join(workers[k].th, 0);
        printf(" %lu %lu", workers[k].iterations, workers[k].checksum);
    }
    printf("\n");
    return 0;
}
