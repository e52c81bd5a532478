/* The pack tests' target: `pack_target N K T B [wait]`.
 * Prints "ready". Then: N mallocs of 12345 bytes (counting those that return NULL), K
 * callocs of 3 x 7 bytes, T calls of tick(), B calls of boom(); prints what it did and
 * frees. With "wait", does that once per line "go" on stdin, and exits 0 at "stop". */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noipa)) unsigned long tick(unsigned long i)
{
    return i * 2654435761u ^ (i >> 5);
}

__attribute__((noipa)) unsigned long boom(unsigned long i)
{
    return (i << 3) ^ 0x9e3779b9u ^ (i >> 7);
}

int main(int argc, char **argv)
{
    if (argc < 5)
        return 2;
    unsigned long n = strtoul(argv[1], 0, 10), k = strtoul(argv[2], 0, 10);
    unsigned long t = strtoul(argv[3], 0, 10), b = strtoul(argv[4], 0, 10);
    int wait = argc > 5;
    char line[64];
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        if (wait && (!fgets(line, sizeof line, stdin) || line[0] != 'g'))
            return 0;
        void **blocks = calloc(n + k + 1, sizeof *blocks);
        unsigned long failures = 0, sum = 0;
        for (unsigned long i = 0; i < n; i++) {
            blocks[i] = malloc(12345);
            failures += blocks[i] == NULL;
        }
        for (unsigned long i = 0; i < k; i++)
            blocks[n + i] = calloc(3, 7);
        for (unsigned long i = 0; i < t; i++)
            sum += tick(i);
        for (unsigned long i = 0; i < b; i++)
            sum += boom(i);
        printf("mallocs=%lu failures=%lu callocs=%lu ticks=%lu booms=%lu sum=%lu\n", n, failures,
               k, t, b, sum);
        fflush(stdout);
        for (unsigned long i = 0; i < n + k; i++)
            free(blocks[i]);
        free(blocks);
        if (!wait)
            return 0;
    }
}
