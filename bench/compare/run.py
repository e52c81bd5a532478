"""Driver of bench/compare.sh: runs every row of the comparison several times, rounds
interleaved, and prints one Markdown table. See bench/compare.md for the method.

Every row runs the same target (bench/compare/target.c), which times its own loop and
counts its own calls; a tool's count is compared with the program's. Attach time is
measured the same way for every tool that probes a running process: the target, started
first, polls its function's first bytes; the driver takes the clock just before starting
the tool; the target takes it when it first sees the bytes changed (a jump patch or an
int3), i.e. when the probe is live.
"""
import argparse
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

TRACEFS = "/sys/kernel/tracing"
TIMEOUT = 60  # seconds any one step may take before the row is marked failed


class RowFailed(Exception):
    pass


class Lines:
    """A child's stdout read line by line on a thread, so waits can time out."""

    def __init__(self, stream):
        self.q = queue.Queue()
        self.all = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self.q.put(line)
        self.q.put(None)

    def expect(self, prefix, what, abort=None):
        """The next line starting with prefix; abort() may name a reason to stop waiting."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self.q.get(timeout=0.1)
            except queue.Empty:
                why = abort() if abort else None
                if why:
                    raise RowFailed(why)
                if time.monotonic() > deadline:
                    raise RowFailed(f"no '{prefix}' line from {what} in {TIMEOUT} s")
                continue
            if line is None:
                raise RowFailed(f"{what} ended without a '{prefix}' line: {''.join(self.all)[-300:]}")
            self.all.append(line)
            if line.startswith(prefix):
                return line.split()


def parse_result(words):
    fields = dict(w.split("=", 1) for w in words[1:])
    return {
        "calls": int(fields["calls"]),
        "ns": float(fields["best_chunk_ns"]),
        "whole_ns": float(fields["ns_per_call"]),
        "main_ns": int(fields["main_ns"]),
        "live_ns": int(fields["live_ns"]),
    }


def target_cmd(ctx, which, n, *extra):
    """which is "lib" or "exe", optionally followed by the target's options ("lib threads=4")."""
    fn, *opts = which.split()
    return [ctx.target, fn, str(n), *opts, *extra]


def spawn(cmd, **kw):
    return subprocess.Popen(cmd, text=True, **kw)


def finish(proc, what, sig=None):
    """Waits for a child (after sending it sig, if given); kills it on timeout."""
    if proc.poll() is None and sig is not None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RowFailed(f"{what} did not exit within {TIMEOUT} s")


class Waiting:
    """The target started in wait+hold mode: it runs its loop once a tool has patched
    its function, prints its result, and exits when its stdin closes."""

    def __init__(self, ctx, which, n):
        self.proc = spawn(target_cmd(ctx, which, n, "wait", "hold"),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.out = Lines(self.proc.stdout)
        words = self.out.expect("ready", "target")
        self.pid, self.addr = int(words[1]), words[2]

    def result(self, tool=None):
        def tool_died():
            # Every attaching tool stays until the target exits or is told to stop.
            if not isinstance(tool, subprocess.Popen) or tool.poll() is None:
                return None
            name = os.path.basename(getattr(tool, "label", tool.args[0]))
            said = "".join(tool.lines.all) if hasattr(tool, "lines") else ""
            if hasattr(tool, "errfile"):
                said = open(tool.errfile).read()
            lines = [l for l in said.splitlines() if re.search("[A-Za-z]", l)]
            words = [l for l in lines if re.search("error", l, re.I)] or lines
            return (f"{name} exited with status {tool.returncode} before the target's loop ended"
                    + (f": {words[-1].strip()}" if words else ""))

        return parse_result(self.out.expect("result", "target", tool_died))

    def release(self):
        self.proc.stdin.close()
        finish(self.proc, "target")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def attach_row(ctx, which, n, start_tool, read_count):
    """Target waiting; t0; start the tool; the target stamps when the probe is live."""
    target = Waiting(ctx, which, n)
    tool = None
    try:
        t0 = time.time_ns()
        tool = start_tool(target)
        res = target.result(tool)
        count = read_count(tool, target)
        return res, count, (res["live_ns"] - t0) / 1e6
    finally:
        target.kill()
        if isinstance(tool, subprocess.Popen) and tool.poll() is None:
            tool.kill()
            tool.wait()


def launch_row(ctx, cmd, env=None, **kw):
    """The tool starts the target; attach time is start of the tool to main with the
    probe already live (main_ns when the function's bytes were changed at main)."""
    t0 = time.time_ns()
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kw)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RowFailed(f"{cmd[0]} did not finish within {TIMEOUT} s")
    m = re.search(r"^result .*$", out, re.M)
    if proc.returncode != 0 or not m:
        raise RowFailed(f"{cmd[0]} exited {proc.returncode}: {(err or out).strip()[-300:]}")
    res = parse_result(m.group(0).split())
    return res, out, err, t0


