// A hot loop whose rare branch GCC moves into a separate `.cold` fragment
// (`-O2`, `__builtin_expect` + a cold callee): `sum_checked.cold` is entered and left by
// `jmp`, and at its entry `[rsp]` holds a register the parent saved. Prints a checksum
// and how many times the rare path ran, which the program counts itself.
#include <stdio.h>
#include <stdlib.h>

static long rare_hits;

__attribute__((noinline, cold)) void note_rare(long v) {
  rare_hits++;
  if (v == -123456789) puts("never");
}

__attribute__((noinline)) long mix(long v) { return v ^ (v >> 3); }

__attribute__((noinline)) long sum_checked(const long *a, const long *end) {
  long s = 0;
  for (; a < end; a++) {
    if (__builtin_expect(*a < 0, 0)) {
      note_rare(*a);
      s -= *a;
    } else {
      s += mix(*a);
    }
  }
  return s;
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 5000;
  long *a = malloc(n * sizeof *a);
  for (long i = 0; i < n; i++) a[i] = (i % 97 == 0) ? -i - 1 : i * 7 + 1;
  long total = 0;
  for (long k = 1; k <= 40; k++) total += sum_checked(a, a + n) % 1000003 * k;
  printf("total=%ld rare=%ld\n", total, rare_hits);
  free(a);
  return 0;
}
