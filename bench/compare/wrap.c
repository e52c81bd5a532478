/* LD_PRELOAD counting wrapper for lib_fn: the floor of any instrumentation, a call and an
 * increment. Built twice by bench/compare.sh: plain `++`, and with -DATOMIC a `lock add`
 * (what an exact multi-thread counter costs; tracer's counters are atomic). The count is
 * printed to stderr at exit. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>

static unsigned long (*real_fn)(unsigned long, unsigned long);
static unsigned long count;

__attribute__((constructor)) static void init(void)
{
    real_fn = (unsigned long (*)(unsigned long, unsigned long))dlsym(RTLD_NEXT, "lib_fn");
}

unsigned long lib_fn(unsigned long a, unsigned long b)
{
#ifdef ATOMIC
    __atomic_fetch_add(&count, 1, __ATOMIC_RELAXED);
#else
    count++;
#endif
    return real_fn(a, b);
}

__attribute__((destructor)) static void fini(void)
{
    fprintf(stderr, "preload_count %lu\n", count);
}
