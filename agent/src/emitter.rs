//! Machine code emitter that knows where its code will run, built on iced-x86.
//!
//! Code generation is kept independent of allocation: an [`Emitter`] is created for the
//! address its first byte will execute at, and every call or jump to an absolute target
//! picks, at the moment it is emitted, the best encoding that reaches:
//!
//! | encoding | bytes | needs |
//! |---|---|---|
//! | [`Rel32`](CallEncoding::Rel32): `call/jmp rel32` | 5 | target within +-2 GiB |
//! | [`RipSlot`](CallEncoding::RipSlot): `call/jmp qword [rip+slot]` | 6 | an 8-byte slot in reach, from a [`LiteralPool`] |
//! | [`Abs32`](CallEncoding::Abs32): `mov r11d, imm32` + `call/jmp r11` | 9 | target below 4 GiB |
//! | [`Abs64`](CallEncoding::Abs64): `movabs r11, imm64` + `call/jmp r11` | 13 | nothing |
//!
//! Slots live in a pool the caller provides (the near allocator keeps them in 64-byte lines
//! of their own, never interleaved with code). The register forms clobber the scratch
//! register (`r11` unless changed): trampolines save it before they call, and jumps taken
//! while the probed code owns every register use [`Emitter::jmp_preserving`] instead (a
//! caller may keep a value in `r11` across a call to a function it binds locally). Each emission
//! is counted per encoding, so users can be shown how each probe reaches its handler.

use iced_x86::code_asm::CodeAssembler;
use iced_x86::{Code, Encoder, Instruction, MemoryOperand, OpKind, Register};
use std::fmt;

/// How a call or jump reaches its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum CallEncoding {
    /// `call/jmp rel32`.
    Rel32 = 0,
    /// `call/jmp qword [rip+slot]`.
    RipSlot = 1,
    /// `mov r32, imm32` then `call/jmp r64`.
    Abs32 = 2,
    /// `movabs r64, imm64` then `call/jmp r64`.
    Abs64 = 3,
}

impl CallEncoding {
    pub const ALL: [CallEncoding; 4] = [
        CallEncoding::Rel32,
        CallEncoding::RipSlot,
        CallEncoding::Abs32,
        CallEncoding::Abs64,
    ];

    /// Short name shown to users (`rel32`, `rip-slot`, `abs32`, `abs64`).
    pub fn name(self) -> &'static str {
        match self {
            CallEncoding::Rel32 => "rel32",
            CallEncoding::RipSlot => "rip-slot",
            CallEncoding::Abs32 => "abs32",
            CallEncoding::Abs64 => "abs64",
        }
    }
}

impl TryFrom<u32> for CallEncoding {
    /// The number received, which names no encoding: a tracer and agent built apart.
    type Error = u32;

    fn try_from(v: u32) -> Result<Self, u32> {
        Self::ALL.get(v as usize).copied().ok_or(v)
    }
}

impl fmt::Display for CallEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Number of emissions per encoding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodingCounts([u64; 4]);

impl EncodingCounts {
    pub fn get(&self, e: CallEncoding) -> u64 {
        self.0[e as usize]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub fn add(&mut self, other: &EncodingCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    fn record(&mut self, e: CallEncoding) {
        self.0[e as usize] += 1;
    }
}

impl fmt::Display for EncodingCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = CallEncoding::ALL
            .iter()
            .filter(|&&e| self.get(e) > 0)
            .map(|&e| format!("{e} {}", self.get(e)))
            .collect();
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Which encoding a call or jump gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// The first of rel32, rip-slot, abs32, abs64 that reaches.
    #[default]
    Best,
    /// Exactly this encoding, or an error when it cannot reach (benchmarks and tests).
    Force(CallEncoding),
}

/// Where `call/jmp qword [rip+slot]` finds its 8-byte targets.
pub trait LiteralPool {
    /// The address of an 8-byte slot holding `value`, or `None` when the pool is full.
    fn slot(&mut self, value: u64) -> Option<u64>;
}

/// Why an emission failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmitError {
    /// iced-x86 refused to encode an instruction.
    Encode(String),
    /// A forced encoding cannot reach the target from here.
    Unreachable {
        encoding: CallEncoding,
        from: u64,
        target: u64,
    },
    /// A label was jumped to but never bound.
    UnboundLabel,
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmitError::Encode(e) => write!(f, "cannot encode instruction: {e}"),
            EmitError::Unreachable {
                encoding,
                from,
                target,
            } => write!(f, "{encoding} cannot reach {target:#x} from {from:#x}"),
            EmitError::UnboundLabel => f.write_str("a label was used but never bound"),
        }
    }
}

