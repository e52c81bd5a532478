//! `--perfetto FILE`: Perfetto's native trace format, a `Trace` protobuf message whose
//! `TracePacket`s carry `TrackEvent`s (what Perfetto's UI and trace_processor prefer to
//! JSON for big traces).
//!
//! One track per thread (a `TrackDescriptor` with its `ThreadDescriptor`, under the
//! process's track); each call is a slice: `TYPE_SLICE_BEGIN` at its entry and
//! `TYPE_SLICE_END` at its return, written as the records arrive (in order per thread);
//! a call probed at entry only is a `TYPE_INSTANT`. Arguments and return values are
//! debug annotations. `Trace` is a repeated field of packets, so the file is valid after
//! every packet: a killed run leaves a loadable trace.
//!
//! The encoding is written here (a few fields of a few messages); field numbers are those
//! of Perfetto's `.proto` files, and the tests decode the output with the messages the
//! `perfetto_protos` crate generates from them.

use super::calls::{Call, Output};
use std::io::Write;

/// Field numbers from `protos/perfetto/trace/*.proto`.
mod field {
    pub const TRACE_PACKET: u32 = 1;
    // TracePacket
    pub const TIMESTAMP: u32 = 8;
    pub const TRUSTED_PACKET_SEQUENCE_ID: u32 = 10;
    pub const TRACK_EVENT: u32 = 11;
    pub const SEQUENCE_FLAGS: u32 = 13;
    pub const TRACK_DESCRIPTOR: u32 = 60;
    // TrackDescriptor
    pub const UUID: u32 = 1;
    pub const PROCESS: u32 = 3;
    pub const THREAD: u32 = 4;
    pub const PARENT_UUID: u32 = 5;
    // ProcessDescriptor / ThreadDescriptor
    pub const PID: u32 = 1;
    pub const TID: u32 = 2;
    pub const PROCESS_NAME: u32 = 6;
    pub const THREAD_NAME: u32 = 5;
    // TrackEvent
    pub const DEBUG_ANNOTATIONS: u32 = 4;
    pub const TYPE: u32 = 9;
    pub const TRACK_UUID: u32 = 11;
    pub const NAME: u32 = 23;
    // DebugAnnotation
    pub const STRING_VALUE: u32 = 6;
    pub const ANNOTATION_NAME: u32 = 10;
}

/// `TrackEvent.Type`.
#[derive(Clone, Copy)]
enum EventType {
    SliceBegin = 1,
    SliceEnd = 2,
    Instant = 3,
}

/// `TracePacket.SequenceFlags.SEQ_INCREMENTAL_STATE_CLEARED`.
const SEQ_INCREMENTAL_STATE_CLEARED: u64 = 1;
/// The one writer sequence of the file.
const SEQUENCE: u64 = 1;

/// A protobuf message being built.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint((field as u64) << 3 | wire as u64);
    }

    fn uint(mut self, field: u32, v: u64) -> Self {
        self.key(field, 0);
        self.varint(v);
        self
    }

    /// An `int32` field (negative values take ten bytes, as protobuf says).
    fn int32(self, field: u32, v: i32) -> Self {
        self.uint(field, v as i64 as u64)
    }

    fn bytes(mut self, field: u32, b: &[u8]) -> Self {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }

    fn string(self, field: u32, s: &str) -> Self {
        self.bytes(field, s.as_bytes())
    }

    fn msg(self, field: u32, m: Msg) -> Self {
        self.bytes(field, &m.0)
    }
}

pub struct Perfetto {
    out: std::fs::File,
    /// The packets of the batch, written with one `write` at its end: a tracer killed
    /// meanwhile leaves whole packets only.
    buf: Vec<u8>,
    pid: i32,
    first: bool,
}

fn process_uuid(pid: i32) -> u64 {
    (1 << 40) | pid as u32 as u64
}

fn thread_uuid(tid: u32) -> u64 {
    (2 << 40) | tid as u64
}

fn annotation(name: &str, value: &str) -> Msg {
    Msg::default()
        .string(field::ANNOTATION_NAME, name)
        .string(field::STRING_VALUE, value)
}

impl Perfetto {
    /// Start the trace in `file` (created before the target was touched).
    pub fn start(file: std::fs::File, pid: i32, process: &str) -> Perfetto {
        let mut p = Perfetto {
            out: file,
            buf: Vec::new(),
            pid,
            first: true,
        };
        let proc = Msg::default()
            .int32(field::PID, pid)
            .string(field::PROCESS_NAME, process);
        let track = Msg::default()
            .uint(field::UUID, process_uuid(pid))
            .msg(field::PROCESS, proc);
        p.packet(Msg::default().msg(field::TRACK_DESCRIPTOR, track));
        p.flush();
        p
    }

    fn flush(&mut self) {
        let _ = self.out.write_all(&self.buf);
        self.buf.clear();
    }

    /// Write one `TracePacket` (as a `Trace.packet` field), on our sequence.
    fn packet(&mut self, mut m: Msg) {
        m = m.uint(field::TRUSTED_PACKET_SEQUENCE_ID, SEQUENCE);
        if self.first {
            m = m.uint(field::SEQUENCE_FLAGS, SEQ_INCREMENTAL_STATE_CLEARED);
            self.first = false;
        }
        let framed = Msg::default().msg(field::TRACE_PACKET, m);
        self.buf.extend_from_slice(&framed.0);
    }

    fn event(
        &mut self,
        ns: u64,
        tid: u32,
        ty: EventType,
        name: Option<&str>,
        notes: &[(&str, &str)],
    ) {
        let mut e = Msg::default()
            .uint(field::TYPE, ty as u64)
            .uint(field::TRACK_UUID, thread_uuid(tid));
        if let Some(n) = name {
            e = e.string(field::NAME, n);
        }
        for (k, v) in notes {
            e = e.msg(field::DEBUG_ANNOTATIONS, annotation(k, v));
        }
        self.packet(
            Msg::default()
                .uint(field::TIMESTAMP, ns)
                .msg(field::TRACK_EVENT, e),
        );
    }
}

impl Output for Perfetto {
    fn thread(&mut self, tid: u32, name: &str) {
        let thread = Msg::default()
            .int32(field::PID, self.pid)
            .int32(field::TID, tid as i32)
            .string(field::THREAD_NAME, name);
        let track = Msg::default()
            .uint(field::UUID, thread_uuid(tid))
            .uint(field::PARENT_UUID, process_uuid(self.pid))
            .msg(field::THREAD, thread);
        self.packet(Msg::default().msg(field::TRACK_DESCRIPTOR, track));
    }

    fn call(&mut self, c: &Call<'_>) {
        match *c {
            Call::Enter {
                tid,
                ns,
                name,
                args,
                returns,
                ..
            } => {
                let ty = if returns {
                    EventType::SliceBegin
                } else {
                    EventType::Instant
                };
                self.event(ns, tid, ty, Some(name), &[("args", args)]);
            }
            Call::Return {
                tid, end_ns, ret, ..
            } => {
                let notes: Vec<(&str, &str)> = ret.iter().map(|r| ("return", *r)).collect();
                self.event(end_ns, tid, EventType::SliceEnd, None, &notes);
            }
            Call::Lost { tid, ns, .. } => {
                self.event(
                    ns,
                    tid,
                    EventType::SliceEnd,
                    None,
                    &[("return", "(not seen)")],
                );
            }
            Call::Unmatched { .. } => {}
        }
    }

    fn batch_done(&mut self, _now: std::time::Instant) {
        self.flush();
    }

    fn finish(&mut self, _ns: u64) {
        self.flush();
    }
}
