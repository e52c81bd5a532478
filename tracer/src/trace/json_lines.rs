//! `--trace --json`: one JSON object per line, as the rest of `--json`'s output: a call
//! once it returned (`"type": "call"`, its start and duration in ns since the probes went
//! live), an entry whose return is not probed, a return whose entry was lost, a thread's
//! name on first sight, and the drain's notes. A consumer reads every line with one JSON
//! parser; nothing is held back as the text lines do, since a record carries its depth.

use super::calls::{Call, Output};
use serde_json::{json, Value};
use std::io::Write;

pub struct JsonLines {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    pid: i32,
}

impl JsonLines {
    pub fn new(out: Box<dyn Write + Send>, pid: i32) -> Self {
        JsonLines {
            out,
            buf: Vec::new(),
            pid,
        }
    }

    fn push(&mut self, v: &Value) {
        if serde_json::to_writer(&mut self.buf, v).is_ok() {
            self.buf.push(b'\n');
        }
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            let _ = self.out.write_all(&self.buf);
            let _ = self.out.flush();
            self.buf.clear();
        }
    }
}

/// The record of one event, `None` for an entry whose return will say it all.
fn record(pid: i32, c: &Call<'_>) -> Option<Value> {
    Some(match *c {
        Call::Enter { returns: true, .. } => return None,
        Call::Enter {
            tid,
            ns,
            depth,
            name,
            args,
            returns: false,
        } => json!({"type": "call", "pid": pid, "tid": tid, "start_ns": ns, "depth": depth,
                    "name": name, "args": args}),
        Call::Return {
            tid,
            start_ns,
            end_ns,
            depth,
            name,
            args,
            ret,
        } => json!({"type": "call", "pid": pid, "tid": tid, "start_ns": start_ns,
                    "dur_ns": end_ns.saturating_sub(start_ns), "depth": depth, "name": name,
                    "args": args, "ret": ret}),
        Call::Lost {
            tid,
            start_ns,
            ns,
            depth,
            name,
            args,
        } => json!({"type": "call", "pid": pid, "tid": tid, "start_ns": start_ns,
                    "dur_ns": ns.saturating_sub(start_ns), "depth": depth, "name": name,
                    "args": args, "lost": true}),
        Call::Unmatched {
            tid,
            ns,
            depth,
            name,
            ret,
        } => json!({"type": "return", "pid": pid, "tid": tid, "end_ns": ns, "depth": depth,
                    "name": name, "ret": ret, "entry_seen": false}),
    })
}

impl Output for JsonLines {
    fn thread(&mut self, tid: u32, name: &str) {
        let v = json!({"type": "thread", "pid": self.pid, "tid": tid, "name": name});
        self.push(&v);
    }

    fn call(&mut self, c: &Call<'_>) {
        if let Some(v) = record(self.pid, c) {
            self.push(&v);
        }
    }

    fn batch_done(&mut self, _now: std::time::Instant) {
        self.flush();
    }

    fn note(&mut self, text: &str) {
        self.push(&json!({"type": "note", "text": text}));
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
    fn each_call_is_one_object_when_it_returns() {
        let s = Shared::default();
        let mut j = JsonLines::new(Box::new(s.clone()), 42);
        j.thread(7, "main");
        j.call(&Call::Enter {
            tid: 7,
            ns: 1000,
            depth: 0,
            name: "outer",
            args: "n=1",
            returns: true,
        });
        j.call(&Call::Return {
            tid: 7,
            start_ns: 1000,
            end_ns: 5000,
            depth: 0,
            name: "outer",
            args: "n=1",
            ret: Some("2"),
        });
        j.call(&Call::Unmatched {
            tid: 7,
            ns: 6000,
            depth: 0,
            name: "f",
            ret: None,
        });
        j.note("tracer: 3 events dropped");
        j.batch_done(std::time::Instant::now());
        let text = String::from_utf8(s.0.lock().unwrap().clone()).unwrap();
        let v: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(v.len(), 4, "{text}");
        assert_eq!(
            v[0],
            json!({"type": "thread", "pid": 42, "tid": 7, "name": "main"})
        );
        assert_eq!(
            v[1],
            json!({"type": "call", "pid": 42, "tid": 7, "start_ns": 1000, "dur_ns": 4000,
                   "depth": 0, "name": "outer", "args": "n=1", "ret": "2"})
        );
        assert_eq!(v[2]["type"], "return");
        assert_eq!(v[2]["entry_seen"], false);
        assert_eq!(
            v[3],
            json!({"type": "note", "text": "tracer: 3 events dropped"})
        );
    }
}
