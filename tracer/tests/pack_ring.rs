//! The event ring: `emit!` in pack code (producers) and the tracer's consumer, in one
//! process over one region, with every record accounted for.

use probes::pack::abi::{self, Plan};
use probes::pack::ring::RING;
use probes::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tracer::pack::descriptors::FormatDesc;
use tracer::pack::format::{decode, parse_format, Value};
use tracer::pack::ring::Consumer;
use tracer::pack::view::OwnedRegion;

/// `emit!` writes to the one global ring: tests that bind it take turns.
static RING_USERS: Mutex<()> = Mutex::new(());

fn bind_ring(bytes: usize) -> (OwnedRegion, Plan) {
    let plan = abi::plan(&[], bytes).unwrap();
    let region = OwnedRegion::new(plan.total);
    // SAFETY: zeroed, aligned, `plan.total` bytes. The region is freed at the end of the
    // test while RING still points at it: nothing emits outside these tests, which take
    // turns and rebind first.
    unsafe {
        abi::init_region(region.as_ptr(), &plan, &[]);
        RING.attach(region.as_ptr().add(plan.ring_offset), plan.ring_bytes);
    }
    (region, plan)
}

fn formats(list: &[(u32, &str)]) -> BTreeMap<u32, FormatDesc> {
    list.iter()
        .map(|&(id, text)| {
            let pieces = parse_format(text).unwrap();
            let nargs = pieces
                .iter()
                .filter(|p| matches!(p, tracer::pack::format::Piece::Arg(_)))
                .count();
            (
                id,
                FormatDesc {
                    id,
                    file: "t.rs".into(),
                    line: 1,
                    nargs,
                    text: text.into(),
                    pieces,
                },
            )
        })
        .collect()
}

/// The id `emit!` computes at the site: found from the first record instead.
fn first_id(region: &OwnedRegion, plan: &Plan) -> u32 {
    let mut id = None;
    Consumer::new(plan.ring_offset, plan.ring_bytes).drain(region.view(), |p| {
        id.get_or_insert(u32::from_le_bytes(p[..4].try_into().unwrap()));
    });
    id.expect("a record")
}

#[test]
fn records_decode_and_format_as_written() {
    let _g = RING_USERS.lock().unwrap_or_else(|e| e.into_inner());
    let (region, plan) = bind_ring(4096);
    let emitted = || {
        emit!(
            "x={} y={:#x} s={:?} f={} b={} n={}",
            7u32,
            255u64,
            "hé\"",
            1.5f64,
            true,
            -3i32
        )
    };
    assert!(emitted());
    let id = first_id(&region, &plan);
    assert!(emitted());
    let fmts = formats(&[(id, "x={} y={:#x} s={:?} f={} b={} n={}")]);
    let mut lines = Vec::new();
    let d = Consumer::new(plan.ring_offset, plan.ring_bytes).drain(region.view(), |p| {
        let e = decode(p, &fmts).unwrap();
        assert_eq!(e.args[5], Value::I64(-3));
        lines.push(e.render());
    });
    assert_eq!(d.records, 1);
    assert_eq!(
        lines,
        vec!["x=7 y=0xff s=\"hé\\\"\" f=1.5 b=true n=-3".to_string()]
    );
}

#[test]
fn a_full_ring_drops_and_counts_exactly() {
    let _g = RING_USERS.lock().unwrap_or_else(|e| e.into_inner());
    let (region, plan) = bind_ring(4096);
    // 16 bytes of arguments: 8 header + 16 id/tags + 16 = 40 bytes a record.
    let ok = (0..1000u64).filter(|&i| emit!("{} {}", i, i)).count() as u64;
    let mut c = Consumer::new(plan.ring_offset, plan.ring_bytes);
    let mut seen = Vec::new();
    let d = c.drain(region.view(), |p| {
        seen.push(u64::from_le_bytes(p[16..24].try_into().unwrap()))
    });
    assert_eq!(ok, 4096 / 40, "the ring holds as many records as fit");
    assert_eq!(d.records, ok);
    assert_eq!(c.dropped(region.view()), 1000 - ok);
    assert_eq!(
        seen,
        (0..ok).collect::<Vec<_>>(),
        "the first records in, in order"
    );
    // Drained space is reusable, across the end of the data (a padding record).
    let again = (0..50u64).filter(|&i| emit!("{} {}", i, i)).count() as u64;
    assert_eq!(again, 50);
    assert_eq!(c.drain(region.view(), |_| {}).records, 50);
    assert_eq!(c.dropped(region.view()), 1000 - ok);
}

#[test]
fn four_producers_and_a_live_consumer_account_for_every_record() {
    let _g = RING_USERS.lock().unwrap_or_else(|e| e.into_inner());
    const PER: u64 = 200_000;
    let (region, plan) = bind_ring(1 << 16);
    let region = Arc::new(region);
    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let consumer = {
        let (region, done) = (region.clone(), done.clone());
        std::thread::spawn(move || {
            let mut c = Consumer::new(plan.ring_offset, plan.ring_bytes);
            let mut last = [None::<u64>; 4];
            let mut received = 0u64;
            loop {
                let finished = done.load(Ordering::Acquire);
                let d = c.drain(region.view(), |p| {
                    let t = u64::from_le_bytes(p[16..24].try_into().unwrap()) as usize;
                    let seq = u64::from_le_bytes(p[24..32].try_into().unwrap());
                    assert!(last[t].is_none_or(|l| l < seq), "thread {t} out of order");
                    last[t] = Some(seq);
                });
                assert!(d.problems.is_empty(), "{:?}", d.problems);
                received += d.records;
                if finished && !d.pending && d.records == 0 {
                    return (received, c.dropped(region.view()));
                }
                std::thread::yield_now();
            }
        })
    };
    let producers: Vec<_> = (0..4u64)
        .map(|t| {
            let sent = sent.clone();
            std::thread::spawn(move || {
                for seq in 0..PER {
                    emit!("thread {} seq {}", t, seq);
                }
                sent.fetch_add(PER, Ordering::Relaxed);
            })
        })
        .collect();
    producers.into_iter().for_each(|h| h.join().unwrap());
    done.store(true, Ordering::Release);
    let (received, dropped) = consumer.join().unwrap();
    assert_eq!(received + dropped, sent.load(Ordering::Relaxed));
    assert!(received > 0);
}

#[test]
fn a_corrupted_capacity_word_does_not_move_the_producer_out_of_the_ring() {
    let _g = RING_USERS.lock().unwrap_or_else(|e| e.into_inner());
    let (region, plan) = bind_ring(4096);
    let view = region.view();
    // Shared memory claims twice the real capacity; the bytes after the data belong to
    // other things (maps) in a real region.
    view.store(plan.ring_offset + abi::ring_control::CAPACITY, 8192);
    let ok = (0..1000u64).filter(|&i| emit!("{} {}", i, i)).count();
    assert_eq!(ok, 4096 / 40);
    let data_end = plan.ring_offset + abi::RING_CONTROL + plan.ring_bytes;
    let after = view.bytes(data_end, plan.total - data_end).unwrap();
    assert!(
        after.iter().all(|&b| b == 0),
        "the producer wrote past the ring"
    );
    let mut c = Consumer::new(plan.ring_offset, plan.ring_bytes);
    let d = c.drain(view, |_| {});
    assert_eq!(d.records as usize, ok);
    assert_eq!(
        d.problems,
        vec!["event ring header corrupted (capacity)".to_string()]
    );
}
