//! Maps written by pack code (the `probes` handles, bound to a region as the agent binds
//! them) and read back by the tracer's readers, from several threads, with exact counts.

use probes::pack::abi::{self, Binding, Plan};
use probes::prelude::*;
use std::sync::Arc;
use tracer::pack::descriptors::MapDesc;
use tracer::pack::maps::{check_region, read_maps, MapData};
use tracer::pack::report::{histogram_text, map_text};
use tracer::pack::view::OwnedRegion;

const THREADS: u64 = 4;
const PER_THREAD: u64 = 100_000;

/// A region laid out and initialised for `maps`, each handle bound to its storage.
fn bind(maps: &[(&str, &Binding, u32, [u64; 4])]) -> (OwnedRegion, Plan, Vec<MapDesc>) {
    let kinds: Vec<_> = maps.iter().map(|m| (m.2, m.3)).collect();
    let plan = abi::plan(&kinds, 4096).unwrap();
    let region = OwnedRegion::new(plan.total);
    // SAFETY: the region is zeroed, aligned and `plan.total` bytes; it outlives the handles'
    // use in each test (the handles are rebound or unused afterwards).
    unsafe {
        abi::init_region(region.as_ptr(), &plan, &kinds);
        for (m, off) in maps.iter().zip(&plan.maps) {
            m.1.bind(region.as_ptr().add(*off));
        }
    }
    let descs = maps
        .iter()
        .map(|m| MapDesc {
            name: m.0.into(),
            kind: m.2,
            params: m.3,
            symbol: String::new(),
        })
        .collect();
    (region, plan, descs)
}

fn on_threads(f: impl Fn(u64) + Send + Sync + 'static) {
    let f = Arc::new(f);
    let hs: Vec<_> = (0..THREADS)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || f(t))
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
}

#[test]
fn counter_and_histograms_count_exactly_from_four_threads() {
    static HITS: Counter = Counter::new();
    static LOG: Histogram = Histogram::log2();
    static LIN: Histogram = Histogram::linear(100, 10, 5);
    let (region, plan, descs) = bind(&[
        ("HITS", HITS.binding(), HITS.map_kind(), HITS.map_params()),
        ("LOG", LOG.binding(), LOG.map_kind(), LOG.map_params()),
        ("LIN", LIN.binding(), LIN.map_kind(), LIN.map_params()),
    ]);
    on_threads(|_| {
        for i in 0..PER_THREAD {
            HITS.inc();
            LOG.record(i % 1024); // 0..1023: one 0, one 1, then 2^(k-1) values in bucket k
            LIN.record(i % 200); // 100 below 100, 50 in [100,150), 50 at or past 150
        }
    });
    let view = region.view();
    assert_eq!(check_region(view, &plan, 3), Vec::<String>::new());
    let maps = read_maps(view, &plan, &descs);
    assert_eq!(maps[0].data, MapData::Counter(THREADS * PER_THREAD));
    let MapData::Histogram(log) = &maps[1].data else {
        panic!()
    };
    let rounds = THREADS * (PER_THREAD / 1024); // whole passes over 0..1023
    let rest = PER_THREAD % 1024; // each thread's last partial pass covers 0..rest
    for (k, &count) in log.iter().enumerate() {
        let in_bucket = |upto: u64| {
            (0..upto)
                .filter(|v| (64 - v.leading_zeros()) as usize == k)
                .count() as u64
        };
        assert_eq!(
            count,
            rounds * in_bucket(1024) + THREADS * in_bucket(rest),
            "bucket {k}"
        );
    }
    let MapData::Histogram(lin) = &maps[2].data else {
        panic!()
    };
    let per = THREADS * PER_THREAD / 200;
    assert_eq!(
        lin,
        &vec![
            per * 100,
            per * 10,
            per * 10,
            per * 10,
            per * 10,
            per * 10,
            per * 50
        ]
    );
    let text = map_text(&maps[1]);
    assert!(text.starts_with("@LOG:\n[0]  "), "{text}");
    assert!(text.contains("\n[512, 1K) "), "{text}");
    assert_eq!(
        map_text(&maps[0]),
        format!("@HITS: {}\n", THREADS * PER_THREAD)
    );
}

#[test]
fn histogram_text_is_bpftrace_shaped() {
    let mut b = vec![0u64; 65];
    b[1] = 1;
    b[3] = 4;
    b[11] = 2;
    let text = histogram_text("x", abi::map_kind::HIST_LOG2, &[0; 4], &b);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "@x:");
    assert_eq!(lines[1], format!("[1]{:>21} |{:<52}|", 1, "@".repeat(13)));
    assert_eq!(lines[3], format!("[4, 8){:>18} |{}|", 4, "@".repeat(52)));
    assert_eq!(
        lines.last().unwrap(),
        &format!("[1K, 2K){:>16} |{:<52}|", 2, "@".repeat(26))
    );
    assert_eq!(
        lines.len(),
        1 + 11,
        "buckets from the first to the last non-empty one"
    );
}

