//! Reading maps out of the shared region, which the target may have scribbled on.
//!
//! Offsets come from the layout computed from the pack's ELF descriptors, never from the
//! region; headers found in the region are only compared with what is expected, and a
//! mismatch is reported, not trusted. What a reader allocates is bounded by the
//! descriptors (themselves bounded by `abi::map_size`).

use super::descriptors::MapDesc;
use super::view::View;
use probes::pack::abi::{self, map_header, map_kind, Plan, MAP_HEADER, SHARDS};
use std::collections::HashMap;

/// A map's contents at one moment.
#[derive(Clone, Debug, PartialEq)]
pub enum MapData {
    Counter(u64),
    /// One count per bucket, shards summed.
    Histogram(Vec<u64>),
    /// Key bytes and value, one entry per key (duplicates merged), unordered.
    Hash {
        entries: Vec<(Vec<u8>, u64)>,
        drops: u64,
    },
}

/// A map as read, with what was wrong with its memory.
#[derive(Clone, Debug)]
pub struct MapRead {
    pub desc: MapDesc,
    pub data: MapData,
    pub problems: Vec<String>,
}

/// Check the region header; problems are returned, reading goes on regardless.
pub fn check_region(view: View, plan: &Plan, nmaps: usize) -> Vec<String> {
    let mut p = Vec::new();
    if view.len() < plan.total {
        p.push(format!(
            "shared region is {} bytes, the pack needs {}",
            view.len(),
            plan.total
        ));
    }
    if view.u64(0) != Some(abi::REGION_MAGIC) {
        p.push("shared region header corrupted (magic)".into());
    }
    if view.u32(8) != Some(abi::ABI_VERSION) || view.u32(12) != Some(nmaps as u32) {
        p.push("shared region header corrupted (version or map count)".into());
    }
    p
}

/// Read every map of the pack.
pub fn read_maps(view: View, plan: &Plan, maps: &[MapDesc]) -> Vec<MapRead> {
    maps.iter()
        .zip(&plan.maps)
        .map(|(m, &off)| read_map(view, off, m))
        .collect()
}

pub fn read_map(view: View, off: usize, desc: &MapDesc) -> MapRead {
    let mut problems = Vec::new();
    let magic = view.u32(off + map_header::MAGIC);
    let kind = view.u32(off + map_header::KIND);
    if magic != Some(abi::MAP_MAGIC) || kind != Some(desc.kind) {
        problems.push(format!("map {}: header corrupted", desc.name));
    }
    let missing = |p: &mut Vec<String>| {
        p.push(format!(
            "map {}: storage outside the shared region",
            desc.name
        ))
    };
    let data = off + MAP_HEADER;
    let data = match desc.kind {
        map_kind::COUNTER => {
            let mut sum = 0u64;
            for s in 0..SHARDS {
                match view.u64(data + 64 * s) {
                    Some(v) => sum = sum.wrapping_add(v),
                    None => missing(&mut problems),
                }
            }
            MapData::Counter(sum)
        }
        map_kind::HIST_LOG2 | map_kind::HIST_LINEAR => {
            MapData::Histogram(read_hist(view, data, desc, &mut problems))
        }
        _ => read_hash(view, off, desc, &mut problems),
    };
    problems.dedup();
    MapRead {
        desc: desc.clone(),
        data,
        problems,
    }
}

fn read_hist(view: View, data: usize, desc: &MapDesc, problems: &mut Vec<String>) -> Vec<u64> {
    let buckets = if desc.kind == map_kind::HIST_LOG2 {
        abi::LOG2_BUCKETS
    } else {
        desc.params[2] as usize + 2
    };
    let shard = abi::hist_shard_size(desc.kind, &desc.params);
    let mut out = vec![0u64; buckets];
    for s in 0..SHARDS {
        for (b, slot) in out.iter_mut().enumerate() {
            match view.u64(data + s * shard + 8 * b) {
                Some(v) => *slot = slot.wrapping_add(v),
                None => {
                    problems.push(format!(
                        "map {}: storage outside the shared region",
                        desc.name
                    ));
                    return out;
                }
            }
        }
    }
    out
}

fn read_hash(view: View, off: usize, desc: &MapDesc, problems: &mut Vec<String>) -> MapData {
    let key_size = desc.params[0] as usize;
    let cap = desc.params[2] as usize;
    let slot = abi::hash_slot_size(key_size);
    let drops = view.u64(off + map_header::DROPS).unwrap_or(0);
    let mut merged: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut bad_states = 0usize;
    for i in 0..cap {
        let s = off + MAP_HEADER + i * slot;
        let Some(state) = view.u64(s) else {
            problems.push(format!(
                "map {}: storage outside the shared region",
                desc.name
            ));
            break;
        };
        match state {
            0 | 1 => {}
            2 => {
                let (Some(key), Some(v)) = (view.bytes(s + 8, key_size), view.u64(s + slot - 8))
                else {
                    continue;
                };
                let e = merged.entry(key).or_insert(0);
                *e = e.wrapping_add(v);
            }
            _ => bad_states += 1,
        }
    }
    if bad_states > 0 {
        problems.push(format!(
            "map {}: {bad_states} slots corrupted (ignored)",
            desc.name
        ));
    }
    MapData::Hash {
        entries: merged.into_iter().collect(),
        drops,
    }
}
