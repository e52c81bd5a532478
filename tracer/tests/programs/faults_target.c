/* The fault injection test's target: `faults_target N [wait]`.
 * Prints "ready". Then N rounds of malloc(100) and open("/dev/null"), counting the calls
 * that failed and, among them, those whose errno says what the C library's contract says
 * (ENOMEM for malloc, ENOENT for the open the faults pack redirects); checks that no
 * descriptor leaked (the lowest free one is the same after the rounds). With "wait",
 * does that once per line "go" on stdin, and exits 0 at "stop". */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int lowest_free_fd(void)
{
    int fd = dup(0);
    close(fd);
    return fd;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    unsigned long n = strtoul(argv[1], 0, 10);
    int wait = argc > 2;
    char line[64];
    printf("ready\n");
    fflush(stdout);
    void **blocks = calloc(n + 1, sizeof *blocks);
    for (;;) {
        if (wait && (!fgets(line, sizeof line, stdin) || line[0] != 'g'))
            return 0;
        unsigned long mfail = 0, enomem = 0, ofail = 0, enoent = 0;
        int low = lowest_free_fd();
        for (unsigned long i = 0; i < n; i++) {
            errno = 0;
            blocks[i] = malloc(100);
            if (!blocks[i]) {
                mfail++;
                enomem += errno == ENOMEM;
            }
            errno = 0;
            int fd = open("/dev/null", O_RDONLY);
            if (fd < 0) {
                ofail++;
                enoent += errno == ENOENT;
            } else {
                close(fd);
            }
        }
        for (unsigned long i = 0; i < n; i++)
            free(blocks[i]);
        printf("rounds=%lu malloc_failures=%lu enomem=%lu open_failures=%lu enoent=%lu "
               "leaked_fd=%d\n",
               n, mfail, enomem, ofail, enoent, lowest_free_fd() != low);
        fflush(stdout);
        if (!wait)
            return 0;
    }
}