# ---------------------------------------------------------------- rows


def row_baseline(ctx, which, n):
    res, _, _, t0 = launch_row(ctx, target_cmd(ctx, which, n))
    if res["live_ns"]:
        raise RowFailed("lib_fn and exe_fn do not start with the same bytes: rebuild")
    return res, None, (res["main_ns"] - t0) / 1e6


def row_preload(ctx, which, n, lib):
    env = dict(os.environ, LD_PRELOAD=lib)
    res, _, err, t0 = launch_row(ctx, target_cmd(ctx, which, n), env=env)
    m = re.search(r"preload_count (\d+)", err)
    if not m:
        raise RowFailed(f"the wrapper printed no count: {err.strip()[-200:]}")
    return res, int(m.group(1)), (res["main_ns"] - t0) / 1e6


def tracer_count(path, with_exits):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) != 1:
        raise RowFailed(f"tracer reported {len(rows)} probes, expected 1: {rows}")
    hits = rows[0]["hits"]
    if with_exits and rows[0].get("exits") != hits:
        return -1  # entries and exits disagree: not exact
    return hits


def row_tracer_attach(ctx, which, n, spec, exits):
    out = os.path.join(ctx.work, "tracer.json")
    err = os.path.join(ctx.work, "tracer.err")

    def start(t):
        cmd = [ctx.tracer, "attach", str(t.pid), "-p", spec, "--json", "-o", out]
        tool = spawn(cmd + (["-x"] if exits else []), stderr=open(err, "w"))
        tool.errfile = err
        return tool

    def count(tool, t):
        t.release()
        finish(tool, "tracer")
        if tool.returncode != 0:
            raise RowFailed(f"tracer exited {tool.returncode}: {open(err).read().strip()[-300:]}")
        return tracer_count(out, exits)

    return attach_row(ctx, which, n, start, count)


def row_tracer_pack(ctx, which, n):
    """tracer attach with the pack bench/compare/pack: a Rust handler at each call."""
    out = os.path.join(ctx.work, "tracer.json")
    err = os.path.join(ctx.work, "tracer.err")

    def start(t):
        cmd = [ctx.tracer, "attach", str(t.pid), "--pack", ctx.pack, "--json", "-o", out]
        tool = spawn(cmd, stderr=open(err, "w"))
        tool.errfile = err
        return tool

    def count(tool, t):
        t.release()
        finish(tool, "tracer")
        if tool.returncode != 0:
            raise RowFailed(f"tracer exited {tool.returncode}: {open(err).read().strip()[-300:]}")
        with open(out) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        maps = [l for l in lines if l.get("type") == "map" and l.get("map") == "CALLS"]
        probes = [l for l in lines if l.get("type") == "probe"]
        if len(maps) != 1 or len(probes) != 1:
            raise RowFailed(f"tracer reported {lines}, expected the map CALLS and 1 probe")
        calls = maps[0]["data"]["value"]
        return calls if calls == probes[0]["hits"] else -1  # handler and counter disagree

    return attach_row(ctx, which, n, start, count)


def row_tracer_run(ctx, which, n, spec):
    out = os.path.join(ctx.work, "tracer.json")
    cmd = [ctx.tracer, "run", "-p", spec, "--json", "-o", out, "--", *target_cmd(ctx, which, n)]
    res, _, _, t0 = launch_row(ctx, cmd)
    return res, tracer_count(out, False), (res["live_ns"] - t0) / 1e6


def tracefs_write(name, text):
    # os.open: Python's buffered append mode seeks, which tracefs refuses (EINVAL), and
    # O_TRUNC on uprobe_events would delete every other uprobe on the machine.
    fd = os.open(os.path.join(TRACEFS, name), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def row_uprobe(ctx, which, n, ret):
    event = "compare/lib_fn_ret" if ret else "compare/lib_fn"
    definition = f"{'r' if ret else 'p'}:{event} {ctx.lib}:{ctx.lib_fn_offset:#x}"

    remove_uprobe(event)  # left by an interrupted run, it would make the next write fail

    def start(t):
        # No user-space tool here: t0 is just before the two writes to tracefs.
        tracefs_write("uprobe_events", definition)
        tracefs_write(f"events/{event}/enable", "1")

    def count(tool, t):
        t.release()
        with open(os.path.join(TRACEFS, "uprobe_profile")) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] == event.split("/")[1]:
                    return int(parts[2])
        raise RowFailed(f"{event} missing from uprobe_profile")

    try:
        return attach_row(ctx, which, n, start, count)
    finally:
        remove_uprobe(event)


