/* Calls malloc exactly N times (argv[1]), prints "mallocs N" with write(2) (no stdio,
 * which would allocate), and with "drain" reads stdin to its end first. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
void *volatile sink;
int main(int argc, char **argv)
{
    int n = atoi(argv[1]);
    if (argc > 2 && strcmp(argv[2], "drain") == 0) {
        char buf[256];
        while (read(0, buf, sizeof buf) > 0) {
        }
    }
    for (int i = 0; i < n; i++) {
        sink = malloc(16 + i);
        free(sink);
    }
    char line[32] = "mallocs ";
    int len = 8, d = 1;
    while (d * 10 <= n) d *= 10;
    for (; d > 0; d /= 10) line[len++] = '0' + n / d % 10;
    line[len++] = '\n';
    (void)!write(1, line, len);
    return 0;
}
