//! Per-thread call stacks built from entry and return records, handed to the outputs
//! (text lines, Chrome JSON, Perfetto protobuf) as calls that begin and end.

use super::record::Record;
use super::signature::Signature;
use probes::trace::{RecordKind, STR_RETURN};
use std::collections::HashMap;

/// What the tracer knows of one probe id.
#[derive(Clone, Debug)]
pub struct ProbeInfo {
    /// Shown in lines and traces: the function's name.
    pub name: String,
    pub sig: Signature,
    /// Its returns are probed.
    pub returns: bool,
}

/// A call as the outputs see it.
#[derive(Clone, Debug)]
pub enum Call<'a> {
    /// A function was entered. `returns`: a [`Call::Return`] follows (unless lost).
    Enter {
        tid: u32,
        ns: u64,
        depth: usize,
        name: &'a str,
        args: &'a str,
        returns: bool,
    },
    /// The call at `depth` returned.
    Return {
        tid: u32,
        start_ns: u64,
        end_ns: u64,
        depth: usize,
        name: &'a str,
        args: &'a str,
        ret: Option<&'a str>,
    },
    /// The call at `depth` was left without a return seen (longjmp, exception, a
    /// dropped record): it ends at `ns` as far as traces go.
    Lost {
        tid: u32,
        start_ns: u64,
        ns: u64,
        depth: usize,
        name: &'a str,
        args: &'a str,
    },
    /// A return whose entry was not seen (its record was dropped).
    Unmatched {
        tid: u32,
        ns: u64,
        depth: usize,
        name: &'a str,
        ret: Option<&'a str>,
    },
}

/// Where calls go.
pub trait Output: Send {
    /// A thread seen for the first time, with its name.
    fn thread(&mut self, _tid: u32, _name: &str) {}
    fn call(&mut self, c: &Call<'_>);
    /// Called after each batch of records, with the tracer's wall clock.
    fn batch_done(&mut self, _now: std::time::Instant) {}
    /// Something to say in the text (dropped events).
    fn note(&mut self, _text: &str) {}
    /// The end: calls still open are ended at `ns`.
    fn finish(&mut self, _ns: u64) {}
}

struct Frame {
    probe: u32,
    depth: usize,
    ns: u64,
    args: String,
}

/// The open calls of every thread.
pub struct Calls {
    probes: HashMap<u32, ProbeInfo>,
    threads: HashMap<u32, Vec<Frame>>,
    pub calls: u64,
    pub last_ns: u64,
}

impl Calls {
    pub fn new(probes: HashMap<u32, ProbeInfo>) -> Self {
        Calls {
            probes,
            threads: HashMap::new(),
            calls: 0,
            last_ns: 0,
        }
    }

    /// Whether `tid` is new (its name should be told to the outputs).
    pub fn is_new_thread(&self, tid: u32) -> bool {
        !self.threads.contains_key(&tid)
    }

    /// One record, at `ns` on the trace's clock.
    ///
    /// Records carry the thread's true call depth, so calls whose records were dropped
    /// (ring full) are ended as lost instead of shifting the nesting of those after them.
    pub fn record(&mut self, r: &Record, ns: u64, out: &mut dyn Output) {
        self.last_ns = self.last_ns.max(ns);
        let Some(info) = self.probes.get(&r.probe) else {
            return;
        };
        let stack = self.threads.entry(r.tid).or_default();
        match r.kind {
            RecordKind::Entry => {
                self.calls += 1;
                Open::of(&self.probes, stack).enter(info, r, ns, out);
            }
            RecordKind::Exit => Open::of(&self.probes, stack).exit(info, r, ns, out),
        }
    }

    /// End every open call at the last time seen.
    pub fn finish(&mut self, out: &mut dyn Output) {
        let ns = self.last_ns;
        let mut tids: Vec<u32> = self.threads.keys().copied().collect();
        tids.sort_unstable();
        for tid in tids {
            let stack = self.threads.get_mut(&tid).expect("listed");
            while let Some(f) = stack.pop() {
                let name = self.probes.get(&f.probe).map_or("?", |i| i.name.as_str());
                out.call(&Call::Lost {
                    tid,
                    start_ns: f.ns,
                    ns,
                    depth: f.depth,
                    name,
                    args: &f.args,
                });
            }
        }
        out.finish(ns);
    }
}

/// One thread's open calls, with the probes they refer to.
struct Open<'a> {
    probes: &'a HashMap<u32, ProbeInfo>,
    stack: &'a mut Vec<Frame>,
}

