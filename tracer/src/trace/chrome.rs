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
    /// Bytes already in the file.
    written: u64,
    pid: i32,
    first: bool,
}

/// The unit in which the kernel copies a `write` into a file: a SIGKILL that arrives
/// during a write is noticed between these units and leaves a short write, so a write
/// within one such unit of the file lands whole or not at all. Each event is placed
/// inside one (padded to the next with spaces, which JSON allows between elements), and
/// batches are written a unit at a time: a killed run leaves whole events only.
const PAGE: u64 = 4096;

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
            written: 0,
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
        let start = self.buf.len();
        let sep = if self.first { "\n" } else { ",\n" };
        self.first = false;
        let _ = write!(self.buf, "{sep}{v}");
        self.keep_in_page(start);
    }

    /// Move the event just written at `buf[start..]` to the next page of the file when it
    /// would straddle two (an event longer than a page stays as it is).
    fn keep_in_page(&mut self, start: usize) {
        let at = self.written + start as u64;
        let len = (self.buf.len() - start) as u64;
        if len > PAGE || at / PAGE == (at + len - 1) / PAGE {
            return;
        }
        let pad = (PAGE - at % PAGE) as usize;
        self.buf
            .splice(start..start, std::iter::repeat_n(b' ', pad));
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
        let start = self.buf.len();
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
        self.keep_in_page(start);
    }

    /// Write the batch a page of the file at a time (see [`PAGE`]).
    fn flush(&mut self) {
        let mut rest = &self.buf[..];
        while !rest.is_empty() {
            let n = ((PAGE - self.written % PAGE) as usize).min(rest.len());
            if self.out.write_all(&rest[..n]).is_err() {
                break;
            }
            self.written += n as u64;
            rest = &rest[n..];
        }
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
