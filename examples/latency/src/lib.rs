//! Latency of every function a glob matches: a log2 histogram per function (as hash map
//! keys `"FUNCTION 2^K ns"`), one over all of them, and calls per function (counted as
//! they return). Change the spec below (one line) to probe other functions.
use probes::prelude::*;

/// Calls and per-function buckets: names up to 40 bytes, then the bucket.
type Key = [u8; 48];

#[map]
static LATENCY_NS: Histogram = Histogram::log2();
#[map]
static BY_FUNCTION: HashMap<Key, u64, 4096> = HashMap::new();
#[map]
static CALLS: HashMap<Key, u64, 1024> = HashMap::new();

#[exit("libc:*alloc")]
fn leave(ctx: &mut ExitCtx) {
    CALLS.add(key(ctx.probe_name(), None), 1);
    let ns = ctx.elapsed_ns();
    LATENCY_NS.record(ns);
    BY_FUNCTION.add(key(ctx.probe_name(), Some(log2(ns))), 1);
}

/// `2^k <= ns < 2^(k+1)`; 0 for 0 and 1.
fn log2(ns: u64) -> u32 {
    63u32.saturating_sub(ns.leading_zeros())
}

/// The function's name, then ` 2^K ns` when a bucket is given, NUL-padded. No
/// allocation: handlers run inside the target, maybe inside its allocator.
fn key(name: &str, bucket: Option<u32>) -> Key {
    let mut k = [0u8; 48];
    let n = name.len().min(40);
    k[..n].copy_from_slice(&name.as_bytes()[..n]);
    if let Some(b) = bucket {
        let mut at = n;
        for &c in b" 2^" {
            k[at] = c;
            at += 1;
        }
        if b >= 10 {
            k[at] = b'0' + (b / 10) as u8;
            at += 1;
        }
        k[at] = b'0' + (b % 10) as u8;
        at += 1;
        for &c in b" ns" {
            k[at] = c;
            at += 1;
        }
    }
    k
}
