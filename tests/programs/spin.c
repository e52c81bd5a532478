/* Four threads call step() in tight loops and fold its results into checksums.
 * Live mode (no arguments): prints "PID STEP_ADDRESS", runs until a line (or EOF) on
 * stdin, then prints the per-thread iteration counts and the checksum.
 * Replay mode (spin replay N0 N1 N2 N3): the same threads run exactly N0..N3
 * iterations, so an untraced replay must print the same line as a traced live run. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((noipa)) uint64_t step(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

struct job {
    uint64_t seed, limit, n, sum;
};

static volatile int stop;
static int replay;

static void *run(void *p)
{
    struct job *j = p;
    uint64_t s = 0, i = 0;
    while (replay ? i < j->limit : !stop) {
        s = s * 31 + step(j->seed + i);
        i++;
    }
    j->n = i;
    j->sum = s;
    return 0;
}

int main(int argc, char **argv)
{
    struct job jobs[4] = {0};
    pthread_t th[4];
    replay = argc == 6;
    for (int k = 0; k < 4; k++) {
        jobs[k].seed = (uint64_t)(k + 1) << 40;
        if (replay)
            jobs[k].limit = strtoull(argv[k + 2], 0, 10);
    }
    if (!replay) {
        printf("%d %p\n", getpid(), (void *)step);
        fflush(stdout);
    }
    for (int k = 0; k < 4; k++)
        pthread_create(&th[k], 0, run, &jobs[k]);
    if (!replay) {
        char buf[64];
        (void)!read(0, buf, sizeof buf);
        stop = 1;
    }
    uint64_t sum = 0;
    for (int k = 0; k < 4; k++) {
        pthread_join(th[k], 0);
        sum = sum * 1000003 + jobs[k].sum;
    }
    printf("n %llu %llu %llu %llu sum %llu\n", (unsigned long long)jobs[0].n,
           (unsigned long long)jobs[1].n, (unsigned long long)jobs[2].n,
           (unsigned long long)jobs[3].n, (unsigned long long)sum);
    return 0;
}
