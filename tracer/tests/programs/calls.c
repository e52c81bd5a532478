/* A target whose calls and arguments are known, for `tracer --trace` (built with -g so
 * that the tracer reads its parameters from DWARF).
 *   calls seq       add, outer (nesting), greet (strings), open and a wild pointer
 *   calls threads   two threads calling add 3 times each, then main calls add once
 *   calls many N    add called N times in a loop
 *   calls fork      add(1, 1), then a child calls add(2, 2), then add(3, 3)
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) int add(int a, int b) { return a + b; }

__attribute__((noinline)) int outer(int n) { return add(n, 1) + add(n, 2); }

__attribute__((noinline)) long scale(long v, double f) { return (long)(v * f); }

__attribute__((noinline)) size_t greet(const char *who, unsigned char times) {
    return strlen(who) * times;
}

static void *worker(void *arg) {
    int base = (int)(long)arg;
    int sum = 0;
    for (int i = 0; i < 3; i++) sum += add(base, i);
    return (void *)(long)sum;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "seq";
    if (!strcmp(mode, "seq")) {
        int r = add(2, 3);
        r += outer(10);
        r += (int)scale(-4, 2.5);
        r += (int)greet("world", 2);
        int fd = open("/nonexistent/tracer-trace-test", O_RDONLY);
        /* A wild pointer: access fails with EFAULT, the trace shows the pointer. */
        int a = access((const char *)0x10, F_OK);
        printf("r=%d fd=%d access=%d\n", r, fd, a);
    } else if (!strcmp(mode, "threads")) {
        pthread_t t[2];
        for (long i = 0; i < 2; i++) pthread_create(&t[i], NULL, worker, (void *)(100 * (i + 1)));
        long total = 0;
        for (int i = 0; i < 2; i++) {
            void *r;
            pthread_join(t[i], &r);
            total += (long)r;
        }
        total += add(7, 8);
        printf("total=%ld\n", total);
    } else if (!strcmp(mode, "fork")) {
        add(1, 1);
        pid_t child = fork();
        if (child == 0) {
            add(2, 2);
            _exit(0);
        }
        waitpid(child, NULL, 0);
        add(3, 3);
        printf("child=%d\n", (int)child);
    } else if (!strcmp(mode, "many")) {
        long n = argc > 2 ? atol(argv[2]) : 1000;
        long sum = 0;
        for (long i = 0; i < n; i++) sum += add((int)i, 1);
        printf("sum=%ld calls=%ld\n", sum, n);
    }
    return 0;
}
