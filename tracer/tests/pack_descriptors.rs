//! Real pack crates built with cargo (`examples/mallocs`, and one made by `tracer new`),
//! read by the tracer's descriptor reader; packs it must refuse, refused with a message
//! saying what to do.

mod common;
use common::{build_pack, example_pack};
use probes::pack::abi::{map_kind, value_type, ABI_VERSION, SECTION};
use probes::ProbeKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use tracer::pack::descriptors::{parse_pack, read_pack, PackError, PackInfo};

fn mallocs() -> PathBuf {
    example_pack("mallocs")
}

fn check_mallocs_shape(p: &PackInfo, with_at: bool) {
    let probes: Vec<_> = p
        .probes
        .iter()
        .map(|d| (d.kind, d.handler.as_str(), d.spec.text.as_str()))
        .collect();
    let mut want = vec![
        (ProbeKind::Entry, "malloc", "libc:malloc"),
        (ProbeKind::Exit, "malloc_ret", "libc:malloc"),
    ];
    if with_at {
        want.push((ProbeKind::Offset, "mid", "main:parse_header+0x1c"));
    }
    let mut probes = probes;
    probes.sort_by_key(|p| p.1);
    want.sort_by_key(|p| p.1);
    assert_eq!(probes, want);
    let mut maps: Vec<_> = p
        .maps
        .iter()
        .map(|m| (m.name.as_str(), m.kind, m.params))
        .collect();
    maps.sort();
    assert_eq!(
        maps,
        vec![
            (
                "BY_SIZE",
                map_kind::HASH,
                [8, value_type::UNSIGNED, 4096, value_type::UNSIGNED]
            ),
            ("FAILS", map_kind::COUNTER, [0; 4]),
            ("SIZES", map_kind::HIST_LOG2, [0; 4]),
        ]
    );
    assert!(p.has_ring);
    let texts: Vec<_> = p
        .formats
        .values()
        .map(|f| (f.text.as_str(), f.nargs))
        .collect();
    assert!(
        texts.contains(&("slow malloc: {} ns, tid {}", 2)),
        "{texts:?}"
    );
    if with_at {
        assert!(texts.contains(&("rbx={:#x}", 1)), "{texts:?}");
    }
    assert!(p
        .formats
        .values()
        .all(|f| f.file.ends_with("lib.rs") && f.line > 0));
}

#[test]
fn the_mallocs_example_builds_and_its_descriptors_read_back() {
    let so = mallocs();
    let p = read_pack(&so).unwrap();
    check_mallocs_shape(&p, true);
    let plan = tracer::pack::descriptors::plan_for(&p, 1 << 20).unwrap();
    assert_eq!(plan.maps.len(), 3);
}

/// The file offset of the descriptor section.
fn section_offset(data: &[u8]) -> usize {
    use object::{Object, ObjectSection};
    let f = object::File::parse(data).unwrap();
    f.section_by_name(SECTION).unwrap().file_range().unwrap().0 as usize
}

#[test]
fn a_pack_built_against_another_abi_is_refused_with_what_to_do() {
    let so = mallocs();
    let mut data = std::fs::read(&so).unwrap();
    let at = section_offset(&data) + 4; // `abi` of the first descriptor
    data[at..at + 4].copy_from_slice(&(ABI_VERSION + 1).to_le_bytes());
    let err = parse_pack(&so, &data).unwrap_err();
    assert!(matches!(err, PackError::Abi { found, .. } if found == ABI_VERSION + 1));
    assert!(
        err.to_string().ends_with(&format!(
            "was built against probes ABI v{}, this tracer speaks v{ABI_VERSION}: rebuild it against this tracer's probes crate",
            ABI_VERSION + 1
        )),
        "{err}"
    );
}

#[test]
fn a_corrupted_descriptor_is_refused() {
    let so = mallocs();
    let data = std::fs::read(&so).unwrap();
    let at = section_offset(&data);
    let mut bad = data.clone();
    bad[at] ^= 0xff; // magic
    assert!(matches!(
        parse_pack(&so, &bad),
        Err(PackError::Malformed { .. })
    ));
    let mut bad = data.clone();
    bad[at + 8] = 9; // kind
    let e = parse_pack(&so, &bad).unwrap_err().to_string();
    assert!(e.contains("unknown descriptor kind 9"), "{e}");
}

