// C++ names for the demangling tests: a namespace, a class with overloads, a function
// template with two instantiations. Each function counts its own calls, printed at the
// end, so the tests compare tracer's hits with the program's own counts.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace ns {
static unsigned long parse_str_calls, parse_int_calls, twice_int_calls, twice_double_calls;

class Parser {
public:
    __attribute__((noinline)) long parse(const char *s) {
        parse_str_calls++;
        total_ += (long)strlen(s) * 3 + 1;
        return total_;
    }
    __attribute__((noinline)) long parse(int v) {
        parse_int_calls++;
        total_ += v * 7 + 2;
        return total_;
    }
    long total_ = 0;
};

template <typename T> __attribute__((noinline)) T twice(T v) {
    if (sizeof(T) == sizeof(int)) twice_int_calls++; else twice_double_calls++;
    return v + v;
}
} // namespace ns

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 100;
    ns::Parser p;
    std::vector<int> v;
    double d = 0;
    for (int i = 0; i < n; i++) {
        p.parse("word");
        if (i % 3 == 0) p.parse(i);
        v.push_back(ns::twice(i));
        if (i % 4 == 0) d += ns::twice(0.5 * i);
    }
    printf("parse_str=%lu parse_int=%lu twice_int=%lu twice_double=%lu total=%ld size=%zu d=%g\n",
           ns::parse_str_calls, ns::parse_int_calls, ns::twice_int_calls,
           ns::twice_double_calls, p.total_, v.size(), d);
    return 0;
}
