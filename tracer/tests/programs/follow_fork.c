/* Forks N children (argv[1]) through spawn(); each child calls work() K times
 * (argv[2]) and returns from spawn() before _exit; the parent calls work() P times
 * (argv[3]) and waits for them all. */
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
volatile long acc;
__attribute__((noipa)) long work(long x)
{
    return x * 3 + 1;
}
__attribute__((noipa)) int spawn(int k)
{
    pid_t p = fork();
    if (p == 0) {
        for (int i = 0; i < k; i++)
            acc += work(i);
    }
    return p;
}
int main(int argc, char **argv)
{
    int n = atoi(argv[1]), k = atoi(argv[2]), p = atoi(argv[3]);
    for (int c = 0; c < n; c++)
        if (spawn(k) == 0)
            _exit(0);
    for (int i = 0; i < p; i++)
        acc += work(i);
    while (wait(NULL) > 0) {
    }
    return 0;
}
