//! `--chrome-trace FILE`: the Chrome trace-event JSON format (what `chrome://tracing`,
//! Perfetto's UI and speedscope load): a JSON array of events, written as calls end.
//!
//! Each finished call is a complete event (`"ph":"X"`, `ts` and `dur` in microseconds,
//! exact to the nanosecond); a call probed at entry only is an instant event (`"ph":"i"`);
//! threads are named by metadata events (`"ph":"M"`). Calls of a thread nest by their
//! times: a callee's span lies inside its caller's. The array is written event by event
//! and flushed after each batch, each event after the first preceded by its comma, so a
//! killed run leaves a file that is the array without its closing `]`, which the trace
//! viewers accept.

use super::calls::{Call, Output};
use serde_json::json;
use std::io::Write;

pub struct Chrome {
    out: std::fs::File,
    /// The events of the batch, written with one `write` at its end: a tracer killed
    /// meanwhile leaves whole events only.
    buf: Vec<u8>,
    pid: i32,
    first: bool,
}

/// Microseconds with three decimals, from nanoseconds, exactly.
fn micros_text(ns: u64) -> String {
    format!("{}.{:03}", ns / 1000, ns % 1000)
}

fn micros(ns: u64) -> serde_json::Value {
    let v: serde_json::Number = micros_text(ns)
        .parse()
        .unwrap_or_else(|_| serde_json::Number::from(ns / 1000));
    serde_json::Value::Number(v)
}

impl Chrome {
    /// Start the array in `file` (created before the target was touched).
    pub fn start(file: std::fs::File, pid: i32, process: &str) -> Chrome {
        let mut c = Chrome {
            out: file,
            buf: b"[".to_vec(),
            pid,
            first: true,
        };
        c.event(
            &json!({"name": "process_name", "ph": "M", "pid": pid, "tid": pid,
            "args": {"name": process}}),
        );
        c.flush();
        c
    }

    fn event(&mut self, v: &serde_json::Value) {
        let sep = if self.first { "\n" } else { ",\n" };
        self.first = false;
        let _ = write!(self.buf, "{sep}{v}");
    }

    /// A complete event, written by hand: one per call, the bulk of a trace (building a
    /// `serde_json::Value` for each halved the events per second).
    fn complete(
        &mut self,
        tid: u32,
        start_ns: u64,
        end_ns: u64,
        name: &str,
        args: &str,
        ret: Option<&str>,
    ) {
        let sep = if self.first { "\n" } else { ",\n" };
        self.first = false;
        let b = &mut self.buf;
        let _ = write!(b, "{sep}{{\"name\":");
        let _ = serde_json::to_writer(&mut *b, name);
        let _ = write!(
            b,
            ",\"ph\":\"X\",\"ts\":{},\"dur\":{},\"pid\":{},\"tid\":{tid},\"args\":{{\"args\":",
            micros_text(start_ns),
            micros_text(end_ns.saturating_sub(start_ns)),
            self.pid
        );
        let _ = serde_json::to_writer(&mut *b, args);
        if let Some(r) = ret {
            b.extend_from_slice(b",\"return\":");
            let _ = serde_json::to_writer(&mut *b, r);
        }
        b.extend_from_slice(b"}}");
    }

    fn flush(&mut self) {
        let _ = self.out.write_all(&self.buf);
        self.buf.clear();
    }
}

impl Output for Chrome {
    fn thread(&mut self, tid: u32, name: &str) {
        self.event(
            &json!({"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid,
            "args": {"name": name}}),
        );
    }

    fn call(&mut self, c: &Call<'_>) {
        let v = match *c {
            Call::Enter {
                tid,
                ns,
                name,
                args,
                returns: false,
                ..
            } => json!({"name": name, "ph": "i", "s": "t", "ts": micros(ns), "pid": self.pid,
                "tid": tid, "args": {"args": args}}),
            Call::Return {
                tid,
                start_ns,
                end_ns,
                name,
                args,
                ret,
                ..
            } => return self.complete(tid, start_ns, end_ns, name, args, ret),
            Call::Lost {
                tid,
                start_ns,
                ns,
                name,
                args,
                ..
            } => return self.complete(tid, start_ns, ns, name, args, Some("(not seen)")),
            _ => return,
        };
        self.event(&v);
    }

    fn batch_done(&mut self, _now: std::time::Instant) {
        self.flush();
    }

    fn finish(&mut self, _ns: u64) {
        self.buf.extend_from_slice(b"\n]\n");
        self.flush();
    }
}
