//! `--trace` lines: one per call, as it happens.
//!
//! `[TID] SECONDS NAME(ARGS) = RET <DURATION>`, indented two spaces per open call of the
//! thread. A call is printed on one line when nothing else happens on its thread before
//! it returns; otherwise its entry is printed as `NAME(ARGS) {` when the next event of
//! the thread arrives (or after [`HOLD`] without one: a blocking call), and its return as
//! `} NAME = RET <DURATION>` at the return's time.

use super::calls::{Call, Output};
use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

/// How long an entry waits for its return to be printed on one line.
const HOLD: Duration = Duration::from_secs(1);

struct Pending {
    ns: u64,
    depth: usize,
    name: String,
    args: String,
    since: Instant,
}

pub struct Text {
    out: Box<dyn Write + Send>,
    buf: String,
    pending: HashMap<u32, Pending>,
}

/// Seconds since the start, microsecond precision.
pub fn seconds(ns: u64) -> String {
    format!("{}.{:06}", ns / 1_000_000_000, ns % 1_000_000_000 / 1000)
}

/// A duration as `<0.4 us>`, `<12.3 ms>`, `<1.200 s>`.
pub fn duration(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("<{:.1} us>", ns as f64 / 1e3)
    } else if ns < 1_000_000_000 {
        format!("<{:.1} ms>", ns as f64 / 1e6)
    } else {
        format!("<{:.3} s>", ns as f64 / 1e9)
    }
}

/// Nesting deeper than this is written as a number: a recursion 10,000 calls deep would
/// otherwise indent its lines by 20 KB.
const MAX_INDENT: usize = 32;

fn indent(depth: usize) -> String {
    if depth > MAX_INDENT {
        return format!("{}[depth {depth}] ", "  ".repeat(MAX_INDENT));
    }
    "  ".repeat(depth)
}

impl Text {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Text {
            out,
            buf: String::new(),
            pending: HashMap::new(),
        }
    }

    fn line(&mut self, tid: u32, ns: u64, depth: usize, body: &str) {
        use std::fmt::Write;
        let _ = writeln!(self.buf, "[{tid}] {} {}{body}", seconds(ns), indent(depth));
    }

    /// Print the thread's held entry as an open call.
    fn open(&mut self, tid: u32) {
        if let Some(p) = self.pending.remove(&tid) {
            self.line(tid, p.ns, p.depth, &format!("{}({}) {{", p.name, p.args));
        }
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            let _ = self.out.write_all(self.buf.as_bytes());
            let _ = self.out.flush();
            self.buf.clear();
        }
    }
}

fn with_ret(ret: Option<&str>) -> String {
    ret.map_or(String::new(), |r| format!(" = {r}"))
}

impl Text {
    /// An entry: held when its return is probed (to print the call on one line if the
    /// return comes soon), else printed.
    fn enter(&mut self, tid: u32, ns: u64, depth: usize, name: &str, args: &str, returns: bool) {
        self.open(tid);
        if returns {
            self.pending.insert(
                tid,
                Pending {
                    ns,
                    depth,
                    name: name.into(),
                    args: args.into(),
                    since: Instant::now(),
                },
            );
        } else {
            self.line(tid, ns, depth, &format!("{name}({args})"));
        }
    }

    /// The thread's held entry if it is the one at `depth`; any other held entry is
    /// printed as an open call.
    fn held_at(&mut self, tid: u32, depth: usize) -> Option<Pending> {
        match self.pending.remove(&tid) {
            Some(p) if p.depth == depth => Some(p),
            Some(p) => {
                self.pending.insert(tid, p);
                self.open(tid);
                None
            }
            None => None,
        }
    }
}

impl Output for Text {
    fn call(&mut self, c: &Call<'_>) {
        match *c {
            Call::Enter {
                tid,
                ns,
                depth,
                name,
                args,
                returns,
            } => self.enter(tid, ns, depth, name, args, returns),
            Call::Return {
                tid,
                start_ns,
                end_ns,
                depth,
                name,
                args,
                ret,
            } => {
                let d = duration(end_ns - start_ns);
                if self.held_at(tid, depth).is_some() {
                    let body = format!("{name}({args}){} {d}", with_ret(ret));
                    self.line(tid, start_ns, depth, &body);
                } else {
                    let body = format!("}} {name}{} {d}", with_ret(ret));
                    self.line(tid, end_ns, depth, &body);
                }
            }
            Call::Lost {
                tid,
                ns,
                depth,
                name,
                args,
                ..
            } => match self.held_at(tid, depth) {
                Some(p) => {
                    let body = format!("{name}({args}) ... (no return seen)");
                    self.line(tid, p.ns, depth, &body);
                }
                None => self.line(tid, ns, depth, &format!("}} {name} (no return seen)")),
            },
            Call::Unmatched {
                tid,
                ns,
                depth,
                name,
                ret,
            } => {
                self.open(tid);
                let body = format!("... {name}{} (entry not seen)", with_ret(ret));
                self.line(tid, ns, depth, &body);
            }
        }
    }

    fn batch_done(&mut self, now: Instant) {
        let mut stale: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.since) >= HOLD)
            .map(|(t, _)| *t)
            .collect();
        stale.sort_unstable();
        for tid in stale {
            self.open(tid);
        }
        self.flush();
    }

    fn note(&mut self, text: &str) {
        self.buf.push_str(text);
        self.buf.push('\n');
    }

    fn finish(&mut self, _ns: u64) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::test_sink::Shared;

    #[test]
    fn deep_nesting_is_numbered_past_the_indent_cap() {
        assert_eq!(indent(2), "    ");
        assert_eq!(indent(MAX_INDENT).len(), 2 * MAX_INDENT);
        let deep = indent(10_000);
        assert!(deep.ends_with("[depth 10000] "), "{deep}");
        assert!(deep.len() < 2 * MAX_INDENT + 20);
    }

    #[test]
    fn a_leaf_is_one_line_and_a_parent_opens_and_closes() {
        let s = Shared::default();
        let mut t = Text::new(Box::new(s.clone()));
        let enter = |ns, depth, name| Call::Enter {
            tid: 7,
            ns,
            depth,
            name,
            args: "1",
            returns: true,
        };
        let ret = |start_ns, end_ns, depth, name| Call::Return {
            tid: 7,
            start_ns,
            end_ns,
            depth,
            name,
            args: "1",
            ret: Some("2"),
        };
        t.call(&enter(1000, 0, "outer"));
        t.call(&enter(2000, 1, "inner"));
        t.call(&ret(2000, 2400, 1, "inner"));
        t.call(&ret(1000, 5000, 0, "outer"));
        t.batch_done(Instant::now());
        let text = String::from_utf8(s.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "[7] 0.000001 outer(1) {\n\
             [7] 0.000002   inner(1) = 2 <0.4 us>\n\
             [7] 0.000005 } outer = 2 <4.0 us>\n"
        );
    }
}
