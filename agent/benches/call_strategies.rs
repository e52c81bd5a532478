//! What does each way of reaching a far function cost JITed code?
//!
//! `call rel32` reaches +-2 GiB; a handler in a library may lie terabytes away. The loops
//! below call a tiny `extern "C"` function through each encoding the emitter offers, the
//! result of one call feeding the next (a dependency chain, so calls cannot overlap), in
//! two shapes: one call site in a hot loop, and 4,096 distinct call sites in one
//! straight-line body looped over (code size, i-cache and branch-target-buffer capacity).
//!
//! `mov r32, imm32; call r` only reaches targets below 4 GiB, and a PIE's functions lie far
//! above. So the callee's machine code is copied byte for byte below 4 GiB (after checking
//! with iced that it has no RIP-relative operand and no branch), and every encoding is
//! measured against that copy as well as against the original.
//!
//! `cargo bench -p agent --bench call_strategies` runs the full measurement (cargo passes
//! `--bench`); without that flag (`cargo test --all-targets`) a short run checks results
//! and encodings only, with numbers too short to mean anything.

use agent::allocator::{align_up, Limits, NearAllocator, PAGE, USER_TOP};
use agent::emitter::{CallEncoding, Emitter, Policy};
use agent::jit::{place, JitError};
use agent::maps;
use iced_x86::code_asm::{rax, rbx, rdi, rsi};
use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, Register};
use std::error::Error;
use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Instant;

type BoxResult<T> = Result<T, Box<dyn Error>>;

const GIB: u64 = 1 << 30;
const FOUR_GIB: u64 = 4 * GIB;
/// Call sites of the many-site body.
const MANY_SITES: usize = 4096;
/// Offsets of the one-site loop's top within its 64-byte line: 0 and 20 keep the loop in
/// one line (20 makes it cross a 32-byte boundary), 48 makes it cross into the next line.
const OFFSETS: [u64; 3] = [0, 20, 48];
/// Attempts at a run before a preempted one is kept anyway.
const MAX_ATTEMPTS: u32 = 8;
/// Retakes stop after this long, so a busy machine cannot stretch the bench much past a
/// minute; the runs kept preempted are counted in the output.
const RETAKE_BUDGET: std::time::Duration = std::time::Duration::from_secs(40);
/// Value the chain of calls starts from.
const START: u64 = 1000;

/// The callee: one add, so the call and return dominate.
#[inline(never)]
extern "C" fn add1(x: u64) -> u64 {
    x.wrapping_add(1)
}

/// A JITed loop: `f(start, iterations)` returns `start + iterations * sites`.
type LoopFn = extern "C" fn(u64, u64) -> u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Rel32,
    /// A second, separately placed rel32 loop: an A/A control showing how much placement
    /// alone moves the numbers.
    Rel32Again,
    RipSlot,
    Abs32,
    Abs64,
    /// `call rel32` to a stub `movabs r11, target; jmp r11` placed near the caller.
    Stub,
}

impl Strategy {
    const ALL: [Strategy; 6] = [
        Strategy::Rel32,
        Strategy::Rel32Again,
        Strategy::RipSlot,
        Strategy::Abs32,
        Strategy::Abs64,
        Strategy::Stub,
    ];

