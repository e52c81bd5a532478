//! Maps a pack declares as statics: handles onto storage in the shared region.
//!
//! `#[map] static X: Counter = Counter::new();` is a handle of a few words; the agent
//! binds it to storage in the region it creates at load time (see [`super::abi::plan`]),
//! which the tracer maps too, so maps can be read while the target runs and after it
//! died. Updates are plain atomic adds: no lock, no allocation, no libc call. An unbound
//! handle ignores updates.

use super::abi::{self, map_header, map_kind, value_type, Binding, MAP_HEADER, SHARDS};
use crate::pod::{bytes_of, Pod};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering::*};

/// The shard of the calling thread: a hash of its thread pointer (`fs:0`, the TCB's self
/// pointer on x86-64 glibc and musl), one instruction and no libc. Threads sharing a shard
/// only share cache lines, never lose updates.
#[inline(always)]
pub fn shard() -> usize {
    let tp: u64;
    // SAFETY: reads the thread control block's self pointer, present in every thread of a
    // process using TLS (any Rust or C program on Linux x86-64).
    unsafe {
        std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags))
    };
    (tp.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 61) as usize % SHARDS
}

#[inline(always)]
fn atomic(p: *mut u8) -> &'static AtomicU64 {
    // SAFETY: callers pass 8-aligned addresses inside a bound map's storage, which stays
    // mapped while the pack is loaded.
    unsafe { &*(p as *const AtomicU64) }
}

/// A sum. `inc`, `add`.
#[repr(C)]
pub struct Counter {
    bind: Binding,
}

impl Counter {
    pub const fn new() -> Self {
        Counter {
            bind: Binding::unbound(),
        }
    }

    pub const fn map_kind(&self) -> u32 {
        map_kind::COUNTER
    }

    pub const fn map_params(&self) -> [u64; 4] {
        [0; 4]
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }

    #[inline]
    pub fn add(&self, n: u64) {
        if let Some(h) = self.bind.get() {
            // SAFETY: shard lines follow the header inside the map's storage.
            atomic(unsafe { h.add(MAP_HEADER + 64 * shard()) }).fetch_add(n, Relaxed);
        }
    }

    #[doc(hidden)]
    pub fn binding(&self) -> &Binding {
        &self.bind
    }
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

/// A distribution: `Histogram::log2()` (power-of-two buckets, as bpftrace's `hist()`) or
/// `Histogram::linear(min, step, buckets)` (as `lhist()`, with underflow and overflow).
#[repr(C)]
pub struct Histogram {
    bind: Binding,
    kind: u32,
    params: [u64; 4],
    shard_size: usize,
}

impl Histogram {
    pub const fn log2() -> Self {
        Histogram {
            bind: Binding::unbound(),
            kind: map_kind::HIST_LOG2,
            params: [0; 4],
            shard_size: (abi::LOG2_BUCKETS * 8 + 63) & !63,
        }
    }

    /// `buckets` buckets of `step` from `min`; values below go to an underflow bucket and
    /// values at or past `min + step * buckets` to an overflow bucket.
    pub const fn linear(min: u64, step: u64, buckets: u64) -> Self {
        assert!(step > 0, "a linear histogram needs a step > 0");
        assert!(
            buckets > 0 && buckets <= abi::MAX_LINEAR_BUCKETS,
            "a linear histogram has 1 to 4096 buckets"
        );
        Histogram {
            bind: Binding::unbound(),
            kind: map_kind::HIST_LINEAR,
            params: [min, step, buckets, 0],
            shard_size: ((buckets as usize + 2) * 8 + 63) & !63,
        }
    }

    pub const fn map_kind(&self) -> u32 {
        self.kind
    }

    pub const fn map_params(&self) -> [u64; 4] {
        self.params
    }

    /// The bucket `v` falls in.
    #[inline(always)]
    pub fn bucket(&self, v: u64) -> usize {
        if self.kind == map_kind::HIST_LOG2 {
            (64 - v.leading_zeros()) as usize
        } else {
            let [min, step, n, _] = self.params;
            if v < min {
                0
            } else {
                1 + ((v - min) / step).min(n) as usize
            }
        }
    }

    #[inline]
    pub fn record(&self, v: u64) {
        if let Some(h) = self.bind.get() {
            let at = MAP_HEADER + shard() * self.shard_size + 8 * self.bucket(v);
            // SAFETY: `bucket` is below the bucket count the shard was sized for.
            atomic(unsafe { h.add(at) }).fetch_add(1, Relaxed);
        }
    }

