/* Threads that all stay in one state (argv[1]) while tracer attaches:
 *   join     main in pthread_join, workers in pthread_cond_wait (futex)
 *   sigwait  every thread in sigtimedwait
 *   read     every thread in read() on a pipe nobody writes
 *   spin     every thread spinning in its own code
 *   malloc   every thread calling malloc/free nonstop
 *   strlen   every thread calling strlen nonstop
 *   longstr  every thread calling strlen nonstop on a 1 MiB string (almost always inside)
 *   mixed    one thread in each of the above, plus epoll_wait and nanosleep
 *   idle     only the main thread, in a loop of malloc, free, usleep(100)
 *   dliter   every thread in dl_iterate_phdr, whose callback (holding the loader's lock
 *            that dlopen needs) spins a while
 * SIGUSR2 makes the receiving thread call work() CALLS times and print
 * "done <total calls of work so far>", so the program counts its own calls.
 * SIGHUP forks: the child prints "forked <pid>" and waits for signals. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <link.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#define CALLS 1000
#define WORKERS 3

static atomic_long calls;
static atomic_int started;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int never;
static int pipe_fds[2];
static char text[256];

__attribute__((noinline)) void work(void) {
    atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
    __asm__ volatile("" ::: "memory");
}

static void on_usr2(int sig) {
    (void)sig;
    for (int i = 0; i < CALLS; i++) work();
    char buf[32] = "done ";
    long n = atomic_load(&calls);
    char digits[20];
    int k = 0;
    do { digits[k++] = '0' + n % 10; n /= 10; } while (n);
    int len = 5;
    while (k) buf[len++] = digits[--k];
    buf[len++] = '\n';
    (void)!write(1, buf, len);
}

static void on_hup(int sig) {
    (void)sig;
    if (fork() != 0) return;
    char buf[32] = "forked ";
    long n = getpid();
    char digits[20];
    int k = 0;
    do { digits[k++] = '0' + n % 10; n /= 10; } while (n);
    int len = 7;
    while (k) buf[len++] = digits[--k];
    buf[len++] = '\n';
    (void)!write(1, buf, len);
    for (;;) pause();
}

static void in_cond_wait(void) {
    pthread_mutex_lock(&mu);
    while (!never) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
}

static void in_sigtimedwait(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    struct timespec ts = {1, 0};
    for (;;) sigtimedwait(&set, 0, &ts);
}

static void in_read(void) {
    char c;
    for (;;) (void)!read(pipe_fds[0], &c, 1);
}

static void spinning(void) {
    volatile unsigned long x = 1;
    for (;;) x = x * 3 + 1;
}

static void in_malloc(void) {
    for (;;) {
        void *p = malloc(16 + (atomic_load(&calls) & 1023));
        __asm__ volatile("" : : "r"(p) : "memory");
        free(p);
    }
}

static void in_strlen(void) {
    for (;;) {
        size_t n = strlen(text);
        __asm__ volatile("" : : "r"(n) : "memory");
    }
}

static char *long_text;

static void in_long_strlen(void) {
    for (;;) {
        size_t n = strlen(long_text);
        __asm__ volatile("" : : "r"(n) : "memory");
    }
}

static int slow_callback(struct dl_phdr_info *info, size_t size, void *data) {
    (void)info; (void)size; (void)data;
    for (volatile int i = 0; i < 20000; i++) {}
    return 0;
}

static void in_dl_iterate(void) {
    for (;;) dl_iterate_phdr(slow_callback, 0);
}

static void in_epoll(void) {
    int ep = epoll_create1(0);
    struct epoll_event ev;
    for (;;) epoll_wait(ep, &ev, 1, -1);
}

static void idle_loop(void) {
    for (;;) {
        void *p = malloc(32);
        __asm__ volatile("" : : "r"(p) : "memory");
        free(p);
        usleep(100);
    }
}

static void in_nanosleep(void) {
    for (;;) {
        struct timespec ts = {10, 0};
        nanosleep(&ts, 0);
    }
}

static void (*const mixed[])(void) = {in_cond_wait, in_read, in_malloc, in_strlen,
                                       spinning, in_epoll, in_nanosleep};
#define NMIXED (int)(sizeof mixed / sizeof mixed[0])

static void (*state_of(const char *mode))(void) {
    if (!strcmp(mode, "join")) return in_cond_wait;
    if (!strcmp(mode, "sigwait")) return in_sigtimedwait;
    if (!strcmp(mode, "read")) return in_read;
    if (!strcmp(mode, "spin")) return spinning;
    if (!strcmp(mode, "malloc")) return in_malloc;
    if (!strcmp(mode, "strlen")) return in_strlen;
    if (!strcmp(mode, "longstr")) return in_long_strlen;
    if (!strcmp(mode, "dliter")) return in_dl_iterate;
    return 0;
}

static void *worker(void *arg) {
    void (*f)(void) = (void (*)(void))arg;
    atomic_fetch_add(&started, 1);
    f();
    return 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "join";
    memset(text, 'x', sizeof text - 1);
    long_text = malloc((1 << 20) + 1);
    memset(long_text, 'x', 1 << 20);
    long_text[1 << 20] = 0;
    if (pipe(pipe_fds)) return 2;
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &usr1, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr2;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR2, &sa, 0);
    sa.sa_handler = on_hup;
    sigaction(SIGHUP, &sa, 0);

    if (!strcmp(mode, "idle")) {
        printf("ready 1\n");
        fflush(stdout);
        idle_loop();
    }
    int mix = !strcmp(mode, "mixed");
    void (*f)(void) = state_of(mode);
    if (!mix && !f) { fprintf(stderr, "unknown mode %s\n", mode); return 2; }
    int n = mix ? NMIXED : WORKERS;
    pthread_t t[NMIXED];
    for (int i = 0; i < n; i++)
        pthread_create(&t[i], 0, worker, (void *)(mix ? mixed[i] : f));
    while (atomic_load(&started) < n) usleep(1000);
    printf("ready %d\n", n + 1);
    fflush(stdout);
    if (mix) in_sigtimedwait();
    else if (f == in_cond_wait) pthread_join(t[0], 0);
    else f();
    return 0;
}