    fn name(self) -> &'static str {
        match self {
            Strategy::Rel32 => "`call rel32`",
            Strategy::Rel32Again => "`call rel32` (A/A: 2nd block)",
            Strategy::RipSlot => "`call [rip+slot]`",
            Strategy::Abs32 => "`mov r11d, imm32; call r11`",
            Strategy::Abs64 => "`movabs r11, imm64; call r11`",
            Strategy::Stub => "`call rel32` -> stub `movabs r11; jmp r11`",
        }
    }

    /// The encoding forced on the loop's call sites.
    fn site_encoding(self) -> CallEncoding {
        match self {
            Strategy::Rel32 | Strategy::Rel32Again | Strategy::Stub => CallEncoding::Rel32,
            Strategy::RipSlot => CallEncoding::RipSlot,
            Strategy::Abs32 => CallEncoding::Abs32,
            Strategy::Abs64 => CallEncoding::Abs64,
        }
    }

    fn applies(self, region: Region, callee: u64) -> bool {
        match self {
            Strategy::Rel32 | Strategy::Rel32Again => region == Region::Near,
            Strategy::Abs32 => callee < FOUR_GIB,
            Strategy::RipSlot | Strategy::Abs64 | Strategy::Stub => true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Region {
    /// Code allocated within rel32 reach of the callee.
    Near,
    /// Code more than 4 GiB away from the callee.
    Far,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// `add1` where the compiler put it, in the bench binary.
    Binary,
    /// A byte-identical copy of `add1` below 4 GiB.
    Low,
    /// A byte-identical copy of `add1` among the far loops: a control showing whether far
    /// code is slow by itself or because of the distance to its callee.
    FarCopy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// One call site in a loop whose top is `offset` bytes into a 64-byte line.
    OneSite { offset: u64 },
    /// [`MANY_SITES`] call sites in one body, looped over.
    ManySites,
    /// No call: [`CLOCK_ADDS`] dependent `add rax, 1` per iteration, one cycle each, to
    /// convert nanoseconds into cycles (no hardware counters here).
    Clock,
}

/// Dependent adds per iteration of the clock loop.
const CLOCK_ADDS: usize = 100;

impl Shape {
    fn sites(self) -> usize {
        match self {
            Shape::OneSite { .. } => 1,
            Shape::ManySites => MANY_SITES,
            Shape::Clock => CLOCK_ADDS,
        }
    }

    fn offset(self) -> u64 {
        match self {
            Shape::OneSite { offset } => offset,
            Shape::ManySites | Shape::Clock => 0,
        }
    }

    fn title(self) -> String {
        match self {
            Shape::OneSite { offset } => {
                format!("One call site in a hot loop, loop top at +{offset} in its 64-byte line")
            }
            Shape::ManySites => {
                format!("{MANY_SITES} distinct call sites in one straight-line body, looped over")
            }
            Shape::Clock => "clock".into(),
        }
    }
}

struct Case {
    shape: Shape,
    target: Target,
    region: Region,
    strategy: Strategy,
    f: LoopFn,
    /// Address of the loop top.
    top: u64,
    /// Bytes of one call (the `mov rdi, rax` feeding it excluded).
    call_bytes: usize,
    /// Smallest distance between the loop's code and the callee.
    distance: u64,
    iterations: u64,
    samples: Vec<f64>,
}

impl Case {
    fn calls(&self) -> u64 {
        self.iterations * self.shape.sites() as u64
    }

    /// Run once, check the result, return ns per call and whether the thread lost its CPU
    /// to another one meanwhile (the machine is shared: such a run measures the scheduler).
    fn run(&self) -> BoxResult<(f64, bool)> {
        let start = black_box(START);
        let iterations = black_box(self.iterations);
        let switches = involuntary_switches();
        let t = Instant::now();
        let got = (self.f)(start, iterations);
        let elapsed = t.elapsed();
        let preempted = involuntary_switches() != switches;
        let want = START + self.calls();
        if got != want {
            return Err(format!(
                "{:?} {:?} {:?} {:?}: the JITed loop returned {got}, expected {want}",
                self.shape, self.target, self.region, self.strategy
            )
            .into());
        }
        Ok((elapsed.as_nanos() as f64 / self.calls() as f64, preempted))
    }
}

/// Involuntary context switches of this thread so far; `None` when getrusage fails.
fn involuntary_switches() -> Option<i64> {
    // SAFETY: a zeroed rusage is a valid out-parameter; getrusage only writes into it.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_THREAD, &mut usage) == 0).then_some(usage.ru_nivcsw)
    }
}

/// Where the benchmark's code lives.
struct Regions {
    /// Anywhere, asked to be near given addresses.
    near: NearAllocator,
    /// Confined to addresses more than 8 GiB above both callees.
    far: NearAllocator,
    /// Below 4 GiB, for the callee's copy.
    low: NearAllocator,
}

/// The machine code of `f` up to and including its `ret`, refusing code that would not
/// behave the same at another address: RIP-relative operands and any branch or call.
fn straight_line_code(f: u64) -> BoxResult<Vec<u8>> {
    let listing = maps::read_self()?;
    let entry = listing
        .iter()
        .find(|e| e.contains(f))
        .ok_or_else(|| format!("{f:#x} is not mapped"))?;
    if !entry.perms.read {
        return Err(format!("{f:#x} lies in a mapping that is not readable").into());
    }
    let avail = (entry.end - f).min(64) as usize;
    // SAFETY: [f, f + avail) lies inside one readable mapping of this process (checked
    // above), which stays mapped: it is the bench binary's own text.
    let bytes = unsafe { std::slice::from_raw_parts(f as *const u8, avail) };
    let mut decoder = Decoder::with_ip(64, bytes, f, DecoderOptions::NONE);
    let mut instr = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instr);
        if instr.is_invalid() {
            return Err(format!("undecodable instruction at {:#x}", instr.ip()).into());
        }
        if instr.is_ip_rel_memory_operand() {
            return Err(format!(
                "the callee has a RIP-relative operand at {:#x}: a copy would read elsewhere",
                instr.ip()
            )
            .into());
        }
        match instr.flow_control() {
            FlowControl::Next => {}
            FlowControl::Return => {
                return Ok(bytes[..(instr.next_ip() - f) as usize].to_vec());
            }
            other => {
                return Err(format!(
                    "the callee has a {other:?} instruction at {:#x}: cannot copy it",
                    instr.ip()
                )
                .into())
            }
        }
    }
    Err("no `ret` within the first 64 bytes of the callee".into())
}

