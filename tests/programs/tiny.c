/* `tiny` is 3 bytes (xor eax,eax; ret): too short for a 5-byte jump, so the relocator
 * must refuse it. `good` is an ordinary function. Prints "PID TINY GOOD", then calls
 * both every millisecond until a line (or EOF) arrives on stdin, and prints "ok N". */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

__asm__(".text\n"
        ".globl tiny\n"
        ".type tiny, @function\n"
        "tiny:\n"
        "  xorl %eax, %eax\n"
        "  ret\n"
        ".size tiny, .-tiny\n"
        /* Instruction boundaries at +2 and +5, inside the 5 bytes a patch takes. */
        ".globl twoinsn\n"
        ".type twoinsn, @function\n"
        "twoinsn:\n"
        "  xorl %eax, %eax\n"
        "  addl $1, %eax\n"
        "  addl $2, %eax\n"
        "  ret\n"
        ".size twoinsn, .-twoinsn\n");
int tiny(void);
int twoinsn(void);

__attribute__((noipa)) int good(int x)
{
    return x * 7 + 1;
}

static volatile int stop;
static volatile long total;

static void *loop(void *p)
{
    (void)p;
    while (!stop) {
        total += tiny() + good(1) + twoinsn();
        usleep(1000);
    }
    return 0;
}

int main(void)
{
    pthread_t t;
    printf("%d %p %p\n", getpid(), (void *)tiny, (void *)good);
    fflush(stdout);
    pthread_create(&t, 0, loop, 0);
    char buf[64];
    (void)!read(0, buf, sizeof buf);
    stop = 1;
    pthread_join(t, 0);
    printf("ok %d\n", total > 0);
    return 0;
}
