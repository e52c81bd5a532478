//! Builds the agent cdylib and leaves it as `$OUT_DIR/libagent.so` for `agent_blob.rs`.
//!
//! A nested cargo is used because the outer build does not produce the `.so` under
//! `cargo check`/`clippy` and gives no ordering guarantee between this build script and the
//! agent's cdylib. The nested build uses its own target directory (no lock contention with
//! the outer build) and the outer profile.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .expect("tracer/ lives in the workspace")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    for p in [
        "agent/src",
        "agent/Cargo.toml",
        "probes/src",
        "probes/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(p).display());
    }
    let release = env::var("PROFILE").as_deref() == Ok("release");
    let target_dir = out_dir.join("agent-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("-p")
        .arg("agent")
        .arg("--lib")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    if release {
        cmd.arg("--release");
        // The agent's debug info (7 of its 9 MB) is written to the target's /tmp, hashed
        // and compared at every first attach: about 8 ms. Its symbols and unwind tables stay.
        cmd.env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo");
    }
    // Wrappers of the outer build (clippy-driver under `cargo clippy`) must not lint or
    // check-only the nested build; the nested build must produce real code.
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the agent: {e}"));
    if !status.success() {
        panic!("building the agent cdylib failed ({status}); see the errors above");
    }
    let built = target_dir
        .join(if release { "release" } else { "debug" })
        .join("libagent.so");
    let dest = out_dir.join("libagent.so");
    std::fs::copy(&built, &dest)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", built.display(), dest.display()));
    // The agent's file name in the target's /tmp carries a hash of its bytes: computed
    // once here rather than over 1.5 MB at every first attach (1 ms).
    let bytes = std::fs::read(&dest).expect("just copied");
    let mut h = std::hash::DefaultHasher::new();
    std::hash::Hasher::write(&mut h, &bytes);
    let hash = format!("{:016x}", std::hash::Hasher::finish(&h));
    std::fs::write(out_dir.join("libagent.so.hash"), hash).expect("OUT_DIR is writable");
}
