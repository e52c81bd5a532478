//! The shared region across processes: a child process (standing in for the target)
//! creates the sealed memfd as the agent does, binds pack handles to it and updates them;
//! the tracer maps it through `/proc/PID/fd/N` and reads the maps after the child exited.

use probes::pack::abi::ring_control;
use probes::pack::ring::RING;
use probes::prelude::*;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::process::{Command, Stdio};
use tracer::pack::descriptors::MapDesc;
use tracer::pack::maps::{check_region, read_maps, MapData};
use tracer::pack::region::{RegionError, SharedRegion};
use tracer::pack::ring::Consumer;

static CALLS: Counter = Counter::new();
static SIZES: Histogram = Histogram::log2();
static BY_TID: HashMap<u32, u64, 64> = HashMap::new();
const PER_THREAD: u64 = 50_000;

fn kinds() -> Vec<(u32, [u64; 4])> {
    vec![
        (CALLS.map_kind(), CALLS.map_params()),
        (SIZES.map_kind(), SIZES.map_params()),
        (BY_TID.map_kind(), BY_TID.map_params()),
    ]
}

/// The child's side: runs only when re-executed by the test below.
#[test]
fn child_writer() {
    if std::env::var_os("PACK_REGION_CHILD").is_none() {
        return;
    }
    let region = agent::pack_region::create(&kinds(), 1 << 16).unwrap();
    // SAFETY: the handles are this process's map statics, in the order of `kinds`; the
    // region stays mapped until the process exits.
    unsafe {
        region.bind_map(0, CALLS.binding());
        region.bind_map(1, SIZES.binding());
        region.bind_map(2, BY_TID.binding());
        region.bind_ring(&RING);
    }
    println!("region fd {} total {}", region.fd, region.plan.total);
    std::io::stdout().flush().unwrap();
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..PER_THREAD {
                    CALLS.inc();
                    SIZES.record(i);
                    BY_TID.add(t, 1);
                }
                emit!("thread {} done", t);
            })
        })
        .collect();
    threads.into_iter().for_each(|h| h.join().unwrap());
}

#[test]
fn maps_and_events_are_readable_after_the_writer_exited() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env("PACK_REGION_CHILD", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let fd = loop {
        line.clear();
        assert_ne!(out.read_line(&mut line).unwrap(), 0, "child ended early");
        // libtest prints "test child_writer ... " on the same line first.
        if let Some((_, rest)) = line.split_once("region fd ") {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<i32>()
                .unwrap();
        }
    };
    let plan = probes::pack::abi::plan(&kinds(), 1 << 16).unwrap();
    let region =
        SharedRegion::open(format!("/proc/{}/fd/{fd}", child.id()).as_ref(), plan.total).unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(child.wait().unwrap().success());

    let view = region.view();
    assert_eq!(check_region(view, &plan, 3), Vec::<String>::new());
    let descs: Vec<MapDesc> = ["CALLS", "SIZES", "BY_TID"]
        .iter()
        .zip(kinds())
        .map(|(n, (kind, params))| MapDesc {
            name: n.to_string(),
            kind,
            params,
            symbol: String::new(),
        })
        .collect();
    let maps = read_maps(view, &plan, &descs);
    assert_eq!(maps[0].data, MapData::Counter(4 * PER_THREAD));
    let MapData::Histogram(b) = &maps[1].data else {
        panic!()
    };
    assert_eq!(b.iter().sum::<u64>(), 4 * PER_THREAD);
    assert_eq!(b[0], 4, "one zero a thread");
    let MapData::Hash { entries, drops } = &maps[2].data else {
        panic!()
    };
    let mut entries = entries.clone();
    entries.sort();
    let want: Vec<_> = (0..4u32)
        .map(|t| (t.to_le_bytes().to_vec(), PER_THREAD))
        .collect();
    assert_eq!((entries, *drops), (want, 0));
    let mut c = Consumer::new(plan.ring_offset, plan.ring_bytes);
    let d = c.drain(view, |_| {});
    assert_eq!((d.records, c.dropped(view)), (4, 0));
    assert_eq!(
        view.u64(plan.ring_offset + ring_control::CAPACITY),
        Some(1 << 16)
    );
}

#[test]
fn an_unsealed_memfd_is_refused() {
    // SAFETY: a new memfd owned by the File below.
    let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is ours and open.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(1 << 16).unwrap();
    let err = SharedRegion::from_file(&file, 4096).err().unwrap();
    assert!(matches!(err, RegionError::NotSealed), "{err}");
    assert!(err.to_string().contains("not sealed against shrinking"));
}