def remove_uprobe(event):
    try:
        tracefs_write(f"events/{event}/enable", "0")
    except OSError:
        pass
    try:
        tracefs_write("uprobe_events", f"-:{event}")
    except OSError:
        pass


def row_bpftrace(ctx, which, n):
    prog = f"uprobe:{ctx.lib}:lib_fn {{ @c = count(); }}"
    outp = os.path.join(ctx.work, "bpftrace.out")

    def start(t):
        tool = spawn(["bpftrace", "-e", prog], stdout=open(outp, "w"), stderr=subprocess.STDOUT)
        tool.errfile = outp
        return tool

    def count(tool, t):
        t.release()
        finish(tool, "bpftrace", signal.SIGINT)
        text = open(outp).read()
        m = re.search(r"^@c: (\d+)", text, re.M)
        if not m:
            raise RowFailed(f"bpftrace printed no count: {text.strip()[-300:]}")
        return int(m.group(1))

    return attach_row(ctx, which, n, start, count)


def row_frida(ctx, which, n):
    script = os.path.join(ctx.here, "frida_count.py")

    def start(t):
        tool = spawn([sys.executable, script, str(t.pid), t.addr],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        tool.lines = Lines(tool.stdout)
        tool.label = "frida_count.py"
        return tool

    def count(tool, t):
        tool.stdin.write("\n")
        tool.stdin.flush()
        hits = int(tool.lines.expect("hits", "frida_count.py")[1])
        t.release()
        finish(tool, "frida_count.py")
        return hits

    return attach_row(ctx, which, n, start, count)


def row_ltrace(ctx, which, n):
    # Launch mode: ltrace 0.7.3 attached with -p sets no breakpoint for `-x` on a
    # library's function (0 calls counted), while launched it does.
    outp = os.path.join(ctx.work, "ltrace.out")
    cmd = ["ltrace", "-c", "-L", "-x", "lib_fn@libtiny.so", "-o", outp, *target_cmd(ctx, which, n)]
    res, _, _, t0 = launch_row(ctx, cmd)
    text = open(outp).read()
    m = re.search(r"\s(\d+) lib_fn$", text, re.M)
    if not m:
        raise RowFailed(f"ltrace printed no count: {text.strip()[-300:]}")
    return res, int(m.group(1)), (res["live_ns"] - t0) / 1e6


def row_uftrace(ctx, which, n):
    data = os.path.join(ctx.work, "uftrace.data")
    shutil.rmtree(data, ignore_errors=True)
    cmd = ["uftrace", "record", "-d", data, "--no-libcall", "-P", "lib_fn@libtiny.so",
           *target_cmd(ctx, which, n)]
    res, _, _, t0 = launch_row(ctx, cmd)
    rep = subprocess.run(["uftrace", "report", "-d", data], capture_output=True, text=True,
                         timeout=TIMEOUT)
    m = re.search(r"\s(\d+)\s+lib_fn$", rep.stdout, re.M)
    if not m:
        raise RowFailed(f"uftrace report has no lib_fn line: {(rep.stdout + rep.stderr)[-300:]}")
    return res, int(m.group(1)), (res["live_ns"] - t0) / 1e6


# ---------------------------------------------------------------- table


class Row:
    def __init__(self, name, which, n, mode, fn, needs=None):
        self.name, self.which, self.n, self.mode, self.fn = name, which, n, mode, fn
        self.needs = needs
        self.ns, self.whole, self.attach, self.counts, self.calls = [], [], [], [], []
        self.error = None


def make_rows(fast, slow, frida_n, ltrace_n, uftrace_n):
    lib, exe, mt = "lib", "exe", "lib threads=4"
    return [
        Row("no probe, lib_fn", lib, fast, "launch", lambda c, w, n: row_baseline(c, w, n)),
        Row("no probe, exe_fn", exe, fast, "launch", lambda c, w, n: row_baseline(c, w, n)),
        Row("LD_PRELOAD wrapper, `++` (the floor)", lib, fast, "launch",
            lambda c, w, n: row_preload(c, w, n, c.wrap)),
        Row("LD_PRELOAD wrapper, `lock add`", lib, fast, "launch",
            lambda c, w, n: row_preload(c, w, n, c.wrap_atomic)),
        Row("tracer entry", lib, fast, "attach",
            lambda c, w, n: row_tracer_attach(c, w, n, "libtiny:lib_fn", False)),
        Row("tracer entry+exit (`-x`)", lib, fast, "attach",
            lambda c, w, n: row_tracer_attach(c, w, n, "libtiny:lib_fn", True)),
        Row("tracer entry, executable's function", exe, fast, "attach",
            lambda c, w, n: row_tracer_attach(c, w, n, "main:exe_fn", False)),
        Row("tracer entry, `tracer run`", lib, fast, "launch",
            lambda c, w, n: row_tracer_run(c, w, n, "libtiny:lib_fn")),
        # Four threads calling at once on every CPU: a counter shared by all threads is
        # contended (issue #10 item 4); per call is CPU time (see target.c).
        Row("no probe, lib_fn, 4 threads", mt, fast, "launch",
            lambda c, w, n: row_baseline(c, w, n)),
        Row("LD_PRELOAD wrapper, `++`, 4 threads", mt, fast, "launch",
            lambda c, w, n: row_preload(c, w, n, c.wrap)),
        Row("LD_PRELOAD wrapper, `lock add`, 4 threads", mt, fast, "launch",
            lambda c, w, n: row_preload(c, w, n, c.wrap_atomic)),
        Row("tracer entry, 4 threads", mt, fast, "attach",
            lambda c, w, n: row_tracer_attach(c, w, n, "libtiny:lib_fn", False)),
        Row("tracer entry+exit (`-x`), 4 threads", mt, fast, "attach",
            lambda c, w, n: row_tracer_attach(c, w, n, "libtiny:lib_fn", True)),
        Row("tracer entry with a pack handler (`--pack`)", lib, fast, "attach",
            lambda c, w, n: row_tracer_pack(c, w, n), needs="pack"),
        Row("kernel uprobe (tracefs)", lib, slow, "attach",
            lambda c, w, n: row_uprobe(c, w, n, False), needs="tracefs"),
        Row("kernel uretprobe (tracefs)", lib, slow, "attach",
            lambda c, w, n: row_uprobe(c, w, n, True), needs="tracefs"),
        Row("bpftrace `uprobe` + `count()`", lib, slow, "attach",
            lambda c, w, n: row_bpftrace(c, w, n), needs="bpftrace"),
        Row("Frida `Interceptor.attach`, CModule `onEnter`", lib, frida_n, "attach",
            lambda c, w, n: row_frida(c, w, n), needs="frida"),
        Row("ltrace `-x` (int3 + ptrace stop per call)", lib, ltrace_n, "launch",
            lambda c, w, n: row_ltrace(c, w, n), needs="ltrace"),
        Row("uftrace `-P` (entry+exit recorded)", lib, uftrace_n, "launch",
            lambda c, w, n: row_uftrace(c, w, n), needs="uftrace"),
    ]


def fmt_range(values, digits):
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def fmt_ratio(r):
    return f"x{r:.0f}" if r >= 100 else f"x{r:.1f}" if r >= 10 else f"x{r:.2f}"


def fmt_ns(v):
    if v >= 1000:
        return f"{v / 1000:.1f} us"
    return f"{v:.2f} ns"


def print_table(rows):
    base = {r.which: statistics.median(r.ns) for r in rows if r.name.startswith("no probe") and r.ns}
    print("| row | calls per run | ns/call (fastest 1/50 of the loop; threads: CPU time): median (range) "
          "| overhead per call | ratio | whole loop, ns/call: median | count exact "
          "| probe live after, ms: median (range) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r.ns:
            print(f"| {r.name} | {r.n:,} | {r.error or 'not run'} | | | | | |")
            continue
        med = statistics.median(r.ns)
        b = base.get(r.which)
        if r.name.startswith("no probe"):
            over, ratio, exact = "-", "x1.00", "-"
        else:
            over = fmt_ns(med - b) if b else "?"
            ratio = fmt_ratio(med / b) if b else "?"
            exact = count_verdict(r)
        ns = fmt_range(r.ns, 2) if med < 1000 else fmt_range([v / 1000 for v in r.ns], 1) + " us"
        whole = fmt_ns(statistics.median(r.whole))
        att = fmt_range(r.attach, 1) + f" ({r.mode})"
        err = f" (a run failed: {r.error})" if r.error else ""
        print(f"| {r.name} | {r.n:,} | {ns}{err} | {over} | {ratio} | {whole} | {exact} | {att} |")


def count_verdict(r):
    bad = [(c, n) for c, n in zip(r.counts, r.calls) if c != n]
    if not bad:
        return f"yes ({len(r.counts)} of {len(r.counts)} runs)"
    c, n = bad[0]
    return f"no: {c:,} counted of {n:,} calls ({len(bad)} of {len(r.counts)} runs)"


# ---------------------------------------------------------------- main


class Ctx:
    pass


def symbol_file_offset(lib, name):
    """File offset of a symbol, which is what uprobe_events wants."""
    syms = subprocess.run(["readelf", "-sW", lib], capture_output=True, text=True, check=True).stdout
    vaddr = next(int(l.split()[1], 16) for l in syms.splitlines()
                 if l.split()[-1:] == [name] and " FUNC " in l)
    segs = subprocess.run(["readelf", "-lW", lib], capture_output=True, text=True, check=True).stdout
    for l in segs.splitlines():
        p = l.split()
        if p and p[0] == "LOAD":
            off, va, filesz = int(p[1], 16), int(p[2], 16), int(p[4], 16)
            if va <= vaddr < va + filesz:
                return vaddr - va + off
    raise SystemExit(f"{name} is in no LOAD segment of {lib}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--tracer", required=True)
    ap.add_argument("--pack", help="the .so of bench/compare/pack")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--fast", type=int, default=20_000_000)
    ap.add_argument("--slow", type=int, default=100_000)
    ap.add_argument("--frida", type=int, default=1_000_000)
    ap.add_argument("--ltrace", type=int, default=2_000)
    ap.add_argument("--uftrace", type=int, default=200_000)
    ap.add_argument("--skip", action="append", default=[],
                    help="NAME=REASON: a tool that could not be installed")
    ap.add_argument("--only", help="run only rows whose name contains this")
    a = ap.parse_args()

    ctx = Ctx()
    ctx.here = os.path.dirname(os.path.abspath(__file__))
    ctx.work = a.work
    ctx.tracer = os.path.abspath(a.tracer)
    ctx.target = os.path.join(a.work, "target")
    ctx.lib = os.path.join(a.work, "libtiny.so")
    ctx.wrap = os.path.join(a.work, "wrap.so")
    ctx.wrap_atomic = os.path.join(a.work, "wrap_atomic.so")
    ctx.pack = os.path.abspath(a.pack) if a.pack else None
    ctx.lib_fn_offset = symbol_file_offset(ctx.lib, "lib_fn")
    skip = dict(s.split("=", 1) for s in a.skip)

    rows = make_rows(a.fast, a.slow, a.frida, a.ltrace, a.uftrace)
    if a.only:
        rows = [r for r in rows if a.only in r.name or r.name.startswith("no probe")]
    for r in rows:
        r.error = skip.get(r.needs)
    live = [r for r in rows if r.error is None]
    base = live[0]
    load0 = open("/proc/loadavg").read().split()[:3]
    t_start = time.monotonic()
    for rnd in range(a.rounds):
        # The lib_fn baseline runs twice a round (first and in the middle) to show noise.
        order = live[:len(live) // 2] + [base] + live[len(live) // 2:]
        for r in order:
            if r.error and not r.ns:
                continue  # failed every time so far: not worth another timeout
            run_once(ctx, r)
        print(f"round {rnd + 1}/{a.rounds} done, {time.monotonic() - t_start:.0f} s", file=sys.stderr)
    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"Load average (1, 5, 15 min) before: {' '.join(load0)}, after: {' '.join(load1)}; "
          f"{os.cpu_count()} CPUs; {a.rounds} rounds, {time.monotonic() - t_start:.0f} s.\n")
    print_table(rows)


def run_once(ctx, r):
    try:
        res, count, attach_ms = r.fn(ctx, r.which, r.n)
    except (RowFailed, OSError, subprocess.SubprocessError, ValueError) as e:
        r.error = r.error or f"failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        print(f"{r.name}: {e}", file=sys.stderr)
        return
    r.ns.append(res["ns"])
    r.whole.append(res["whole_ns"])
    r.attach.append(attach_ms)
    if count is not None:
        r.counts.append(count)
        r.calls.append(res["calls"])


if __name__ == "__main__":
    main()
