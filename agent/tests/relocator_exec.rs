//! Runs relocated code for real: a function is assembled into an executable mapping,
//! its prologue relocated to a trampoline (1 GiB away, or right next to it) followed by
//! a jump back, and both the trampoline and the patched function must compute what the
//! original computed. Mappings are never writable and executable at the same time.

use agent::relocator::{analyze, relocate, Function, ProbeKind, SelfMemory, PATCH_LEN};
use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction, MemoryOperand, Register};

const PAGE: usize = 4096;
const GIB: u64 = 1 << 30;

/// An anonymous mapping, unmapped on drop.
struct Mapping {
    addr: u64,
    len: usize,
}

impl Mapping {
    fn anywhere(len: usize) -> Mapping {
        Self::map(std::ptr::null_mut(), len, 0).expect("mmap failed")
    }

    /// A mapping at exactly `hint` or one of the few pages after it.
    fn near(hint: u64, len: usize) -> Mapping {
        for i in 0..64u64 {
            let want = hint + i * 0x10_0000;
            if let Some(m) = Self::map(want as *mut libc::c_void, len, libc::MAP_FIXED_NOREPLACE) {
                if m.addr == want {
                    return m;
                }
            }
        }
        panic!("no free address near {hint:#x}");
    }

    fn map(at: *mut libc::c_void, len: usize, extra: libc::c_int) -> Option<Mapping> {
        // SAFETY: an anonymous private mapping; MAP_FIXED_NOREPLACE never replaces an
        // existing mapping, so no memory in use is affected.
        let p = unsafe {
            libc::mmap(
                at,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then(|| Mapping {
            addr: p as u64,
            len,
        })
    }

    fn protect(&self, prot: libc::c_int) {
        // SAFETY: the range is exactly this mapping, which we own.
        let r = unsafe { libc::mprotect(self.addr as *mut libc::c_void, self.len, prot) };
        assert_eq!(r, 0, "mprotect: {}", std::io::Error::last_os_error());
    }

    /// Writes `bytes` at `addr`, switching the mapping to RW and back to RX around it.
    fn write(&self, addr: u64, bytes: &[u8]) {
        assert!(addr >= self.addr && addr + bytes.len() as u64 <= self.addr + self.len as u64);
        self.protect(libc::PROT_READ | libc::PROT_WRITE);
        // SAFETY: the range was checked to be inside this mapping, now writable, and no
        // code from it runs while we write.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len());
        }
        self.protect(libc::PROT_READ | libc::PROT_EXEC);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no code from it runs any more.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

type Fn4 = extern "C" fn(u64, u64, u64, u64) -> u64;

fn call(addr: u64, a: [u64; 4]) -> u64 {
    // SAFETY: `addr` is code we assembled as a System V function of four integer
    // arguments returning in rax, in an executable mapping that outlives the call.
    let f: Fn4 = unsafe { std::mem::transmute::<usize, Fn4>(addr as usize) };
    f(a[0], a[1], a[2], a[3])
}

fn jmp_rel32(from: u64, to: u64) -> [u8; 5] {
    let rel = to.wrapping_sub(from + 5) as i64;
    assert!(i32::try_from(rel).is_ok(), "jump back out of reach");
    let mut b = [0xe9, 0, 0, 0, 0];
    b[1..].copy_from_slice(&(rel as i32).to_le_bytes());
    b
}

fn rip_rel(a: &mut CodeAssembler, code: Code, reg: Register, target: u64) {
    let m = MemoryOperand::with_base_displ(Register::RIP, target as i64);
    a.add_instruction(Instruction::with2(code, reg, m).unwrap())
        .unwrap();
}

/// Assembles `build` at a fresh mapping, relocates its entry to a trampoline `far` or
/// near, and checks results on `inputs` for the original, the trampoline called
/// directly, and the function with the patch installed. Returns the stolen length.
fn check(
    far: bool,
    data: &[u8],
    build: impl Fn(&mut CodeAssembler, u64, u64),
    inputs: &[[u64; 4]],
) -> usize {
    check_with(far, data, build, |_, _| inputs.to_vec())
}

/// [`check`], the inputs made from the addresses of the function and of its data (the
/// data page is executable too).
fn check_with(
    far: bool,
    data: &[u8],
    build: impl Fn(&mut CodeAssembler, u64, u64),
    inputs: impl Fn(u64, u64) -> Vec<[u64; 4]>,
) -> usize {
    let code_map = Mapping::anywhere(2 * PAGE);
    let func = code_map.addr;
    let data_addr = func + PAGE as u64;
    let mut a = CodeAssembler::new(64).unwrap();
    build(&mut a, func, data_addr);
    let code = a.assemble(func).unwrap();
    assert!(code.len() < PAGE);
    code_map.write(func, &code);
    code_map.write(data_addr, data);
    let inputs = &inputs(func, data_addr);

    let expected: Vec<u64> = inputs.iter().map(|&i| call(func, i)).collect();

    let f = Function {
        address: func,
        size: Some(code.len() as u64),
    };
    let stolen = analyze(&f, func, ProbeKind::Entry, &SelfMemory).unwrap();
    assert!(stolen.len >= PATCH_LEN);

    let tramp_map = if far {
        Mapping::near(func + GIB, PAGE)
    } else {
        Mapping::near(func + 2 * PAGE as u64, PAGE)
    };
    let tramp = tramp_map.addr;
    let reloc = relocate(&stolen, tramp).unwrap();
    let mut bytes = reloc.bytes.clone();
    let back = tramp + bytes.len() as u64;
    bytes.extend_from_slice(&jmp_rel32(back, reloc.resume));
    tramp_map.write(tramp, &bytes);

    let via_trampoline: Vec<u64> = inputs.iter().map(|&i| call(tramp, i)).collect();
    assert_eq!(via_trampoline, expected, "trampoline called directly");

    let mut patch = jmp_rel32(stolen.site, tramp).to_vec();
    patch.resize(stolen.len, 0xcc); // leftovers of the stolen bytes are never reached
    code_map.write(stolen.site, &patch);
    let patched: Vec<u64> = inputs.iter().map(|&i| call(func, i)).collect();
    assert_eq!(patched, expected, "patched function");
    // Restoring the original bytes gives the original function back.
    code_map.write(stolen.site, &stolen.original);
    let restored: Vec<u64> = inputs.iter().map(|&i| call(func, i)).collect();
    assert_eq!(restored, expected, "restored function");
    stolen.len
}

const INPUTS: [[u64; 4]; 4] = [
    [0, 0, 0, 0],
    [1, 2, 3, 4],
    [0xdead_beef, 77, 0, 1],
    [u64::MAX, 5, 9, 0],
];

#[test]
fn leaf_of_twelve_bytes() {
    for far in [false, true] {
        let len = check(
            far,
            &[],
            |a, _, _| {
                a.lea(rax, ptr(rsi + rsi)).unwrap();
                a.xor(rax, rdi).unwrap();
                a.add(rax, 7).unwrap();
                a.ret().unwrap();
            },
            &INPUTS,
        );
        assert_eq!(len, 7);
    }
}

#[test]
fn rip_relative_load_from_a_gib_away() {
    let value = 0x1234_5678_9abc_def0u64.to_le_bytes();
    check(
        true,
        &value,
        |a, _, data| {
            rip_rel(a, Code::Mov_r64_rm64, Register::RAX, data);
            rip_rel(a, Code::Lea_r64_m, Register::RCX, data);
            a.add(rax, rdi).unwrap();
            a.sub(rax, rcx).unwrap();
            a.ret().unwrap();
        },
        &INPUTS,
    );
}

#[test]
fn short_conditional_branch_first() {
    let len = check(
        true,
        &[],
        |a, _, _| {
            let mut zero = a.create_label();
            a.test(rdi, rdi).unwrap();
            a.je(zero).unwrap();
            a.mov(eax, 1).unwrap();
            a.ret().unwrap();
            a.set_label(&mut zero).unwrap();
            a.mov(eax, 2).unwrap();
            a.ret().unwrap();
        },
        &INPUTS,
    );
    assert_eq!(len, 5);
}

#[test]
fn trailing_call_returns_into_the_original_code() {
    check(
        true,
        &[],
        |a, _, _| {
            let mut helper = a.create_label();
            a.push(rbx).unwrap();
            a.call(helper).unwrap();
            a.add(rax, 1).unwrap();
            a.pop(rbx).unwrap();
            a.ret().unwrap();
            a.set_label(&mut helper).unwrap();
            a.lea(rax, ptr(rdi + rdi * 2)).unwrap();
            a.ret().unwrap();
        },
        &INPUTS,
    );
}

/// Assembles a function whose code may refer to the helper at the given address.
type Build<'a> = &'a dyn Fn(&mut CodeAssembler, u64);

/// `mov rax, [rsp]; ret`: a callee that returns its own return address.
const RETURN_ADDRESS: [u8; 5] = [0x48, 0x8b, 0x04, 0x24, 0xc3];

/// A trailing indirect call, through a register, through `[rsp+8]` and through a slot
/// relative to `rip`: its callee sees the return address of the original code (the
/// results, that address, are compared with the unpatched function's).
#[test]
fn trailing_indirect_call_returns_into_the_original_code() {
    let forms: [Build; 3] = [
        &|a, _| {
            a.sub(rsp, 8).unwrap();
            a.call(rdi).unwrap();
            a.add(rsp, 8).unwrap();
            a.ret().unwrap();
        },
        &|a, _| {
            // Read after the pushed return address, the operand would find the 0.
            a.push(rdi).unwrap();
            a.push(0).unwrap();
            a.call(qword_ptr(rsp + 8)).unwrap();
            a.add(rsp, 16).unwrap();
            a.ret().unwrap();
        },
        &|a, helper| {
            let mut slot = a.create_label();
            a.sub(rsp, 8).unwrap();
            a.call(qword_ptr(slot)).unwrap();
            a.add(rsp, 8).unwrap();
            a.ret().unwrap();
            a.set_label(&mut slot).unwrap();
            a.dq(&[helper]).unwrap();
        },
    ];
    for form in forms {
        for far in [false, true] {
            check_with(
                far,
                &RETURN_ADDRESS,
                |a, _, helper| form(a, helper),
                |_, helper| vec![[helper, 0, 0, 0]],
            );
        }
    }
}

#[test]
fn endbr64_then_jrcxz() {
    // jrcxz has no rel32 form: the encoder must expand it.
    check(
        true,
        &[],
        |a, _, _| {
            let mut zero = a.create_label();
            a.endbr64().unwrap();
            a.jrcxz(zero).unwrap();
            a.mov(eax, 1).unwrap();
            a.ret().unwrap();
            a.set_label(&mut zero).unwrap();
            a.mov(eax, 2).unwrap();
            a.ret().unwrap();
        },
        &INPUTS,
    );
}

#[test]
fn branch_inside_the_stolen_bytes() {
    // jrcxz over `mov edi,esi` to the `lea`, all three stolen: the branch must stay
    // internal to the trampoline. Result: (rcx == 0 ? rdi : rsi) + rdx.
    let len = check(
        true,
        &[],
        |a, _, _| {
            let mut skip = a.create_label();
            a.jrcxz(skip).unwrap();
            a.mov(edi, esi).unwrap();
            a.set_label(&mut skip).unwrap();
            a.lea(eax, ptr(rdi + rdx)).unwrap();
            a.ret().unwrap();
        },
        &[[5, 7, 100, 0], [5, 7, 100, 1], [1, 2, 3, 4], [9, 8, 7, 0]],
    );
    assert_eq!(len, 7);
}

#[test]
fn jcc_out_of_the_stolen_bytes() {
    // abs(edi) + 1: the `jns` leaves the stolen bytes and lands after the resume point.
    check(
        false,
        &[],
        |a, _, _| {
            let mut pos = a.create_label();
            a.mov(eax, edi).unwrap();
            a.test(eax, eax).unwrap();
            a.jns(pos).unwrap();
            a.neg(eax).unwrap();
            a.set_label(&mut pos).unwrap();
            a.add(eax, 1).unwrap();
            a.ret().unwrap();
        },
        &[[5, 0, 0, 0], [(-5i64) as u64, 0, 0, 0], [0, 0, 0, 0]],
    );
}
