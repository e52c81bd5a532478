//! Event records written by `emit!`.
//!
//! After the ring header: `u32` format id, `u8` argument count, 3 bytes of zero, one type
//! byte per argument (8 bytes, so at most [`MAX_ARGS`]), then each argument: scalars as 8
//! bytes, strings as an 8-byte length then the bytes, padded to 8. Strings are cut at
//! [`MAX_STR`] bytes. The tracer formats the record with the format string of the
//! descriptor whose id matches.

use super::ring::RING;
use crate::mem::StrBuf;

pub const MAX_ARGS: usize = 8;
pub const MAX_STR: usize = 256;

pub mod tag {
    pub const U64: u8 = 1;
    pub const I64: u8 = 2;
    pub const F64: u8 = 3;
    pub const BOOL: u8 = 4;
    pub const STR: u8 = 5;
}

/// A value `emit!` can record.
pub trait EmitArg {
    fn tag(&self) -> u8;
    /// Bytes taken in the record (a multiple of 8).
    fn size(&self) -> usize {
        8
    }
    /// Write `size()` bytes.
    fn write(&self, dst: &mut [u8]);
}

macro_rules! scalar {
    ($tag:expr, $conv:expr; $($t:ty),*) => { $(
        #[allow(clippy::unnecessary_cast)] // the same conversion serves every width
        impl EmitArg for $t {
            fn tag(&self) -> u8 { $tag }
            fn write(&self, dst: &mut [u8]) {
                let f: fn($t) -> u64 = $conv;
                dst[..8].copy_from_slice(&f(*self).to_le_bytes());
            }
        }
    )* };
}
scalar!(tag::U64, |v| v as u64; u8, u16, u32, u64, usize);
scalar!(tag::I64, |v| v as i64 as u64; i8, i16, i32, i64, isize);
scalar!(tag::F64, |v| (v as f64).to_bits(); f32, f64);
scalar!(tag::BOOL, |v| v as u64; bool);

fn str_size(s: &[u8]) -> usize {
    8 + ((s.len().min(MAX_STR) + 7) & !7)
}

fn str_write(s: &[u8], dst: &mut [u8]) {
    let n = s.len().min(MAX_STR);
    dst[..8].copy_from_slice(&(n as u64).to_le_bytes());
    dst[8..8 + n].copy_from_slice(&s[..n]);
    dst[8 + n..str_size(s)].fill(0);
}

macro_rules! string {
    ($($t:ty),*) => { $(
        impl EmitArg for $t {
            fn tag(&self) -> u8 { tag::STR }
            fn size(&self) -> usize { str_size(self.as_bytes()) }
            fn write(&self, dst: &mut [u8]) { str_write(self.as_bytes(), dst) }
        }
    )* };
}
string!(&str, StrBuf);

impl<T: EmitArg> EmitArg for &T {
    fn tag(&self) -> u8 {
        (**self).tag()
    }
    fn size(&self) -> usize {
        (**self).size()
    }
    fn write(&self, dst: &mut [u8]) {
        (**self).write(dst)
    }
}

/// Write one record; called by `emit!`. Returns false when the record was dropped.
#[inline]
pub fn emit(id: u32, args: &[&dyn EmitArg]) -> bool {
    let args = &args[..args.len().min(MAX_ARGS)];
    let len = 16 + args.iter().map(|a| a.size()).sum::<usize>();
    let Some(mut e) = RING.reserve(len) else {
        return false;
    };
    let b = e.bytes();
    b[..4].copy_from_slice(&id.to_le_bytes());
    b[4] = args.len() as u8;
    b[5..16].fill(0);
    let mut at = 16;
    for (i, a) in args.iter().enumerate() {
        b[8 + i] = a.tag();
        let n = a.size();
        a.write(&mut b[at..at + n]);
        at += n;
    }
    b[at..].fill(0);
    e.commit();
    true
}

/// Record an event: `emit!("slow malloc: {} ns", ns)`. The format string is stored in the
/// pack's descriptors; the record holds its id and the raw arguments. Supported
/// placeholders: `{}`, `{:x}`, `{:#x}`, `{:?}`. Never blocks: a full ring drops the
/// record and counts it.
#[macro_export]
macro_rules! emit {
    ($fmt:literal $(, $arg:expr)* $(,)?) => {{
        const __NARGS: usize = 0 $(+ { let _ = stringify!($arg); 1 })*;
        const _: () = assert!(
            $crate::pack::abi::placeholders($fmt) == __NARGS,
            "emit!: the number of placeholders differs from the number of arguments"
        );
        const _: () = assert!(__NARGS <= $crate::pack::emit::MAX_ARGS, "emit!: at most 8 arguments");
        const _: () = assert!(
            $crate::pack::abi::placeholders_supported($fmt),
            "emit!: unsupported placeholder: use empty braces, or :? :x :#x inside them"
        );
        const __ID: u32 = $crate::pack::abi::format_id(file!(), line!(), column!(), $fmt);
        #[used]
        #[unsafe(link_section = "tracer_pack")]
        static __DESC: $crate::pack::abi::Descriptor =
            $crate::pack::abi::Descriptor::format(__ID, file!(), line!(), __NARGS as u32, $fmt);
        $crate::pack::emit::emit(__ID, &[$(&$arg as &dyn $crate::pack::emit::EmitArg),*])
    }};
}