#[test]
fn hash_map_adds_exactly_from_four_threads() {
    static BY_KEY: HashMap<u64, u64, 256> = HashMap::new();
    let (region, plan, descs) = bind(&[(
        "BY_KEY",
        BY_KEY.binding(),
        BY_KEY.map_kind(),
        BY_KEY.map_params(),
    )]);
    on_threads(|_| {
        for i in 0..PER_THREAD {
            BY_KEY.add(i % 100, 1);
        }
    });
    let maps = read_maps(region.view(), &plan, &descs);
    let MapData::Hash { entries, drops } = &maps[0].data else {
        panic!()
    };
    assert_eq!(*drops, 0);
    let mut entries = entries.clone();
    entries.sort();
    assert_eq!(entries.len(), 100);
    for (k, v) in entries {
        assert_eq!(v, THREADS * PER_THREAD / 100, "key {k:?}");
    }
    assert_eq!(BY_KEY.get(7), Some(THREADS * PER_THREAD / 100));
    let text = map_text(&maps[0]);
    assert_eq!(
        text.lines().count(),
        1 + 20 + 1,
        "top 20 and a line saying how many more: {text}"
    );
}

#[test]
fn a_full_hash_map_counts_every_drop() {
    static SMALL: HashMap<u32, i64, 16> = HashMap::new();
    let (region, plan, descs) = bind(&[(
        "SMALL",
        SMALL.binding(),
        SMALL.map_kind(),
        SMALL.map_params(),
    )]);
    // One thread first: 40 distinct keys into 16 slots, exactly 24 dropped.
    for k in 0..40u32 {
        SMALL.add(k, -1);
    }
    let maps = read_maps(region.view(), &plan, &descs);
    let MapData::Hash { entries, drops } = &maps[0].data else {
        panic!()
    };
    assert_eq!((entries.len(), *drops), (16, 24));
    assert!(entries.iter().all(|(_, v)| *v as i64 == -1), "{entries:?}");
    assert!(map_text(&maps[0]).contains("@SMALL: 24 updates dropped, the map was full"));
    // Then four threads add keys 0..40 again: every add either lands or is counted.
    on_threads(|_| {
        for k in 0..40u32 {
            SMALL.add(k, -1);
        }
    });
    let maps = read_maps(region.view(), &plan, &descs);
    let MapData::Hash { entries, drops } = &maps[0].data else {
        panic!()
    };
    let landed: i64 = entries.iter().map(|(_, v)| -(*v as i64)).sum();
    assert_eq!(landed as u64 + drops, 40 * (THREADS + 1));
    assert_eq!(entries.len(), 16, "no key was added once the map was full");
}

#[test]
fn unbound_maps_ignore_updates() {
    static LONELY: Counter = Counter::new();
    static LONELY_H: HashMap<u64, u64, 4> = HashMap::new();
    LONELY.inc();
    LONELY_H.add(1, 1);
    assert_eq!(LONELY_H.get(1), None);
}

#[test]
fn maps_as_json_carry_every_entry() {
    static J_HASH: HashMap<i32, i64, 128> = HashMap::new();
    static J_HIST: Histogram = Histogram::linear(0, 10, 3);
    let (region, plan, descs) = bind(&[
        (
            "J_HASH",
            J_HASH.binding(),
            J_HASH.map_kind(),
            J_HASH.map_params(),
        ),
        (
            "J_HIST",
            J_HIST.binding(),
            J_HIST.map_kind(),
            J_HIST.map_params(),
        ),
    ]);
    for k in -30..30 {
        J_HASH.add(k, -(k as i64) * 2);
    }
    J_HIST.record(5);
    J_HIST.record(25);
    J_HIST.record(1000);
    let maps = read_maps(region.view(), &plan, &descs);
    let j = tracer::pack::report::map_json(&maps[0]);
    assert_eq!(j["map"], "J_HASH");
    assert_eq!(j["type"], "map");
    assert_eq!(j["kind"], "hash");
    let e = j["data"]["entries"].as_array().unwrap();
    assert_eq!(e.len(), 60, "JSON has all keys, not the top 20");
    assert_eq!(
        (e[0]["key"].as_str(), e[0]["value"].as_i64()),
        (Some("-30"), Some(60))
    );
    assert_eq!(
        (e[59]["key"].as_str(), e[59]["value"].as_i64()),
        (Some("29"), Some(-58))
    );
    let h = tracer::pack::report::map_json(&maps[1]);
    assert_eq!(
        h["data"]["buckets"],
        serde_json::json!([
            {"bucket": "[0, 10)", "count": 1},
            {"bucket": "[20, 30)", "count": 1},
            {"bucket": "[30, ...)", "count": 1},
        ])
    );
    let text = map_text(&maps[1]);
    assert!(
        text.contains("\n[10, 20)               0 |"),
        "empty buckets between are shown: {text}"
    );
}
