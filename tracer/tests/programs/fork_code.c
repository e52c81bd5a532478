/* fork_code: a parent and a forked child that keep calling the same functions, driven
 * line by line from stdin (the child through a pipe), so that tracer sessions in either
 * process see an exact number of calls.
 * Prints "PID" first, then one line per command:
 *   "run N"  -> "sums P C": each process calls a(), b(), c() and d() for i in 0..N and
 *               sums what they return (the child does it after the parent); C is "-"
 *               before the fork, "dead" when the child is gone.
 *   "fork"   -> "child CPID": forks; the child serves "run" from then on.
 *   "stop"   -> "bye": the child exits, the parent waits for it and exits. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
__attribute__((noipa)) long a(long x)
{
    return x * 3 + 1;
}
__attribute__((noipa)) long b(long x)
{
    return (x ^ 0x5555) * 5 + 2;
}
__attribute__((noipa)) long c(long x)
{
    return (x | 0x1234) * 7 - 3;
}
__attribute__((noipa)) long d(long x)
{
    return (x & 0xff) * 11 + 4;
}
static long run(long n)
{
    long s = 0;
    for (long i = 0; i < n; i++)
        s = s * 31 + a(i) + 3 * b(i) + 5 * c(i) + 7 * d(i);
    return s;
}
int main(void)
{
    int to_child = -1, from_child = -1;
    pid_t child = 0;
    char line[64];
    printf("%d\n", (int)getpid());
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "run ", 4)) {
            long n = atol(line + 4);
            long p = run(n);
            char got[32] = "-";
            if (child > 0) {
                dprintf(to_child, "%ld\n", n);
                ssize_t k = read(from_child, got, sizeof got - 1);
                if (k <= 0)
                    strcpy(got, "dead");
                else
                    got[k] = 0;
            }
            printf("sums %ld %s\n", p, got);
        } else if (!strcmp(line, "fork\n")) {
            int down[2], up[2];
            if (pipe(down) || pipe(up))
                return 1;
            child = fork();
            if (child == 0) {
                close(down[1]);
                close(up[0]);
                FILE *in = fdopen(down[0], "r");
                while (fgets(line, sizeof line, in)) {
                    long s = run(atol(line));
                    char out[32];
                    int k = snprintf(out, sizeof out, "%ld", s);
                    if (write(up[1], out, k) != k)
                        _exit(1);
                }
                _exit(0);
            }
            close(down[0]);
            close(up[1]);
            to_child = down[1];
            from_child = up[0];
            printf("child %d\n", (int)child);
        } else if (!strcmp(line, "stop\n")) {
            int st = 0;
            if (child > 0) {
                close(to_child);
                waitpid(child, &st, 0);
            }
            printf("bye %d\n", st);
            fflush(stdout);
            return 0;
        }
        fflush(stdout);
    }
    return 1;
}