/// Copy `f` into `alloc`'s region, at the same offset within a 64-byte line, and check the copy
/// computes what the original does.
fn copy_callee(alloc: &mut NearAllocator, f: u64, below: u64) -> BoxResult<u64> {
    let code = straight_line_code(f)?;
    let placed = place(alloc, &[], Policy::Best, |e| {
        while e.ip() % 64 != f % 64 {
            e.bytes(&[0xcc]);
        }
        let entry = e.ip();
        e.bytes(&code);
        Ok(entry)
    })?;
    let entry = placed.value;
    if entry + code.len() as u64 > below {
        return Err(format!("the callee's copy landed at {entry:#x}, not below {below:#x}").into());
    }
    // SAFETY: [entry, entry + len) was just committed into an r-x mapping we own.
    let copied = unsafe { std::slice::from_raw_parts(entry as *const u8, code.len()) };
    if copied != code.as_slice() {
        return Err("the callee's copy differs from the original".into());
    }
    // SAFETY: the copy is the machine code of `add1` (an `extern "C" fn(u64) -> u64`)
    // with no address-dependent operand, so it has the same behaviour and ABI.
    let copy: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(entry as usize) };
    if copy(41) != 42 {
        return Err("the callee's copy does not compute x + 1".into());
    }
    Ok(entry)
}

/// `movabs r11, target; jmp r11`, 64-byte aligned, placed by `alloc` near `near`.
fn place_stub(alloc: &mut NearAllocator, near: &[u64], target: u64) -> BoxResult<u64> {
    let placed = place(alloc, near, Policy::Force(CallEncoding::Abs64), |e| {
        e.align(64, 0xcc);
        let entry = e.ip();
        e.jmp(target)?;
        Ok(entry)
    })?;
    let c = placed.counts;
    if c.get(CallEncoding::Abs64) != 1 || c.total() != 1 {
        return Err(format!("stub got encodings {c}, expected abs64 1").into());
    }
    Ok(placed.value)
}

/// The loop: `push rbx; mov rax, rdi; mov rbx, rsi`, nops up to the 64-byte line plus
/// `offset`, then `sites` times `mov rdi, rax; call callee`, `dec rbx; jnz top`,
/// `pop rbx; ret`. Returns (entry, loop top, bytes of one call, code length).
fn place_loop(
    alloc: &mut NearAllocator,
    near: &[u64],
    encoding: CallEncoding,
    callee: u64,
    shape: Shape,
) -> BoxResult<(u64, u64, usize, usize)> {
    let sites = shape.sites();
    let feed = Instruction::with2(Code::Mov_rm64_r64, Register::RDI, Register::RAX)?;
    let placed = place(alloc, near, Policy::Force(encoding), |e: &mut Emitter| {
        let entry = e.ip();
        e.asm(|a| {
            // One push leaves rsp 16-byte aligned at every call, as the ABI wants.
            a.push(rbx)?;
            a.mov(rax, rdi)?;
            a.mov(rbx, rsi)
        })?;
        // Nops, not int3: the padding runs once on entry.
        e.align(64, 0x90);
        for _ in 0..shape.offset() {
            e.bytes(&[0x90]);
        }
        let top = e.label();
        e.bind(top);
        let top_addr = e.ip();
        let mut call_bytes = 0;
        for _ in 0..sites {
            e.emit(&feed)?;
            let before = e.len();
            e.call(callee)?;
            call_bytes = e.len() - before;
        }
        e.asm(|a| a.dec(rbx))?;
        e.jcc_label(0x5, top);
        e.asm(|a| {
            a.pop(rbx)?;
            a.ret()
        })?;
        Ok::<_, JitError>((entry, top_addr, call_bytes))
    })?;
    let c = placed.counts;
    if c.get(encoding) != sites as u64 || c.total() != sites as u64 {
        return Err(
            format!("{shape:?}: the loop got encodings {c}, expected {encoding} {sites}").into(),
        );
    }
    let (entry, top, call_bytes) = placed.value;
    Ok((entry, top, call_bytes, placed.len))
}

