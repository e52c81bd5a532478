//! Knowing, without a system call, whether a value cached per process or per thread was
//! read before a `fork`: a `pthread_atfork` child handler bumps a generation that callers
//! store with what they cache.
//!
//! Each library linking this crate (the agent, every pack) has its own copy of the
//! generation and registers its own handler, through [`watch`]. Until that is done
//! [`generation`] says `None`, and callers must not trust a cache.
//!
//! Limit: a child made by a raw `fork`/`clone` system call, which bypasses libc's `fork`,
//! runs no atfork handler; a cache there keeps the parent's value. A `vfork`-style child
//! (`posix_spawn`) shares the parent's memory, so the parent's pid still reads it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Once;

static GENERATION: AtomicU32 = AtomicU32::new(0);
static WATCHING: AtomicBool = AtomicBool::new(false);

unsafe extern "C" {
    // glibc's, from libc_nonshared.a (registered with this library's `__dso_handle`, so
    // it is dropped if the library is unloaded). Declared here so that `probes`, which
    // every pack depends on, needs no crate beyond its macros.
    fn pthread_atfork(
        prepare: Option<extern "C" fn()>,
        parent: Option<extern "C" fn()>,
        child: Option<extern "C" fn()>,
    ) -> i32;
}

extern "C" fn forked_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Start counting forks in this library's copy of the crate; later calls do nothing.
/// Call it from ordinary code (library init, a session's start), never from a handler:
/// registering takes libc's atfork lock and may allocate.
pub fn watch() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a handler that only bumps an atomic; the function stays
        // mapped as long as the library that registered it.
        if unsafe { pthread_atfork(None, None, Some(forked_child)) } == 0 {
            WATCHING.store(true, Ordering::Release);
        }
    });
}

/// How many times this process's ancestry forked since [`watch`] (a child starts at its
/// parent's count plus one), or `None` when not watching.
#[inline]
pub fn generation() -> Option<u32> {
    WATCHING
        .load(Ordering::Acquire)
        .then(|| GENERATION.load(Ordering::Relaxed))
}
