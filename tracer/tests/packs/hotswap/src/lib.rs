//! A pack built in three versions for the hot swap tests: each handler adds one per hit
//! under its build's version and reports every 1024th hit of its build as an event whose
//! format differs between builds; v3 also declares another map.
use probes::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(not(any(feature = "v2", feature = "v3")))]
const VERSION: u64 = 1;
#[cfg(feature = "v2")]
const VERSION: u64 = 2;
#[cfg(feature = "v3")]
const VERSION: u64 = 3;

#[map]
static BY_VERSION: HashMap<u64, u64, 16> = HashMap::new();

#[cfg(feature = "v3")]
#[map]
static EXTRA: Counter = Counter::new();

/// Hits of this build.
static HITS: AtomicU64 = AtomicU64::new(0);

#[entry("main:hot")]
fn hot(_ctx: &mut EntryCtx) {
    BY_VERSION.add(VERSION, 1);
    #[cfg(feature = "v3")]
    EXTRA.inc();
    let n = HITS.fetch_add(1, Ordering::Relaxed);
    if n % 1024 == 0 {
        #[cfg(not(feature = "v2"))]
        emit!("v1 hit {}", n);
        #[cfg(feature = "v2")]
        emit!("v2 hit {} of build {}", n, VERSION);
    }
}