/// The clock loop: like [`place_loop`] with `add rax, 1` chains instead of calls.
fn place_clock(alloc: &mut NearAllocator) -> BoxResult<u64> {
    let placed = place(alloc, &[], Policy::Best, |e: &mut Emitter| {
        let entry = e.ip();
        e.asm(|a| {
            a.push(rbx)?;
            a.mov(rax, rdi)?;
            a.mov(rbx, rsi)
        })?;
        e.align(64, 0x90);
        let top = e.label();
        e.bind(top);
        e.asm(|a| {
            for _ in 0..CLOCK_ADDS {
                a.add(rax, 1)?;
            }
            a.dec(rbx)
        })?;
        e.jcc_label(0x5, top);
        e.asm(|a| {
            a.pop(rbx)?;
            a.ret()
        })?;
        Ok(entry)
    })?;
    Ok(placed.value)
}

fn distance(lo: u64, len: usize, target: u64) -> u64 {
    let hi = lo + len as u64;
    if target < lo {
        lo - target
    } else {
        target.saturating_sub(hi)
    }
}

#[allow(clippy::too_many_arguments)]
fn build_case(
    regions: &mut Regions,
    shape: Shape,
    target: Target,
    callee: u64,
    region: Region,
    strategy: Strategy,
    iterations: u64,
) -> BoxResult<Case> {
    let alloc = match region {
        Region::Near => &mut regions.near,
        Region::Far => &mut regions.far,
    };
    let near_callee = match region {
        Region::Near => vec![callee],
        Region::Far => vec![],
    };
    let (call_target, loop_near, stub_len) = if strategy == Strategy::Stub {
        let stub = place_stub(alloc, &near_callee, callee)?;
        let mut near = near_callee.clone();
        near.push(stub);
        (stub, near, 13)
    } else {
        (callee, near_callee, 0)
    };
    let (entry, top, call_bytes, len) = place_loop(
        alloc,
        &loop_near,
        strategy.site_encoding(),
        call_target,
        shape,
    )?;
    let dist = distance(entry, len, callee);
    if region == Region::Far && dist <= FOUR_GIB {
        return Err(format!(
            "far code at {entry:#x} is only {dist:#x} bytes from the callee at {callee:#x}"
        )
        .into());
    }
    // SAFETY: `entry` starts code placed above, which follows the SysV ABI of `LoopFn`:
    // it saves the one callee-saved register it uses, keeps rsp aligned at its calls and
    // calls only `add1` or its copy (through a stub that only jumps).
    let f: LoopFn = unsafe { std::mem::transmute(entry as usize) };
    Ok(Case {
        shape,
        target,
        region,
        strategy,
        f,
        top,
        call_bytes: call_bytes + stub_len,
        distance: dist,
        iterations,
        samples: Vec::new(),
    })
}

/// Pin the thread to the CPU it runs on, so migrations do not add noise. Returns it.
fn pin() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    let cpu = usize::try_from(cpu).ok()?;
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it for any
    // cpu below CPU_SETSIZE (1024), which sched_getcpu's result is; sched_setaffinity
    // reads `size_of::<cpu_set_t>()` bytes of it.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    ok.then_some(cpu)
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "{} (family {}, model {}, {} MHz reported)",
        field("model name"),
        field("cpu family"),
        field("model"),
        field("cpu MHz")
    )
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(samples: &[f64]) -> Stats {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Stats {
        median,
        min: s[0],
        max: s[n - 1],
    }
}

