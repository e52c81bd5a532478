//! `tracer new NAME`: a pack crate that builds as it is.
//!
//! Its `probes` dependency is a path to the probes crate of the source tree this tracer
//! was built from, so nothing needs publishing; the workspace's `Cargo.lock` is copied so
//! the pack resolves to crates already fetched for the tracer and builds offline.

use std::path::{Path, PathBuf};

/// The probes crate this tracer was built with.
pub fn probes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../probes")
}

/// Why `tracer new` made no pack.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(
        "{0:?} is not a usable pack name: use lowercase letters, digits, '_' and '-', starting with a letter"
    )]
    Name(String),
    #[error("{} already exists: choose another name or remove it", .0.display())]
    Exists(PathBuf),
    #[error("the probes crate this tracer was built from ({}) is gone ({source}): run tracer from its source tree", .dir.display())]
    NoProbes {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create {}: {source}", .dir.display())]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn check_name(name: &str) -> Result<(), ScaffoldError> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok && name != "probes" && name != "test" {
        Ok(())
    } else {
        Err(ScaffoldError::Name(name.to_owned()))
    }
}

pub fn cargo_toml(name: &str, probes: &Path) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
# Loaded into the target by tracer: a C-ABI shared library.
crate-type = ["cdylib"]

[dependencies]
probes = {{ path = "{probes}" }}

[profile.release]
# Handlers' panics are caught in the pack (the probe is disabled); never abort the target.
panic = "unwind"
debug = 1

# Built on its own, not as a member of an enclosing workspace.
[workspace]
"#,
        probes = probes.display()
    )
}

pub const LIB_RS: &str = r#"//! A probe pack: handlers run inside the target at every hit.
//! Run it with `tracer run --pack . -- PROGRAM` or `tracer attach PID --pack .`.
use probes::prelude::*;

#[map]
static SIZES: Histogram = Histogram::log2();
#[map]
static BY_SIZE: HashMap<u64, u64, 4096> = HashMap::new();
#[map]
static FAILS: Counter = Counter::new();

#[entry("libc:malloc")]
fn malloc(ctx: &mut EntryCtx) {
    let size: u64 = ctx.arg(0);
    SIZES.record(size);
    BY_SIZE.add(size, 1);
}

#[exit("libc:malloc")]
fn malloc_ret(ctx: &mut ExitCtx) {
    if ctx.ret::<u64>() == 0 {
        FAILS.inc();
    }
    if ctx.elapsed_ns() > 10_000 {
        emit!("slow malloc: {} ns, tid {}", ctx.elapsed_ns(), ctx.tid());
    }
}

// At an instruction inside a function, with every register:
// #[at("main:parse_header+0x1c")]
// fn mid(ctx: &mut FullCtx) { emit!("rbx={:#x}", ctx.rbx); }
"#;

/// Write the pack crate `name` into `parent/name`; returns its directory.
pub fn new_pack(parent: &Path, name: &str) -> Result<PathBuf, ScaffoldError> {
    check_name(name)?;
    let dir = parent.join(name);
    if dir.exists() {
        return Err(ScaffoldError::Exists(dir));
    }
    let probes = probes_dir()
        .canonicalize()
        .map_err(|source| ScaffoldError::NoProbes {
            dir: probes_dir(),
            source,
        })?;
    let write = |rel: &str, text: &str| -> Result<(), ScaffoldError> {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap_or(&dir)).map_err(|source| {
            ScaffoldError::CreateDir {
                dir: dir.clone(),
                source,
            }
        })?;
        std::fs::write(&p, text).map_err(|source| ScaffoldError::Write { path: p, source })
    };
    write("Cargo.toml", &cargo_toml(name, &probes))?;
    write("src/lib.rs", LIB_RS)?;
    write(".gitignore", "/target\n")?;
    if let Some(lock) = probes.parent().map(|root| root.join("Cargo.lock")) {
        if let Ok(text) = std::fs::read_to_string(&lock) {
            write("Cargo.lock", &text)?;
        }
    }
    Ok(dir)
}