    #[doc(hidden)]
    pub fn binding(&self) -> &Binding {
        &self.bind
    }
}

/// Types a hash map key can be, with how the tracer prints them.
pub trait MapKey: Pod + PartialEq {
    const TYPE: u64;
}

/// Values a hash map accumulates: integers added with wrapping.
pub trait MapValue: Copy {
    const TYPE: u64;
    fn to_bits(self) -> u64;
    fn from_bits(b: u64) -> Self;
}

macro_rules! int_key_value {
    ($ty:expr; $($t:ty),*) => { $(
        impl MapKey for $t { const TYPE: u64 = $ty; }
        impl MapValue for $t {
            const TYPE: u64 = $ty;
            fn to_bits(self) -> u64 { self as u64 }
            fn from_bits(b: u64) -> Self { b as $t }
        }
    )* };
}
int_key_value!(value_type::UNSIGNED; u8, u16, u32, u64, usize);
int_key_value!(value_type::SIGNED; i8, i16, i32, i64, isize);
impl<const N: usize> MapKey for [u8; N] {
    const TYPE: u64 = value_type::BYTES;
}

const EMPTY: u64 = 0;
const CLAIMED: u64 = 1;
const READY: u64 = 2;
/// How long an update waits for another thread to finish writing a key into a slot it
/// claimed, before treating the slot as another key's (a rare duplicate entry, which the
/// reader merges, rather than a wait without bound inside the target).
const CLAIM_SPINS: u32 = 1 << 12;

/// A fixed-capacity map from `K` to a sum of `V`, filled by `add(key, n)`: open addressing
/// with linear probing; a slot is claimed with one compare-and-swap. When all `N` slots
/// hold other keys the update is dropped and counted (a full map scans every slot, so size
/// `N` for the keys expected).
#[repr(C)]
pub struct HashMap<K: MapKey, V: MapValue, const N: usize> {
    bind: Binding,
    _kv: PhantomData<fn(K, V)>,
}

impl<K: MapKey, V: MapValue, const N: usize> HashMap<K, V, N> {
    const SLOT: usize = abi::hash_slot_size(std::mem::size_of::<K>());

    pub const fn new() -> Self {
        assert!(
            N > 0 && N as u64 <= abi::MAX_HASH_CAPACITY,
            "hash map capacity out of range"
        );
        assert!(
            std::mem::size_of::<K>() > 0 && std::mem::size_of::<K>() as u64 <= abi::MAX_KEY_SIZE,
            "hash map key must be 1 to 256 bytes"
        );
        HashMap {
            bind: Binding::unbound(),
            _kv: PhantomData,
        }
    }

    pub const fn map_kind(&self) -> u32 {
        map_kind::HASH
    }

    pub const fn map_params(&self) -> [u64; 4] {
        [std::mem::size_of::<K>() as u64, K::TYPE, N as u64, V::TYPE]
    }

    /// Add `n` to `key`'s value, inserting the key with `n` when absent.
    #[inline]
    pub fn add(&self, key: K, n: V) {
        let Some(h) = self.bind.get() else { return };
        match self.slot_of(h, &key, true) {
            // SAFETY: the value word is the slot's last 8 bytes, inside the storage.
            Some(s) => atomic(unsafe { s.add(Self::SLOT - 8) }).fetch_add(n.to_bits(), Relaxed),
            None => atomic(unsafe { h.add(map_header::DROPS) }).fetch_add(1, Relaxed),
        };
    }

    /// The value of `key`, if present (from inside the pack).
    pub fn get(&self, key: K) -> Option<V> {
        let h = self.bind.get()?;
        let s = self.slot_of(h, &key, false)?;
        // SAFETY: as in `add`.
        Some(V::from_bits(
            atomic(unsafe { s.add(Self::SLOT - 8) }).load(Relaxed),
        ))
    }

    fn slot_of(&self, h: *mut u8, key: &K, insert: bool) -> Option<*mut u8> {
        let kb = bytes_of(key);
        let start = hash(kb) as usize % N;
        for i in 0..N {
            // SAFETY: slot index below N, the capacity the storage was sized for.
            let s = unsafe { h.add(MAP_HEADER + ((start + i) % N) * Self::SLOT) };
            let state = atomic(s);
            let mut st = state.load(Acquire);
            if st == EMPTY && insert {
                match state.compare_exchange(EMPTY, CLAIMED, Acquire, Acquire) {
                    Ok(_) => {
                        // SAFETY: the slot is ours until READY is published; key bytes
                        // follow the state word.
                        unsafe { std::ptr::copy_nonoverlapping(kb.as_ptr(), s.add(8), kb.len()) };
                        state.store(READY, Release);
                        return Some(s);
                    }
                    Err(now) => st = now,
                }
            }
            let mut spins = 0;
            while st == CLAIMED && spins < CLAIM_SPINS {
                std::hint::spin_loop();
                st = state.load(Acquire);
                spins += 1;
            }
            if st == READY {
                // SAFETY: READY was published after the key bytes were written.
                let existing = unsafe { std::slice::from_raw_parts(s.add(8), kb.len()) };
                if existing == kb {
                    return Some(s);
                }
            } else if st == EMPTY {
                return None; // lookups stop at the first empty slot
            }
        }
        None
    }

    #[doc(hidden)]
    pub fn binding(&self) -> &Binding {
        &self.bind
    }
}

impl<K: MapKey, V: MapValue, const N: usize> Default for HashMap<K, V, N> {
    fn default() -> Self {
        Self::new()
    }
}

/// 64-bit mix over 8-byte chunks (keys are small; no allocation, no table).
#[inline(always)]
fn hash(b: &[u8]) -> u64 {
    let mut h: u64 = 0x243f_6a88_85a3_08d3 ^ b.len() as u64;
    for c in b.chunks(8) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
    }
    h
}
