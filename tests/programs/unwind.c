// The unwinder's other entry points: glibc's backtrace() walks with
// _Unwind_Backtrace, and pthread_exit unwinds the thread's stack with
// _Unwind_ForcedUnwind (running cleanup handlers on the way). Prints how many frames
// backtrace() saw and how many cleanup handlers ran.
#include <execinfo.h>
#include <pthread.h>
#include <stdio.h>

static int cleanups;

static void on_cleanup(void *arg) { cleanups += *(int *)arg; }

__attribute__((noinline)) static int depth(int n) {
  if (n == 0) {
    void *frames[64];
    return backtrace(frames, 64);
  }
  return depth(n - 1) + 0 * n;
}

__attribute__((noinline)) static void leave(int n) {
  int one = 1;
  pthread_cleanup_push(on_cleanup, &one);
  if (n == 0) pthread_exit(0);
  leave(n - 1);
  pthread_cleanup_pop(0);
}

static void *thread_main(void *arg) {
  leave(*(int *)arg);
  return 0;
}

int main(void) {
  int frames = depth(5);
  for (int i = 0; i < 3; i++) {
    pthread_t t;
    int n = 4;
    pthread_create(&t, 0, thread_main, &n);
    pthread_join(t, 0);
  }
  printf("frames=%d cleanups=%d\n", frames, cleanups);
  return 0;
}
