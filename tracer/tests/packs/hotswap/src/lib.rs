//! A pack built in three versions for the hot swap tests: each handler adds one per hit
//! under its build's version; v3 also declares another map.
use probes::prelude::*;

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

#[entry("main:hot")]
fn hot(_ctx: &mut EntryCtx) {
    BY_VERSION.add(VERSION, 1);
    #[cfg(feature = "v3")]
    EXTRA.inc();
}