fn human_distance(d: u64) -> String {
    if d >= GIB {
        format!("{:.1} GiB", d as f64 / GIB as f64)
    } else {
        format!("{:.1} MiB", d as f64 / (1 << 20) as f64)
    }
}

const COLUMNS: [(Target, Region, &str); 5] = [
    (Target::Binary, Region::Near, "`add1` in binary, code near"),
    (
        Target::Binary,
        Region::Far,
        "`add1` in binary, code >4 GiB away",
    ),
    (Target::Low, Region::Near, "copy <4 GiB, code near"),
    (Target::Low, Region::Far, "copy <4 GiB, code >4 GiB away"),
    (
        Target::FarCopy,
        Region::Near,
        "control: copy in the far code's region, code near",
    ),
];

fn table(cases: &[Case], shape: Shape) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### {}\n", shape.title());
    let _ = write!(out, "| strategy | call bytes |");
    for (_, _, title) in COLUMNS {
        let _ = write!(out, " {title} |");
    }
    let _ = writeln!(out, "\n|---|---|{}", "---|".repeat(COLUMNS.len()));
    let find = |t: Target, r: Region, s: Strategy| {
        cases
            .iter()
            .find(|c| c.shape == shape && c.target == t && c.region == r && c.strategy == s)
    };
    for strategy in Strategy::ALL {
        let Some(bytes) = cases
            .iter()
            .find(|c| c.shape == shape && c.strategy == strategy)
            .map(|c| c.call_bytes)
        else {
            continue;
        };
        let _ = write!(out, "| {} | {bytes} |", strategy.name());
        for (t, r, _) in COLUMNS {
            let base = find(t, Region::Near, Strategy::Rel32).map(|c| stats(&c.samples).median);
            match (find(t, r, strategy), base) {
                (Some(c), Some(base)) => {
                    let s = stats(&c.samples);
                    let _ = write!(
                        out,
                        " {:.2} [{:.2}-{:.2}] x{:.2} |",
                        s.median,
                        s.min,
                        s.max,
                        s.median / base
                    );
                }
                _ => {
                    let _ = write!(out, " n/a |");
                }
            }
        }
        let _ = writeln!(out);
    }
    out
}

fn main() {
    if let Err(e) = run() {
        eprintln!("call_strategies: {e}");
        std::process::exit(1);
    }
}

