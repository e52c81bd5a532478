/* The hot swap test's target: prints "ready"; at "go" starts 4 threads calling hot() in
 * a loop and prints "running"; at "stop" the threads make 1000 more calls each and end;
 * prints the calls they made in all ("total=N") and exits 0. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>

static atomic_int stop;

__attribute__((noipa)) unsigned long hot(unsigned long i)
{
    return (i * 2654435761u) ^ (i >> 3);
}

static void *worker(void *arg)
{
    unsigned long n = 0, sum = 0;
    while (!atomic_load_explicit(&stop, memory_order_relaxed))
        sum += hot(n++);
    for (int i = 0; i < 1000; i++)
        sum += hot(n++);
    *(unsigned long *)arg = n;
    return (void *)sum;
}

int main(void)
{
    char line[64];
    pthread_t t[4];
    unsigned long calls[4];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 2;
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], 0, worker, &calls[i]);
    printf("running\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 2;
    atomic_store(&stop, 1);
    unsigned long total = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], 0);
        total += calls[i];
    }
    printf("total=%lu\n", total);
    fflush(stdout);
    return 0;
}
