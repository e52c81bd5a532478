// A small C++ program in the style of real ones: std::map, std::ostringstream, std::stoi
// that throws on most of its input (std::invalid_argument, std::out_of_range), a custom
// exception thrown through several frames. Reads words on stdin, prints a summary that
// depends on every call. Used by the real-program suite (bench/real_programs.sh) and its
// CI subset: its output must be the same traced and untraced.
#include <algorithm>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

struct Odd : std::runtime_error {
  int v;
  explicit Odd(int x) : std::runtime_error("odd"), v(x) {}
};

__attribute__((noinline)) static int check(int x) {
  if (x % 7 == 3) throw Odd(x);
  return x;
}

__attribute__((noinline)) static long deep(int x, int depth) {
  if (depth == 0) return check(x);
  return deep(x + 1, depth - 1) + 1;
}

int main() {
  std::map<std::string, long> freq;
  std::map<std::string, int> failures;
  long numbers = 0, sum = 0, odd = 0;
  std::string w;
  while (std::cin >> w) {
    freq[w]++;
    try {
      int v = std::stoi(w);
      numbers++;
      sum += deep(v, v % 5);
    } catch (const Odd &e) {
      odd += e.v;
    } catch (const std::invalid_argument &) {
      failures["invalid"]++;
    } catch (const std::out_of_range &) {
      failures["range"]++;
    }
  }
  std::ostringstream out;
  out << "words " << freq.size() << " numbers " << numbers << " sum " << sum << " odd " << odd
      << '\n';
  for (const auto &f : failures) out << f.first << ' ' << f.second << '\n';
  std::vector<std::pair<long, std::string>> top;
  for (const auto &p : freq) top.emplace_back(-p.second, p.first);
  std::sort(top.begin(), top.end());
  for (size_t i = 0; i < top.size() && i < 10; i++)
    out << top[i].second << ' ' << -top[i].first << '\n';
  std::cout << out.str();
  return failures.empty() ? 1 : 0;
}
