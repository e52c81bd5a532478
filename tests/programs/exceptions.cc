#include <cstdio>
#include <stdexcept>
extern "C" __attribute__((noinline)) int thrower(int x) { if (x % 3 == 0) throw std::runtime_error("boom"); return x + 1; }
extern "C" __attribute__((noinline)) int middle(int x) { int r = thrower(x); return r * 2; }
int main() {
  long caught = 0, sum = 0;
  for (int i = 0; i < 3000; i++) {
    try { sum += middle(i); } catch (const std::exception &e) { caught++; }
  }
  printf("caught=%ld sum=%ld\n", caught, sum);
  return 0;
}