impl std::error::Error for EmitError {}

impl From<iced_x86::IcedError> for EmitError {
    fn from(e: iced_x86::IcedError) -> Self {
        EmitError::Encode(e.to_string())
    }
}

/// A position in the code that branches can target before it is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Label(usize);

/// Sequential machine code for a known address.
pub struct Emitter<'p> {
    start: u64,
    code: Vec<u8>,
    pool: Option<&'p mut dyn LiteralPool>,
    policy: Policy,
    scratch: Register,
    counts: EncodingCounts,
    labels: Vec<Option<usize>>,
    /// (offset of a rel32 field, offset of the end of its instruction, label)
    fixups: Vec<(usize, usize, Label)>,
}

impl<'p> Emitter<'p> {
    /// An emitter whose first byte will execute at `start`.
    pub fn new(start: u64) -> Self {
        Emitter {
            start,
            code: Vec::with_capacity(256),
            pool: None,
            policy: Policy::Best,
            scratch: Register::R11,
            counts: EncodingCounts::default(),
            labels: Vec::new(),
            fixups: Vec::new(),
        }
    }

    /// Use `pool` for `[rip+slot]` encodings.
    pub fn with_pool(mut self, pool: &'p mut dyn LiteralPool) -> Self {
        self.pool = Some(pool);
        self
    }

    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The 64-bit register the register forms load the target into (default `r11`).
    pub fn with_scratch(mut self, reg: Register) -> Self {
        self.scratch = reg;
        self
    }

    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Address of the next byte.
    pub fn ip(&self) -> u64 {
        self.start + self.code.len() as u64
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn len(&self) -> usize {
        self.code.len()
    }

    pub fn is_empty(&self) -> bool {
        self.code.is_empty()
    }

    pub fn counts(&self) -> &EncodingCounts {
        &self.counts
    }

    /// Append raw bytes (already encoded for this address).
    pub fn bytes(&mut self, b: &[u8]) {
        self.code.extend_from_slice(b);
    }

    /// Pad with the single byte `fill` (`0xcc` for `int3`, `0x90` for `nop`) until the
    /// address is a multiple of `align`.
    pub fn align(&mut self, align: u64, fill: u8) {
        while !self.ip().is_multiple_of(align) {
            self.code.push(fill);
        }
    }

    /// Count a jump already encoded in bytes appended with [`bytes`](Self::bytes) (the
    /// relocator's rewrite of a trailing `call`), so the counts cover every branch.
    pub fn record(&mut self, encoding: CallEncoding) {
        self.counts.record(encoding);
    }

    /// Encode one instruction at the current address.
    pub fn emit(&mut self, instr: &Instruction) -> Result<(), EmitError> {
        let mut enc = Encoder::new(64);
        enc.encode(instr, self.ip())?;
        self.code.extend_from_slice(&enc.take_buffer());
        Ok(())
    }

    /// Assemble straight-line code with iced's assembler at the current address. Branches
    /// inside must target the assembler's own labels; calls and jumps elsewhere go through
    /// [`call`](Self::call) and [`jmp`](Self::jmp).
    pub fn asm(
        &mut self,
        build: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    ) -> Result<(), EmitError> {
        let mut a = CodeAssembler::new(64)?;
        build(&mut a)?;
        // Straight-line code with no label and no RIP-relative operand encodes the same
        // one instruction after the other; the block encoder (set up per call) was a
        // third of the agent's time to prepare 10,000 probes.
        let simple = a.instructions().iter().all(|i| {
            !i.is_ip_rel_memory_operand()
                && (0..i.op_count()).all(|k| {
                    !matches!(
                        i.op_kind(k),
                        OpKind::NearBranch16
                            | OpKind::NearBranch32
                            | OpKind::NearBranch64
                            | OpKind::FarBranch16
                            | OpKind::FarBranch32
                    )
                })
        });
        if simple {
            let mut enc = Encoder::new(64);
            let mut ip = self.ip();
            for i in a.instructions() {
                ip += enc.encode(i, ip)? as u64;
            }
            self.code.extend_from_slice(&enc.take_buffer());
            return Ok(());
        }
        let bytes = a.assemble(self.ip())?;
        self.code.extend_from_slice(&bytes);
        Ok(())
    }

    /// `call target` with the best encoding that reaches; returns the encoding used.
    pub fn call(&mut self, target: u64) -> Result<CallEncoding, EmitError> {
        self.branch(target, true)
    }

    /// `jmp target` with the best encoding that reaches; returns the encoding used. The
    /// register forms clobber the scratch register.
    pub fn jmp(&mut self, target: u64) -> Result<CallEncoding, EmitError> {
        self.branch(target, false)
    }

    /// `jmp target` that touches no register whatever the distance: `rel32` when it
    /// reaches, else `jmp qword [rip+0]` with the target right after it. For jumps taken
    /// while every register belongs to the probed code (the policy does not apply).
    pub fn jmp_preserving(&mut self, target: u64) -> Result<CallEncoding, EmitError> {
        if rel32_fits(self.ip() + 5, target) {
            self.branch_with(target, false, CallEncoding::Rel32)?;
            return Ok(CallEncoding::Rel32);
        }
        self.bytes(&[0xff, 0x25, 0, 0, 0, 0]);
        self.bytes(&target.to_le_bytes());
        self.counts.record(CallEncoding::RipSlot);
        Ok(CallEncoding::RipSlot)
    }

    /// Emit a call or jump with exactly `encoding`, if it reaches.
    pub fn branch_with(
        &mut self,
        target: u64,
        call: bool,
        encoding: CallEncoding,
    ) -> Result<(), EmitError> {
        let ip = self.ip();
        let form = match encoding {
            CallEncoding::Rel32 => rel32_form(ip, target, call)?,
            CallEncoding::RipSlot => {
                let slot = self.pool.as_mut().and_then(|p| p.slot(target));
                slot_form(ip, slot, call)?
            }
            CallEncoding::Abs32 | CallEncoding::Abs64 => {
                register_form(self.scratch, target, call, encoding)?
            }
        };
        let Some(instrs) = form else {
            return Err(EmitError::Unreachable {
                encoding,
                from: ip,
                target,
            });
        };
        for i in &instrs {
            self.emit(i)?;
        }
        self.counts.record(encoding);
        Ok(())
    }

    fn branch(&mut self, target: u64, call: bool) -> Result<CallEncoding, EmitError> {
        let order: &[CallEncoding] = match self.policy {
            Policy::Best => &CallEncoding::ALL,
            Policy::Force(e) => &[e][..],
        };
        let mut last = None;
        for &e in order {
            match self.branch_with(target, call, e) {
                Ok(()) => return Ok(e),
                Err(err @ EmitError::Unreachable { .. }) => last = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last.expect("abs64 always reaches"))
    }

    /// A new, unbound label.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Bind `label` to the current address.
    pub fn bind(&mut self, label: Label) {
        self.labels[label.0] = Some(self.code.len());
    }

    /// `jmp label` (rel32).
    pub fn jmp_label(&mut self, label: Label) {
        self.code.extend_from_slice(&[0xe9, 0, 0, 0, 0]);
        let end = self.code.len();
        self.fixups.push((end - 4, end, label));
    }

    /// `call label` (rel32): a call within the emitted code.
    pub fn call_label(&mut self, label: Label) {
        self.code.extend_from_slice(&[0xe8, 0, 0, 0, 0]);
        let end = self.code.len();
        self.fixups.push((end - 4, end, label));
    }

    /// `jcc label` (rel32), `cc` being the condition nibble (`0x4` = e/z, `0x5` = ne/nz,
    /// ...): the encoding is `0f 8cc rel32`.
    pub fn jcc_label(&mut self, cc: u8, label: Label) {
        self.code
            .extend_from_slice(&[0x0f, 0x80 | (cc & 0xf), 0, 0, 0, 0]);
        let end = self.code.len();
        self.fixups.push((end - 4, end, label));
    }

    /// A rel32 displacement to `label`, counted from the end of these four bytes: ends
    /// an instruction such as `call qword ptr [rip+label]` (`ff 15`) whose last field it is.
    pub fn disp32_label(&mut self, label: Label) {
        self.code.extend_from_slice(&[0, 0, 0, 0]);
        let end = self.code.len();
        self.fixups.push((end - 4, end, label));
    }

    /// Resolve labels and return the code.
    pub fn finish(mut self) -> Result<Vec<u8>, EmitError> {
        for &(at, end, label) in &self.fixups {
            let target = self.labels[label.0].ok_or(EmitError::UnboundLabel)?;
            let rel = (target as i64 - end as i64) as i32;
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        Ok(self.code)
    }
}

/// `call/jmp rel32` from `ip` to `target`; None when it does not reach.
fn rel32_form(
    ip: u64,
    target: u64,
    call: bool,
) -> Result<Option<Vec<Instruction>>, iced_x86::IcedError> {
    if !rel32_fits(ip + 5, target) {
        return Ok(None);
    }
    let code = if call {
        Code::Call_rel32_64
    } else {
        Code::Jmp_rel32_64
    };
    Ok(Some(vec![Instruction::with_branch(code, target)?]))
}

/// `call/jmp qword [rip+slot]` from `ip`; None without a slot or when it does not reach.
fn slot_form(
    ip: u64,
    slot: Option<u64>,
    call: bool,
) -> Result<Option<Vec<Instruction>>, iced_x86::IcedError> {
    let slot = match slot {
        Some(s) if rel32_fits(ip + 6, s) => s,
        _ => return Ok(None),
    };
    let code = if call {
        Code::Call_rm64
    } else {
        Code::Jmp_rm64
    };
    let mem = MemoryOperand::with_base_displ(Register::RIP, slot as i64);
    Ok(Some(vec![Instruction::with1(code, mem)?]))
}

/// `mov r32, imm32` (`Abs32`, None when `target` is above 4 GiB) or `movabs r64, imm64`
/// (`Abs64`) into the scratch register `r`, then `call/jmp r`.
fn register_form(
    r: Register,
    target: u64,
    call: bool,
    encoding: CallEncoding,
) -> Result<Option<Vec<Instruction>>, iced_x86::IcedError> {
    let load = if encoding == CallEncoding::Abs32 {
        let Ok(imm) = u32::try_from(target) else {
            return Ok(None);
        };
        Instruction::with2(Code::Mov_r32_imm32, reg32(r), imm)?
    } else {
        Instruction::with2(Code::Mov_r64_imm64, r, target)?
    };
    let code = if call {
        Code::Call_rm64
    } else {
        Code::Jmp_rm64
    };
    Ok(Some(vec![load, Instruction::with1(code, r)?]))
}

/// Whether `target` is reachable by a rel32 displacement counted from `next_ip`.
pub fn rel32_fits(next_ip: u64, target: u64) -> bool {
    i32::try_from(target.wrapping_sub(next_ip) as i64).is_ok()
}

fn reg32(r: Register) -> Register {
    r.full_register32()
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind};

    struct VecPool {
        base: u64,
        values: Vec<u64>,
    }

    impl LiteralPool for VecPool {
        fn slot(&mut self, value: u64) -> Option<u64> {
            self.values.push(value);
            Some(self.base + 8 * (self.values.len() as u64 - 1))
        }
    }

    fn decode(ip: u64, code: &[u8]) -> Vec<Instruction> {
        Decoder::with_ip(64, code, ip, DecoderOptions::NONE)
            .into_iter()
            .collect()
    }

    #[test]
    fn best_encoding_by_distance() {
        let ip = 0x5555_0000_0000;
        let mut pool = VecPool {
            base: ip + 0x1000,
            values: vec![],
        };
        let mut e = Emitter::new(ip).with_pool(&mut pool);
        assert_eq!(e.call(ip + 0x100).unwrap(), CallEncoding::Rel32);
        assert_eq!(e.call(0x7f00_0000_0000).unwrap(), CallEncoding::RipSlot);
        assert_eq!(e.counts().get(CallEncoding::Rel32), 1);
        assert_eq!(e.counts().get(CallEncoding::RipSlot), 1);
        let code = e.finish().unwrap();
        let ins = decode(ip, &code);
        assert_eq!(ins[0].near_branch_target(), ip + 0x100);
        assert_eq!(ins[1].mnemonic(), Mnemonic::Call);
        assert!(ins[1].is_ip_rel_memory_operand());
        assert_eq!(ins[1].ip_rel_memory_address(), ip + 0x1000);
        assert_eq!(pool.values, vec![0x7f00_0000_0000]);
    }

    #[test]
    fn without_pool_falls_to_register_forms() {
        let ip = 0x5555_0000_0000;
        let mut e = Emitter::new(ip);
        assert_eq!(e.call(0x4000_0000).unwrap(), CallEncoding::Abs32);
        assert_eq!(e.jmp(0x7f00_0000_1234).unwrap(), CallEncoding::Abs64);
        let code = e.finish().unwrap();
        assert_eq!(code.len(), 9 + 13);
        let ins = decode(ip, &code);
        assert_eq!(ins[0].code(), Code::Mov_r32_imm32);
        assert_eq!(ins[0].op0_register(), Register::R11D);
        assert_eq!(ins[0].immediate32(), 0x4000_0000);
        assert_eq!(ins[1].code(), Code::Call_rm64);
        assert_eq!(ins[2].code(), Code::Mov_r64_imm64);
        assert_eq!(ins[2].immediate64(), 0x7f00_0000_1234);
        assert_eq!(ins[3].code(), Code::Jmp_rm64);
        assert_eq!(ins[3].op0_kind(), OpKind::Register);
    }

    #[test]
    fn forced_encodings_and_their_limits() {
        let ip = 0x1000_0000;
        let mut e = Emitter::new(ip).with_policy(Policy::Force(CallEncoding::Abs64));
        assert_eq!(e.call(ip + 16).unwrap(), CallEncoding::Abs64);
        e.set_policy(Policy::Force(CallEncoding::Rel32));
        assert!(matches!(
            e.call(0x7f00_0000_0000),
            Err(EmitError::Unreachable { .. })
        ));
        e.set_policy(Policy::Force(CallEncoding::Abs32));
        assert!(e.call(0x1_0000_0000).is_err());
        assert!(e.call(0xffff_ffff).is_ok());
        e.set_policy(Policy::Force(CallEncoding::RipSlot));
        assert!(e.call(0x1234).is_err(), "no pool: no slot");
    }

    #[test]
    fn labels_resolve_forward_and_back() {
        let ip = 0x40_0000;
        let mut e = Emitter::new(ip);
        let top = e.label();
        let out = e.label();
        e.bind(top);
        e.jcc_label(0x4, out);
        e.jmp_label(top);
        e.bind(out);
        e.bytes(&[0xc3]);
        let code = e.finish().unwrap();
        let ins = decode(ip, &code);
        assert_eq!(ins[0].near_branch_target(), ip + 11);
        assert_eq!(ins[1].near_branch_target(), ip);
    }

    #[test]
    fn asm_blocks_encode_at_the_current_address() {
        use iced_x86::code_asm::*;
        let ip = 0x7000_0000_0000;
        let mut e = Emitter::new(ip);
        e.bytes(&[0x90]);
        let mem = MemoryOperand::with_base_displ(Register::RIP, 0x7000_0000_0100);
        e.emit(&Instruction::with2(Code::Lea_r64_m, Register::RAX, mem).unwrap())
            .unwrap();
        e.asm(|a| {
            a.mov(rax, qword_ptr(rsp + 8))?;
            a.ret()
        })
        .unwrap();
        let code = e.finish().unwrap();
        let ins = decode(ip, &code);
        assert_eq!(ins[1].ip_rel_memory_address(), 0x7000_0000_0100);
        assert_eq!(ins[2].ip(), ip + 8);
        assert_eq!(ins[3].mnemonic(), Mnemonic::Ret);
    }
}
