/* A program with an interval timer: counts the SIGALRMs it receives while it works.
 *
 *   ticker HZ until N [wait]      call work() until N SIGALRMs have arrived (later ones
 *                                 are not counted)
 *   ticker HZ bench ROUNDS [wait] ROUNDS rounds of fixed work: work() and one
 *                                 malloc/free each
 *
 * then print "alarms=A calls=C ns=T cpu=U queued=Q result=R": A SIGALRMs counted, C
 * calls of work(), T the wall time of the work alone in ns, U the CPU time it took, Q
 * the time it spent runnable waiting for a CPU (from /proc/self/schedstat; 0 if absent):
 * T - Q is its time on a CPU or held stopped, whatever else the machine runs. HZ 0: no timer. With "wait": first print
 * "ready PID WORKADDR" and wait for a line on stdin before starting the timer, and wait
 * for another line before exiting (or, when that line is "exec PATH", exec PATH 0 bench
 * 1 wait). Exits 0. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t alarms;
static volatile sig_atomic_t limit = 0x7fffffff;
void *volatile sink;

/* Time spent waiting on a run queue, in ns (second field of /proc/self/schedstat). */
static long long queued_ns(void)
{
    long long run = 0, wait = 0;
    FILE *f = fopen("/proc/self/schedstat", "r");
    if (f) {
        if (fscanf(f, "%lld %lld", &run, &wait) != 2)
            wait = 0;
        fclose(f);
    }
    return wait;
}

static void on_alarm(int s)
{
    (void)s;
    if (alarms < limit)
        alarms++;
}

/* About a microsecond of arithmetic: most signals land in the middle of it. */
__attribute__((noipa)) unsigned long work(unsigned long x)
{
    for (int i = 0; i < 800; i++)
        x = x * 6364136223846793005ul + 1442695040888963407ul;
    return x;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: ticker HZ until|bench N [wait]\n");
        return 2;
    }
    long hz = strtol(argv[1], 0, 10);
    int bench = strcmp(argv[2], "bench") == 0;
    unsigned long n = strtoul(argv[3], 0, 10);
    int wait = argc > 4 && strcmp(argv[4], "wait") == 0;
    char line[4096];

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, 0);
    if (wait) {
        printf("ready %d %p\n", (int)getpid(), (void *)work);
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin))
            return 1;
    }
    if (!bench)
        limit = (sig_atomic_t)n;
    if (hz > 0) {
        struct itimerval it = {{0, 1000000 / hz}, {0, 1000000 / hz}};
        setitimer(ITIMER_REAL, &it, 0);
    }
    struct timespec t0, t1, c0, c1;
    long long q0 = queued_ns();
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    unsigned long calls = 0, r = 0;
    if (bench) {
        for (; calls < n; calls++) {
            r ^= work(calls);
            void *p = malloc(64);
            sink = p;
            free(p);
        }
    } else {
        while (alarms < limit) {
            r ^= work(calls);
            calls++;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
    long long queued = queued_ns() - q0;
    struct itimerval off;
    memset(&off, 0, sizeof off);
    setitimer(ITIMER_REAL, &off, 0);
    long long ns = (t1.tv_sec - t0.tv_sec) * 1000000000ll + (t1.tv_nsec - t0.tv_nsec);
    long long cpu = (c1.tv_sec - c0.tv_sec) * 1000000000ll + (c1.tv_nsec - c0.tv_nsec);
    printf("alarms=%d calls=%lu ns=%lld cpu=%lld queued=%lld result=%lu\n", (int)alarms, calls,
           ns, cpu, queued, r);
    fflush(stdout);
    if (wait && !fgets(line, sizeof line, stdin))
        return 1;
    if (wait && strncmp(line, "exec ", 5) == 0) {
        /* Become another program: "exec PATH" runs PATH 0 bench 1 wait. */
        line[strcspn(line, "\n")] = 0;
        execl(line + 5, line + 5, "0", "bench", "1", "wait", (char *)0);
        return 127;
    }
    return 0;
}
