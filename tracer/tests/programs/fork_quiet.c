/* fork_quiet N K M [wait]: forks K children through spawn(), each calling work() M
 * times and returning from spawn() before _exit (the fork happens inside spawn, so an
 * exit probe on spawn returns in both processes); then the parent calls work() N times
 * and waits for them all, and prints "done".
 * With "wait" it first prints "PID WORK_ADDRESS" and waits for a line on stdin (so that
 * a tracer can attach first), and after "done" waits for another line before exiting. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
volatile long acc;
__attribute__((noipa)) long work(long x)
{
    return x * 3 + 1;
}
__attribute__((noipa)) int spawn(int m)
{
    pid_t p = fork();
    if (p == 0) {
        for (int i = 0; i < m; i++)
            acc += work(i);
    }
    return p;
}
int main(int argc, char **argv)
{
    int n = atoi(argv[1]), k = atoi(argv[2]), m = atoi(argv[3]);
    int wait_lines = argc > 4;
    char line[64];
    if (wait_lines) {
        printf("%d %lx\n", (int)getpid(), (unsigned long)&work);
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin))
            return 1;
    }
    for (int c = 0; c < k; c++)
        if (spawn(m) == 0)
            _exit(0);
    for (int i = 0; i < n; i++)
        acc += work(i);
    while (wait(NULL) > 0) {
    }
    printf("done\n");
    fflush(stdout);
    if (wait_lines && !fgets(line, sizeof line, stdin))
        return 1;
    return 0;
}
