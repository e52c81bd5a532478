//! Getting a pack ready for a target, all before the target is touched: build the crate
//! when given a directory, read and check its descriptors, resolve each handler's spec
//! against the target's modules. Then, inside a session, load it next to the agent.

use super::descriptors::{read_pack, PackError, PackInfo};
use crate::spec::{self, ResolvedProbe};
use crate::symbols::ProcessModules;
use probes::ProbeKind;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A pack read from disk, its file's bytes kept for injection.
pub struct Pack {
    pub info: PackInfo,
    pub bytes: Vec<u8>,
    /// The library's name in the target (`pack-NAME`).
    pub name: String,
}

/// One probe site of a pack: the handlers that run there, by index in `info.probes`.
#[derive(Clone, Debug)]
pub struct PackSite {
    pub probe: ResolvedProbe,
    /// Handler run at entry (`#[entry]`) or at the offset (`#[at]`).
    pub entry: Option<usize>,
    /// Handler run at return (`#[exit]`).
    pub exit: Option<usize>,
}

/// The `.so` to load for `--pack PATH`: PATH itself, or for a crate directory the cdylib
/// `cargo build --release` makes of it (built now).
pub fn pack_file(path: &Path) -> Result<PathBuf, PackError> {
    if !path.is_dir() {
        return Ok(path.to_owned());
    }
    if !path.join("Cargo.toml").is_file() {
        return Err(PackError::NoCargoToml {
            path: path.to_owned(),
        });
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(path)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|source| PackError::Cargo {
            cargo: cargo.clone(),
            path: path.to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(PackError::BuildFailed {
            path: path.to_owned(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact")
        .filter(|v| {
            v["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "cdylib"))
        })
        .flat_map(|v| {
            v["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
        })
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| f.extension().is_some_and(|e| e == "so"))
        .ok_or_else(|| PackError::NoCdylib {
            path: path.to_owned(),
        })
}

/// Build (if a directory), read and check the pack at `path`.
pub fn open(path: &Path) -> Result<Pack, PackError> {
    let file = pack_file(path)?;
    let info = read_pack(&file)?;
    let bytes = std::fs::read(&file).map_err(|source| PackError::Read {
        path: file.clone(),
        source,
    })?;
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("pack")
        .trim_start_matches("lib");
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok(Pack {
        info,
        bytes,
        name: format!("pack-{name}"),
    })
}

/// Resolve every handler's spec in the target. Handlers on the same function share one
/// probe (an `#[entry]` and an `#[exit]` of `libc:malloc` are one site). A spec that
/// matches nothing in this process is a note (a pack may target several programs); at
/// least one must match.
pub fn resolve(
    pack: &Pack,
    modules: &ProcessModules,
) -> Result<(Vec<PackSite>, Vec<String>), String> {
    let mut sites: Vec<PackSite> = Vec::new();
    let mut notes = Vec::new();
    for (i, d) in pack.info.probes.iter().enumerate() {
        let found = match spec::resolve(&d.spec, modules) {
            Ok(v) => v,
            Err(e) => {
                notes.push(format!(
                    "pack handler {} ({}) matches nothing here: {e}",
                    d.handler, d.spec.text
                ));
                continue;
            }
        };
        for p in found {
            let at = sites.iter().position(|s| s.probe.address == p.address);
            let site = match at {
                Some(k) => &mut sites[k],
                None => {
                    sites.push(PackSite {
                        probe: p,
                        entry: None,
                        exit: None,
                    });
                    sites.last_mut().expect("pushed")
                }
            };
            let slot = match d.kind {
                ProbeKind::Exit => &mut site.exit,
                ProbeKind::Entry | ProbeKind::Offset => &mut site.entry,
            };
            if let Some(other) = slot.replace(i) {
                return Err(format!(
                    "pack handlers {} and {} both run at {} of {}: give them specs that do not overlap",
                    pack.info.probes[other].handler,
                    d.handler,
                    if d.kind == ProbeKind::Exit { "the return" } else { "the entry" },
                    site.probe.symbol
                ));
            }
        }
    }
    if sites.is_empty() {
        return Err(format!(
            "no handler of the pack {} matches a function of this process: {}",
            pack.info.path.display(),
            notes.join("; ")
        ));
    }
    Ok((sites, notes))
}