impl<'a> Open<'a> {
    fn of(probes: &'a HashMap<u32, ProbeInfo>, stack: &'a mut Vec<Frame>) -> Self {
        Open { probes, stack }
    }

    /// An entry of `info`'s probe: deeper calls still open lost their returns; the call is
    /// told, and stacked when its return is probed.
    fn enter(&mut self, info: &ProbeInfo, r: &Record, ns: u64, out: &mut dyn Output) {
        let depth = r.depth as usize;
        lose_above(self.probes, self.stack, depth, r.tid, ns, out);
        let args = info.sig.format_args(&r.regs, &r.fregs, &r.strings);
        out.call(&Call::Enter {
            tid: r.tid,
            ns,
            depth,
            name: &info.name,
            args: &args,
            returns: info.returns,
        });
        if info.returns {
            self.stack.push(Frame {
                probe: r.probe,
                depth,
                ns,
                args,
            });
        }
    }

    /// A return of `info`'s probe: matched with its entry at the same depth (calls open
    /// deeper lost their returns), else told as a return whose entry was not seen.
    fn exit(&mut self, info: &ProbeInfo, r: &Record, ns: u64, out: &mut dyn Output) {
        let depth = r.depth as usize;
        let s = r
            .strings
            .iter()
            .find(|(a, _)| *a == STR_RETURN)
            .map(|(_, s)| s);
        let ret = info.sig.format_ret(r.regs[0], r.fregs[0], s);
        let Open { probes, stack } = self;
        let found = stack
            .last()
            .is_some_and(|f| f.depth == depth && f.probe == r.probe)
            || stack.iter().any(|f| f.depth == depth && f.probe == r.probe);
        lose_above(probes, stack, depth + found as usize, r.tid, ns, out);
        if !found {
            out.call(&Call::Unmatched {
                tid: r.tid,
                ns,
                depth,
                name: &info.name,
                ret: ret.as_deref(),
            });
            return;
        }
        let f = stack.pop().expect("found");
        out.call(&Call::Return {
            tid: r.tid,
            start_ns: f.ns,
            end_ns: ns.max(f.ns),
            depth,
            name: &info.name,
            args: &f.args,
            ret: ret.as_deref(),
        });
    }
}

/// End the calls of `stack` at depth `depth` and deeper: their returns were not seen.
fn lose_above(
    probes: &HashMap<u32, ProbeInfo>,
    stack: &mut Vec<Frame>,
    depth: usize,
    tid: u32,
    ns: u64,
    out: &mut dyn Output,
) {
    while stack.last().is_some_and(|f| f.depth >= depth) {
        let f = stack.pop().expect("checked");
        out.call(&Call::Lost {
            tid,
            start_ns: f.ns,
            ns,
            depth: f.depth,
            name: probes.get(&f.probe).map_or("?", |i| i.name.as_str()),
            args: &f.args,
        });
    }
}

/// Several outputs as one.
pub struct Fanout(pub Vec<Box<dyn Output>>);

impl Output for Fanout {
    fn thread(&mut self, tid: u32, name: &str) {
        self.0.iter_mut().for_each(|o| o.thread(tid, name))
    }
    fn call(&mut self, c: &Call<'_>) {
        self.0.iter_mut().for_each(|o| o.call(c))
    }
    fn batch_done(&mut self, now: std::time::Instant) {
        self.0.iter_mut().for_each(|o| o.batch_done(now))
    }
    fn note(&mut self, text: &str) {
        self.0.iter_mut().for_each(|o| o.note(text))
    }
    fn finish(&mut self, ns: u64) {
        self.0.iter_mut().for_each(|o| o.finish(ns))
    }
}
