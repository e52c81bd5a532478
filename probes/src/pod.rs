//! Plain old data: types whose every bit pattern is a valid value.
//!
//! Target memory, map keys and event arguments are moved around as bytes. Reinterpreting
//! bytes as a `T` is only sound when any bytes make a valid `T`, which the compiler cannot
//! check, so it is an `unsafe` promise made once per type (as aya's `Pod` does) rather than
//! a safe function that would accept `bool`, references or enums.

/// # Safety
/// Implement only for `Copy` types with no padding, no pointers-with-validity-rules
/// (references, `NonNull`, `Box`), no niche (`bool`, `char`, enums) and `'static`: every
/// byte pattern of `size_of::<Self>()` bytes must be a valid value.
pub unsafe trait Pod: Copy + Send + Sync + 'static {}

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: primitive integers and floats accept every bit pattern.
        unsafe impl Pod for $t {}
    )* };
}
pod!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, f32, f64);

// SAFETY: an array of Pod has no padding between elements and accepts every bit pattern.
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}

/// The bytes of a Pod value.
pub fn bytes_of<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `Pod` guarantees no padding, so every byte of `v` is initialised.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// A Pod value from the first `size_of::<T>()` bytes of `b`, or `None` when `b` is short.
pub fn from_bytes<T: Pod>(b: &[u8]) -> Option<T> {
    if b.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; `Pod` makes any bytes a valid `T`; the read is unaligned.
    Some(unsafe { (b.as_ptr() as *const T).read_unaligned() })
}

/// The bytes of a slice of Pod values.
pub fn bytes_of_slice<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: `Pod` guarantees no padding, so every byte of every element is initialised.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// The Pod values `b` holds back to back, as many whole ones as fit.
pub fn vec_from_bytes<T: Pod>(b: &[u8]) -> Vec<T> {
    b.chunks_exact(std::mem::size_of::<T>())
        .map(|c| from_bytes(c).expect("a whole chunk"))
        .collect()
}
