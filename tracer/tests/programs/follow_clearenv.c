/* Clears its environment, then execs argv[1] with the rest of the arguments. */
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv)
{
    (void)argc;
    clearenv();
    execv(argv[1], argv + 1);
    return 127;
}
