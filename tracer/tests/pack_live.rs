//! The tracer's event thread on a real sealed region made by the agent's code in this
//! process, fed by the producer `emit!` uses: events print in order, and a record a
//! producer reserved and never finished (its thread died inside a handler) is skipped
//! and reported instead of blocking the ring for good.

use probes::pack::abi::RING_BYTES;
use probes::pack::emit::emit;
use probes::pack::ring::RING;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use tracer::pack::descriptors::{FormatDesc, PackInfo};
use tracer::pack::format::parse_format;
use tracer::pack::live::Live;

#[derive(Clone, Default)]
struct Out(Arc<Mutex<Vec<u8>>>);

impl Write for Out {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn events_print_in_order_and_an_unfinished_record_is_skipped_not_waited_for() {
    let region = agent::pack_region::create(&[], RING_BYTES).expect("region");
    // SAFETY: the ring's storage is this region, never unmapped (leaked below).
    unsafe { region.bind_ring(&RING) };
    let fd = region.fd;
    std::mem::forget(region);
    let text = "v={}";
    let mut formats = BTreeMap::new();
    formats.insert(
        7,
        FormatDesc {
            id: 7,
            file: "test.rs".into(),
            line: 1,
            nargs: 1,
            text: text.into(),
            pieces: parse_format(text).unwrap(),
        },
    );
    let info = PackInfo {
        path: "test".into(),
        probes: Vec::new(),
        maps: Vec::new(),
        formats,
        has_ring: true,
    };
    let out = Out::default();
    let live = Live::start(
        std::process::id() as i32,
        fd,
        "pack-test",
        info,
        false,
        Box::new(out.clone()),
    )
    .expect("live");
    for v in 0..100u64 {
        assert!(emit(7, &[&v]));
    }
    // A producer that reserved a record and died before committing it.
    std::mem::forget(RING.reserve(24).expect("room"));
    let summary = live.finish();
    let printed = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let want: String = (0..100).map(|v| format!("v={v}\n")).collect();
    assert_eq!(printed, want);
    assert!(
        summary.contains("events: 100 received, 0 dropped"),
        "{summary}"
    );
    assert!(
        summary.contains("skipped an event a handler never finished"),
        "{summary}"
    );
    // The ring works again after the skip.
    assert!(emit(7, &[&1u64]));
}
