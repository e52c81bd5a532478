//! The built `examples/mallocs` cdylib loaded with `dlopen` into this process, bound to a
//! sealed region as the agent will bind it in a target, its shims called with register
//! save areas as the trampolines will call them; the tracer then reads its maps and
//! formats its events using only what it read from the ELF file.

mod common;
use common::example_pack;
use probes::context::{EntryContext, ExitContext};
use probes::pack::abi::{HitInfo, ABI_VERSION, SHIM_OK};
use std::ffi::CString;
use std::mem::MaybeUninit;
use tracer::pack::descriptors::{plan_for, read_pack};
use tracer::pack::format::decode;
use tracer::pack::maps::{read_maps, MapData};
use tracer::pack::region::SharedRegion;
use tracer::pack::ring::Consumer;

fn zeroed<T>() -> T {
    // SAFETY: only used for the register save areas: plain integers.
    unsafe { MaybeUninit::<T>::zeroed().assume_init() }
}

type Shim = unsafe extern "C" fn(*mut u8, *const HitInfo) -> u32;

#[test]
fn a_loaded_pack_updates_its_maps_and_emits_events_the_tracer_reads() {
    let so = example_pack("mallocs");
    let info = read_pack(&so).unwrap();
    let plan = plan_for(&info, 1 << 16).unwrap();
    let kinds: Vec<_> = info.maps.iter().map(|m| (m.kind, m.params)).collect();
    let region = agent::pack_region::create(&kinds, 1 << 16).unwrap();
    assert_eq!(
        region.plan, plan,
        "agent and tracer lay the region out alike"
    );

    let path = CString::new(so.to_str().unwrap()).unwrap();
    // SAFETY: loading a pack built from this tree; its constructors are Rust std's.
    let lib = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!lib.is_null());
    let names: Vec<CString> = info
        .maps
        .iter()
        .map(|m| CString::new(m.symbol.clone()).unwrap())
        .collect();
    let refs: Vec<&std::ffi::CStr> = names.iter().map(|n| n.as_c_str()).collect();
    // SAFETY: `lib` is the pack whose descriptors gave `refs`, in region order; the
    // region is leaked below so it stays mapped while the pack is loaded.
    let abi = unsafe { agent::pack_region::bind_pack(&region, lib, &refs) }.unwrap();
    assert_eq!(abi, ABI_VERSION);

    let shim = |name: &str| -> Shim {
        let sym = info
            .probes
            .iter()
            .find(|p| p.handler == name)
            .unwrap()
            .symbol
            .clone();
        let c = CString::new(sym).unwrap();
        // SAFETY: looking up an exported shim of the loaded pack.
        let p = unsafe { libc::dlsym(lib, c.as_ptr()) };
        assert!(!p.is_null());
        // SAFETY: every shim has the `Shim` signature.
        unsafe { std::mem::transmute::<*mut libc::c_void, Shim>(p) }
    };
    let (entry, exit) = (shim("malloc"), shim("malloc_ret"));
    let name = "libc:malloc";
    let hit = HitInfo {
        probe: 0,
        tid: 4242,
        name: name.as_ptr(),
        name_len: name.len(),
    };
    for size in [0u64, 1, 24, 24, 100, 5000] {
        let mut regs: EntryContext = zeroed();
        regs.rdi = size;
        // SAFETY: an EntryContext for an entry shim, as the trampoline passes it.
        assert_eq!(
            unsafe { entry(&mut regs as *mut _ as *mut u8, &hit) },
            SHIM_OK
        );
    }
    for (ret, ns) in [(0u64, 20_000u64), (0x1000, 50), (0, 10)] {
        let mut regs: ExitContext = zeroed();
        regs.rax = ret;
        regs.duration_ns = ns;
        // SAFETY: an ExitContext for an exit shim.
        assert_eq!(
            unsafe { exit(&mut regs as *mut _ as *mut u8, &hit) },
            SHIM_OK
        );
    }

    // The tracer's side, through its own mapping of the memfd.
    let mapped =
        SharedRegion::open(format!("/proc/self/fd/{}", region.fd).as_ref(), plan.total).unwrap();
    std::mem::forget(region);
    let view = mapped.view();
    let maps = read_maps(view, &plan, &info.maps);
    let by_name = |n: &str| &maps.iter().find(|m| m.desc.name == n).unwrap().data;
    assert_eq!(by_name("FAILS"), &MapData::Counter(2));
    let MapData::Histogram(sizes) = by_name("SIZES") else {
        panic!()
    };
    let nonzero: Vec<(usize, u64)> = sizes
        .iter()
        .copied()
        .enumerate()
        .filter(|b| b.1 > 0)
        .collect();
    assert_eq!(nonzero, vec![(0, 1), (1, 1), (5, 2), (7, 1), (13, 1)]);
    let MapData::Hash { entries, drops } = by_name("BY_SIZE") else {
        panic!()
    };
    let mut e: Vec<(u64, u64)> = entries
        .iter()
        .map(|(k, v)| (u64::from_le_bytes(k[..8].try_into().unwrap()), *v))
        .collect();
    e.sort();
    assert_eq!(
        (e, *drops),
        (vec![(0, 1), (1, 1), (24, 2), (100, 1), (5000, 1)], 0)
    );
    let mut lines = Vec::new();
    let d = Consumer::new(plan.ring_offset, plan.ring_bytes).drain(view, |p| {
        lines.push(decode(p, &info.formats).unwrap().render())
    });
    assert_eq!(d.records, 1);
    assert_eq!(lines, vec!["slow malloc: 20000 ns, tid 4242".to_string()]);
}
