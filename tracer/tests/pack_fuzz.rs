//! The tracer's readers of shared memory and pack files against arbitrary bytes: the
//! target can write anything into the region, so no content may make them panic, loop
//! without bound, allocate beyond what the descriptors allow or read outside the mapping.
//! Case counts keep the whole file well under 30 s.

use probes::pack::abi::{
    self, map_kind, ring_control, Plan, DESCRIPTOR_SIZE, DESC_MAGIC, RING_CONTROL,
};
use proptest::prelude::*;
use std::collections::BTreeMap;
use tracer::pack::descriptors::{parse_descriptors, FormatDesc, MapDesc};
use tracer::pack::format::{decode, parse_format};
use tracer::pack::maps::{check_region, read_maps, MapData};
use tracer::pack::report::{map_json, map_text};
use tracer::pack::ring::Consumer;
use tracer::pack::view::{OwnedRegion, View};

fn maps() -> Vec<MapDesc> {
    let m = |name: &str, kind, params| MapDesc {
        name: name.into(),
        kind,
        params,
        symbol: String::new(),
    };
    vec![
        m("C", map_kind::COUNTER, [0; 4]),
        m("L", map_kind::HIST_LOG2, [0; 4]),
        m("LIN", map_kind::HIST_LINEAR, [10, 3, 16, 0]),
        m("H", map_kind::HASH, [12, 0, 64, 2]),
    ]
}

fn valid_region() -> (OwnedRegion, Plan) {
    let kinds: Vec<_> = maps().iter().map(|m| (m.kind, m.params)).collect();
    let plan = abi::plan(&kinds, 4096).unwrap();
    let r = OwnedRegion::new(plan.total);
    // SAFETY: zeroed, aligned, plan.total bytes.
    unsafe { abi::init_region(r.as_ptr(), &plan, &kinds) };
    (r, plan)
}

fn interesting() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(2),
        Just(u64::MAX),
        0u64..4096,
        any::<u64>(),
        (0u64..4096).prop_map(|l| l | probes::pack::ring::flag::COMMITTED),
        (0u64..4096).prop_map(|l| l | probes::pack::ring::flag::BUSY),
    ]
}

fn corrupt(view: View, writes: &[(usize, u64)]) {
    let words = view.len() / 8;
    for &(i, v) in writes {
        view.store((i % words) * 8, v);
    }
}

proptest! {
    #![proptest_config(tests::fuzz_cases(300))]

    #[test]
    fn map_readers_survive_any_region(writes in prop::collection::vec((any::<usize>(), interesting()), 0..200),
                                      truncate in prop::option::of(0usize..20_000)) {
        let (region, plan) = valid_region();
        corrupt(region.view(), &writes);
        let full = region.view();
        let view = match truncate {
            // A mapping shorter than the layout: a reader must not step past it.
            Some(n) => full.prefix(n),
            None => full,
        };
        let _ = check_region(view, &plan, 4);
        for m in read_maps(view, &plan, &maps()) {
            if let MapData::Hash { entries, .. } = &m.data {
                prop_assert!(entries.len() <= 64);
            }
            let _ = map_text(&m);
            let _ = map_json(&m);
        }
    }

    #[test]
    fn the_ring_consumer_survives_any_ring(writes in prop::collection::vec((0usize..600, interesting()), 0..100),
                                           tail in interesting(), reserve in interesting()) {
        let (region, plan) = valid_region();
        let view = region.view();
        view.store(plan.ring_offset + ring_control::TAIL, tail);
        view.store(plan.ring_offset + ring_control::RESERVE, reserve);
        for (i, v) in writes {
            view.store(plan.ring_offset + RING_CONTROL + (i % 512) * 8, v);
        }
        let mut c = Consumer::new(plan.ring_offset, plan.ring_bytes);
        let mut bytes = 0usize;
        for _ in 0..3 {
            let d = c.drain(view, |p| bytes += p.len() + 8);
            prop_assert!(d.records <= (plan.ring_bytes / 8) as u64);
        }
        prop_assert!(bytes <= 3 * plan.ring_bytes);
        c.skip_stuck(view);
        let d = c.drain(view, |_| {});
        prop_assert_eq!(d.records, 0, "a skipped ring is empty");
    }

    #[test]
    fn records_of_any_bytes_decode_or_fail_cleanly(payload in prop::collection::vec(any::<u8>(), 0..400),
                                                   nargs in 0u8..10, tags in prop::collection::vec(0u8..7, 8)) {
        let fmt = "a {} b {:x} c {:?} d {:#x} e {} f {} g {} h {}";
        let pieces = parse_format(fmt).unwrap();
        let formats: BTreeMap<u32, FormatDesc> =
            [(7, FormatDesc { id: 7, file: "f".into(), line: 1, nargs: 8, text: fmt.into(), pieces })].into();
        let mut p = payload.clone();
        if p.len() >= 16 {
            p[..4].copy_from_slice(&7u32.to_le_bytes());
            p[4] = nargs;
            p[8..16].copy_from_slice(&tags);
        }
        if let Ok(e) = decode(&p, &formats) {
            let _ = e.render();
            let _ = e.to_json();
        }
        let _ = decode(&payload, &formats);
    }

    #[test]
    fn descriptor_sections_of_any_bytes_parse_or_fail_cleanly(n in 0usize..4, bytes in prop::collection::vec(any::<u8>(), 0..(4 * DESCRIPTOR_SIZE)),
                                                              kind in 0u32..5, sub in 0u32..6, params in prop::array::uniform4(interesting())) {
        let mut b = bytes.clone();
        b.resize(n * DESCRIPTOR_SIZE, 0);
        for d in b.chunks_exact_mut(DESCRIPTOR_SIZE) {
            d[..4].copy_from_slice(&DESC_MAGIC.to_le_bytes());
            d[4..8].copy_from_slice(&abi::ABI_VERSION.to_le_bytes());
            d[8..12].copy_from_slice(&kind.to_le_bytes());
            d[12..16].copy_from_slice(&sub.to_le_bytes());
            for (i, p) in params.iter().enumerate() {
                d[16 + 8 * i..24 + 8 * i].copy_from_slice(&p.to_le_bytes());
            }
        }
        if let Ok(info) = parse_descriptors(&b) {
            // Whatever parsed has a layout within the bounds the ABI sets.
            if let Ok(plan) = tracer::pack::descriptors::plan_for(&info, 4096) {
                let largest_map = abi::MAP_HEADER
                    + abi::MAX_HASH_CAPACITY as usize * abi::hash_slot_size(abi::MAX_KEY_SIZE as usize);
                prop_assert!(plan.total <= 4096 + abi::REGION_HEADER + RING_CONTROL + info.maps.len() * largest_map + 4096);
            }
        }
        let _ = parse_descriptors(&bytes);
    }
}
