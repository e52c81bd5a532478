//! The agent library links `probes`, whose pack-side entry points (`__tracer_ring`,
//! `__tracer_pack_init`) a pack exports for the agent to look up. The agent itself must
//! export only its own API: what the tracer calls, all under `tracer_agent_`.

use object::{Object, ObjectSymbol};
use probes::abi::remote::{
    INFO_SYMBOL, INIT_SYMBOL, INTERNAL_SYMBOL, LIVE_SYMBOL, LOAD_PACK_SYMBOL, PREPARE_LIVE_SYMBOL,
    PREPARE_SYMBOL, RESOLVE_SYMBOL,
};

/// The symbols the embedded agent defines in its dynamic symbol table (what `nm -D
/// --defined-only` lists).
fn exported() -> Vec<String> {
    let file = object::File::parse(tracer::agent_blob::agent_so()).expect("agent ELF");
    file.dynamic_symbols()
        .filter(|s| s.is_definition() && s.is_global())
        .map(|s| s.name().expect("symbol name").to_string())
        .collect()
}

#[test]
fn the_agent_exports_its_api_and_no_pack_side_symbol() {
    let names = exported();
    for called in [
        INIT_SYMBOL,
        INFO_SYMBOL,
        PREPARE_SYMBOL,
        RESOLVE_SYMBOL,
        INTERNAL_SYMBOL,
        LIVE_SYMBOL,
        PREPARE_LIVE_SYMBOL,
        LOAD_PACK_SYMBOL,
    ] {
        assert!(
            names.iter().any(|n| n == called),
            "{called} missing: {names:?}"
        );
    }
    let stray: Vec<_> = names
        .iter()
        .filter(|n| !n.starts_with("tracer_agent_"))
        .collect();
    assert!(stray.is_empty(), "the agent exports {stray:?}");
}
