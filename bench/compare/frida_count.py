"""Frida row of bench/compare.sh: attach to PID, count calls of the function at ADDR with
Interceptor.attach and a CModule onEnter (native code, no JavaScript per hit), print
"attached", then on a line on stdin print "hits N" and detach.
Usage: python3 frida_count.py PID ADDR"""
import sys

import frida

SOURCE = """
const hits = Memory.alloc(8);
hits.writeU64(0);
const cm = new CModule(`
#include <gum/guminterceptor.h>
extern volatile guint64 hits;
void onEnter(GumInvocationContext *ic) { hits++; }
`, { hits });
Interceptor.attach(ptr('%s'), cm);
rpc.exports = { hits: () => hits.readU64().toString() };
"""


def main():
    pid, addr = int(sys.argv[1]), sys.argv[2]
    session = frida.attach(pid)
    script = session.create_script(SOURCE % addr)
    script.load()
    print("attached", flush=True)
    sys.stdin.readline()
    exports = getattr(script, "exports_sync", None) or script.exports
    print("hits", exports.hits(), flush=True)
    session.detach()


if __name__ == "__main__":
    main()