/// A map whose parameters no region can hold is refused with the map's name and the
/// layout's reason, the reason kept as the error's source rather than flattened into text.
#[test]
fn a_map_with_bad_parameters_is_refused_with_its_cause() {
    use probes::pack::abi::{desc_kind, PlanError, DESCRIPTOR_SIZE};
    use std::error::Error;
    let so = mallocs();
    let mut data = std::fs::read(&so).unwrap();
    let at = section_offset(&data);
    let u32_at = |d: &[u8], o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap());
    let hash = (at..)
        .step_by(DESCRIPTOR_SIZE)
        .take(64)
        .find(|&o| {
            u32_at(&data, o + 8) == desc_kind::MAP && u32_at(&data, o + 12) == map_kind::HASH
        })
        .expect("mallocs declares a hash map");
    data[hash + 16..hash + 24].copy_from_slice(&0u64.to_le_bytes()); // key size
    let err = parse_pack(&so, &data).unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "malformed probe pack descriptor: map BY_SIZE: {}",
            PlanError::HashMap
        )),
        "{err}"
    );
    let mut cause = err.source();
    while let Some(c) = cause {
        if c.downcast_ref::<PlanError>() == Some(&PlanError::HashMap) {
            return;
        }
        cause = c.source();
    }
    panic!("no PlanError among the causes of {err}");
}

#[test]
fn a_plain_shared_library_is_not_a_probe_pack() {
    let dir = tests::temp_dir("notapack");
    let so = tests::cc(
        &dir,
        "libplain.so",
        "int f(int x) { return x + 1; }\n",
        &["-shared", "-fPIC"],
    );
    let err = read_pack(&so).unwrap_err();
    assert!(matches!(err, PackError::NotAPack { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("is not a probe pack (no tracer_pack section)"),
        "{err}"
    );
    let text = dir.join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    let err = read_pack(&text).unwrap_err();
    assert!(
        err.to_string()
            .contains("is not a probe pack: not an ELF shared library"),
        "{err}"
    );
}

#[test]
fn tracer_new_writes_a_pack_that_builds_and_reads_back() {
    let dir = tests::temp_dir("tracer-new");
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["new", "my_pack"])
        .current_dir(&*dir)
        .output()
        .unwrap();
    tests::assert_success(&out);
    let so = build_pack(&dir.join("my_pack"), "my_pack", &[]);
    check_mallocs_shape(&read_pack(&so).unwrap(), false);
    // A second time: refused, the crate is left as it was.
    let again = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["new", "my_pack"])
        .current_dir(&*dir)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn pack_mistakes_are_compile_errors_naming_the_problem() {
    let dir = tests::temp_dir("badpack");
    let probes = tracer::pack::scaffold::probes_dir().canonicalize().unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        tracer::pack::scaffold::cargo_toml("badpack", &probes),
    )
    .unwrap();
    std::fs::copy(probes.join("../Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    std::fs::create_dir(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("src/lib.rs"),
        r#"use probes::prelude::*;
#[entry("libc:malloc")]
fn m(_c: &mut EntryCtx) { emit!("{:>5}", 1u64); emit!("{} {}", 1u64); }
#[entry("libc:malloc+4")]
fn n(_c: &mut EntryCtx) {}
#[exit("libc:free")]
fn two(_a: &mut ExitCtx, _b: u64) {}
"#,
    )
    .unwrap();
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packs");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release", "--offline"])
        .current_dir(&*dir)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "emit!: unsupported placeholder",
        "emit!: the number of placeholders differs from the number of arguments",
        "probe spec \"libc:malloc+4\": an offset needs #[at(...)]",
        "a probe handler takes one argument, `ctx: &mut ExitCtx`",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

/// The pack reaches its own map handles and ring directly: a dynamic relocation naming
/// one of the exported `__tracer_*` symbols would let a same-named symbol of the target
/// interpose, and the pack's updates would go there.
#[test]
fn no_pack_symbol_is_reached_through_an_interposable_relocation() {
    use object::{Object, ObjectSymbol, ObjectSymbolTable, RelocationTarget};
    let data = std::fs::read(mallocs()).unwrap();
    let f = object::File::parse(&*data).unwrap();
    let dynsym = f.dynamic_symbol_table().unwrap();
    let named: Vec<String> = f
        .dynamic_relocations()
        .unwrap()
        .filter_map(|(_, r)| match r.target() {
            RelocationTarget::Symbol(i) => dynsym
                .symbol_by_index(i)
                .ok()?
                .name()
                .ok()
                .map(str::to_owned),
            _ => None,
        })
        .filter(|n| n.starts_with("__tracer_"))
        .collect();
    assert_eq!(named, Vec::<String>::new());
}
