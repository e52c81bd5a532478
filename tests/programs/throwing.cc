// A small C++ program that throws a lot: std::map, std::ostringstream, and std::stoi
// throwing std::invalid_argument / std::out_of_range on bad input. Prints a checksum.
#include <cstdio>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>

static std::string make_token(int i) {
  std::ostringstream os;
  if (i % 7 == 0)
    os << "x" << i;               // not a number: invalid_argument
  else if (i % 11 == 0)
    os << "99999999999999" << i;  // too big: out_of_range
  else
    os << i * 3;
  return os.str();
}

int main(int argc, char **argv) {
  int n = argc > 1 ? std::stoi(argv[1]) : 20000;
  std::map<std::string, long> counts;
  long sum = 0, invalid = 0, range = 0;
  for (int i = 0; i < n; i++) {
    std::string t = make_token(i);
    try {
      int v = std::stoi(t);
      sum += v;
      counts[t.substr(0, 2)] += v;
    } catch (const std::invalid_argument &) {
      invalid++;
    } catch (const std::out_of_range &) {
      range++;
    }
  }
  std::ostringstream out;
  out << "sum=" << sum << " invalid=" << invalid << " range=" << range
      << " keys=" << counts.size();
  for (const auto &kv : counts)
    if (kv.first[0] == '1') out << " " << kv.first << ":" << kv.second;
  std::puts(out.str().c_str());
  return 0;
}