fn run() -> BoxResult<()> {
    let full = std::env::args().any(|a| a == "--bench");
    // Short runs, so that most fit between two preemptions by other processes.
    let (reps, one_site_iters, many_site_iters) = if full {
        (21, 1_500_000u64, 400u64)
    } else {
        (3, 20_000, 5)
    };
    let begun = Instant::now();
    let cpu = pin();

    let binary_callee = add1 as *const () as u64;
    let limits = Limits::current();
    let mut regions = Regions {
        near: NearAllocator::with_limits(limits)?,
        far: NearAllocator::with_limits(Limits {
            min_addr: align_up(binary_callee + 8 * GIB, PAGE),
            max_addr: USER_TOP,
        })?,
        low: NearAllocator::with_limits(Limits {
            min_addr: limits.min_addr,
            max_addr: FOUR_GIB,
        })?,
    };
    let low_callee = copy_callee(&mut regions.low, binary_callee, FOUR_GIB)?;
    let far_callee = copy_callee(&mut regions.far, binary_callee, USER_TOP)?;

    let mut shapes: Vec<Shape> = OFFSETS
        .iter()
        .map(|&offset| Shape::OneSite { offset })
        .collect();
    shapes.push(Shape::ManySites);
    let mut cases = Vec::new();
    for &shape in &shapes {
        let iterations = match shape {
            Shape::OneSite { .. } | Shape::Clock => one_site_iters,
            Shape::ManySites => many_site_iters,
        };
        for (target, region, _) in COLUMNS {
            let callee = match target {
                Target::Binary => binary_callee,
                Target::Low => low_callee,
                Target::FarCopy => far_callee,
            };
            for strategy in Strategy::ALL {
                if strategy.applies(region, callee) {
                    cases.push(build_case(
                        &mut regions,
                        shape,
                        target,
                        callee,
                        region,
                        strategy,
                        iterations,
                    )?);
                }
            }
        }
    }

    // SAFETY: as for the other loops; this one calls nothing.
    let clock: LoopFn = unsafe { std::mem::transmute(place_clock(&mut regions.near)? as usize) };
    cases.push(Case {
        shape: Shape::Clock,
        target: Target::Binary,
        region: Region::Near,
        strategy: Strategy::Rel32,
        f: clock,
        top: 0,
        call_bytes: 0,
        distance: 0,
        // As long a run as a one-site loop's (about 5 cycles per call).
        iterations: (one_site_iters * 5 / CLOCK_ADDS as u64).max(1),
        samples: Vec::new(),
    });

    // Warm up every loop once (caches, predictors, page faults), then take the samples
    // round-robin so slow drifts of the machine hit every case alike; the starting case
    // rotates so no case always runs right after the same neighbour. A run during which
    // another process took the CPU is taken again, a few times at most.
    for c in &cases {
        c.run()?;
    }
    let n = cases.len();
    let (mut retaken, mut disturbed) = (0u64, 0u64);
    for rep in 0..reps {
        for i in 0..n {
            let idx = (i + rep * 7) % n;
            for attempt in 1..=MAX_ATTEMPTS {
                let (ns, preempted) = cases[idx].run()?;
                // Past the time budget a busy machine gets no more retakes.
                let late = begun.elapsed() > RETAKE_BUDGET;
                if !preempted || attempt == MAX_ATTEMPTS || late {
                    cases[idx].samples.push(ns);
                    disturbed += u64::from(preempted);
                    break;
                }
                retaken += 1;
            }
        }
    }
    let ns_per_cycle = cases
        .iter()
        .find(|c| c.shape == Shape::Clock)
        .map(|c| stats(&c.samples))
        .ok_or("no clock loop")?;

    println!("## Call strategies: ns per call (median of {reps} runs [min-max]) and ratio to `call rel32` from near code, same target, same shape, same run\n");
    if !full {
        println!(
            "_Quick check run (no `--bench` flag): too short for the numbers to mean anything._\n"
        );
    }
    println!("- CPU: {}", cpu_model());
    println!(
        "- pinned to CPU: {}",
        cpu.map_or("no (sched_setaffinity failed)".into(), |c| c.to_string())
    );
    println!(
        "- callee `add1` at {binary_callee:#x}; byte-identical copies ({} bytes) at {low_callee:#x} and {far_callee:#x}",
        straight_line_code(binary_callee)?.len()
    );
    for (target, region, title) in COLUMNS {
        let ds: Vec<u64> = cases
            .iter()
            .filter(|c| c.shape != Shape::Clock && c.target == target && c.region == region)
            .map(|c| c.distance)
            .collect();
        let tops: Vec<u64> = cases
            .iter()
            .filter(|c| c.shape != Shape::Clock && c.target == target && c.region == region)
            .map(|c| c.top)
            .collect();
        if let (Some(lo), Some(hi), Some(t)) =
            (ds.iter().min(), ds.iter().max(), tops.first().copied())
        {
            println!(
                "- {title}: loops from {t:#x}, {} to {} from the callee",
                human_distance(*lo),
                human_distance(*hi)
            );
        }
    }
    println!(
        "- calls per run: {} (one site), {} (many sites); every run's result checked; every call site's encoding checked",
        one_site_iters,
        many_site_iters * MANY_SITES as u64
    );
    println!(
        "- clock from a chain of dependent adds: {:.2} GHz median, {:.2} GHz fastest run (slowest {:.2}), so 1 ns is about {:.1} cycles",
        1.0 / ns_per_cycle.median,
        1.0 / ns_per_cycle.min,
        1.0 / ns_per_cycle.max,
        1.0 / ns_per_cycle.median
    );
    println!(
        "- runs preempted by another process and taken again: {retaken}; kept after {MAX_ATTEMPTS} preempted attempts: {disturbed} of {}",
        reps * n
    );
    println!();
    for &shape in &shapes {
        println!("{}", table(&cases, shape));
    }
    println!(
        "{} loops measured (one of them the clock loop), total time {:.1} s",
        cases.len(),
        begun.elapsed().as_secs_f64()
    );
    Ok(())
}
