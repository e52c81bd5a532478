//! Refused probes and entries-only notes summed up in one line by reason, as in
//! `53 of 2,198 functions not probed (29 too short, 18 branch into their first bytes,
//! 6 indirect jumps); -v lists them`.
//!
//! The reasons arrive as text (the agent's relocator formats them in the target), so
//! they are classed by the words of their `Display` forms; the tests build every
//! relocator refusal and check its class, so a reworded message cannot fall through to
//! "other" unnoticed.

/// A reason in short words: (one function, several functions).
pub type Class = (&'static str, &'static str);

const OTHER: Class = ("other reason", "other reasons");

/// The short class of a refusal reason.
pub fn refusal_class(reason: &str) -> Class {
    let has = |s: &str| reason.contains(s);
    if has("bytes of the function remain") || (has("ends with") && has("fewer than the")) {
        ("too short", "too short")
    } else if has("jump table") {
        (
            "has a jump table into its first bytes",
            "have jump tables into their first bytes",
        )
    } else if has("could land anywhere") {
        ("has an indirect jump", "have indirect jumps")
    } else if has("out of 32-bit reach") {
        ("refers to code out of reach", "refer to code out of reach")
    } else if has("returns to") && has("the patch would overwrite") {
        (
            "calls out before its first bytes end",
            "call out before their first bytes end",
        )
    } else if has("jumps back to the function's entry") {
        ("loops back to its entry", "loop back to their entries")
    } else if has("goes to") && has("the patch would overwrite") {
        (
            "branches into its first bytes",
            "branch into their first bytes",
        )
    } else if has("refers to") && has("the patch would overwrite") {
        ("refers to its first bytes", "refer to their first bytes")
    } else if has("cannot be moved to a trampoline") {
        (
            "starts with an unmovable instruction",
            "start with unmovable instructions",
        )
    } else if has("not a valid x86-64 instruction") || has("not mapped readable") {
        ("is not readable code", "are not readable code")
    } else if has("is already probed") {
        (
            "is the same code as another probe",
            "are the same code as other probes",
        )
    } else if has("would overlap") {
        ("overlaps another patch", "overlap other patches")
    } else if has("does not resolve the IFUNC") {
        ("is an unresolved IFUNC", "are unresolved IFUNCs")
    } else if has("exception hook") {
        (
            "holds tracer's exception hook",
            "hold tracer's exception hook",
        )
    } else {
        OTHER
    }
}

/// The short class of an entries-only reason (see `probeable::entries_only`).
pub fn entries_only_class(why: &str) -> Class {
    if why.starts_with(".cold fragment") {
        (".cold fragment", ".cold fragments")
    } else if why.starts_with("process entry point") {
        ("process entry point", "process entry points")
    } else if why.starts_with("returns twice") {
        (
            "returns twice or on another stack",
            "return twice or on another stack",
        )
    } else if why.starts_with("entered by jmp") {
        ("entered by jmp", "entered by jmp")
    } else if why.contains("unwinder") {
        ("unwinder walk start", "unwinder walk starts")
    } else {
        OTHER
    }
}

/// `2198` as `2,198`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `29 too short, 18 branch into their first bytes`: counts by class, most first (ties
/// in order of first appearance).
pub fn by_class<'a>(reasons: impl Iterator<Item = &'a str>, class: fn(&str) -> Class) -> String {
    let mut counts: Vec<(Class, usize)> = Vec::new();
    for r in reasons {
        let c = class(r);
        match counts.iter_mut().find(|(k, _)| *k == c) {
            Some((_, n)) => *n += 1,
            None => counts.push((c, 1)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    counts
        .iter()
        .map(|((one, many), n)| format!("{} {}", thousands(*n), if *n == 1 { one } else { many }))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `53 of 2,198 functions not probed (...); -v lists them`.
pub fn refusals_line(reasons: &[&str], total: usize) -> String {
    format!(
        "{} of {} functions not probed ({}); -v lists them",
        thousands(reasons.len()),
        thousands(total),
        by_class(reasons.iter().copied(), refusal_class)
    )
}

/// `4 functions get entries only (3 .cold fragments, 1 process entry point); -v lists
/// them`.
pub fn entries_only_line(whys: &[&str]) -> String {
    format!(
        "{} functions get entries only, not returns ({}); -v lists them",
        thousands(whys.len()),
        by_class(whys.iter().copied(), entries_only_class)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent::relocator::Refusal;
    use iced_x86::Mnemonic;

    #[test]
    fn every_relocator_refusal_has_a_class() {
        let cases = [
            (
                Refusal::FunctionTooShort {
                    site: 0x10,
                    available: 3,
                },
                "too short",
            ),
            (
                Refusal::EndsTooSoon {
                    site: 0x10,
                    address: 0x12,
                    mnemonic: Mnemonic::Ret,
                    covered: 3,
                },
                "too short",
            ),
            (
                Refusal::BranchIntoStolen {
                    from: 0x20,
                    mnemonic: Mnemonic::Jne,
                    target: 0x12,
                    stolen_start: 0x10,
                    stolen_end: 0x15,
                },
                "branches into its first bytes",
            ),
            (
                Refusal::BranchIntoStolen {
                    from: 0x20,
                    mnemonic: Mnemonic::Jne,
                    target: 0x10,
                    stolen_start: 0x10,
                    stolen_end: 0x15,
                },
                "loops back to its entry",
            ),
            (
                Refusal::ReturnIntoStolen {
                    address: 0x10,
                    mnemonic: Mnemonic::Call,
                    returns_to: 0x12,
                },
                "calls out before its first bytes end",
            ),
            (
                Refusal::JumpTableIntoStolen {
                    jump: 0x20,
                    table: 0x40,
                    index: 2,
                    target: 0x12,
                },
                "has a jump table into its first bytes",
            ),
            (
                Refusal::IndirectJump {
                    address: 0x20,
                    mnemonic: Mnemonic::Jmp,
                },
                "has an indirect jump",
            ),
            (
                Refusal::RipRelativeIntoStolen {
                    address: 0x20,
                    mnemonic: Mnemonic::Lea,
                    target: 0x12,
                },
                "refers to its first bytes",
            ),
            (
                Refusal::TooFar {
                    address: 0x10,
                    target: 0x1_0000_0000_0000,
                    new_ip: 0x20,
                },
                "refers to code out of reach",
            ),
            (
                Refusal::Unreadable {
                    address: 0x10,
                    len: 16,
                },
                "is not readable code",
            ),
            (
                Refusal::Undecodable {
                    address: 0x10,
                    bytes: vec![0x0f, 0xff],
                },
                "is not readable code",
            ),
            (
                Refusal::Unrelocatable {
                    address: 0x10,
                    mnemonic: Mnemonic::Syscall,
                    reason: "why",
                },
                "starts with an unmovable instruction",
            ),
        ];
        for (r, class) in cases {
            assert_eq!(refusal_class(&r.to_string()).0, class, "{r}");
        }
    }

    #[test]
    fn one_line_summaries() {
        let reasons = [
            "only 3 bytes of the function remain at 0x10, fewer than the 5 the jump patch needs",
            "the indirect `jmp` at 0x20 could land anywhere in the function, including inside the bytes the patch would overwrite",
            "only 4 bytes of the function remain at 0x30, fewer than the 5 the jump patch needs",
        ];
        assert_eq!(
            refusals_line(&reasons, 2198),
            "3 of 2,198 functions not probed (2 too short, 1 has an indirect jump); -v lists them"
        );
        assert_eq!(
            entries_only_line(&[
                ".cold fragment, entered by jmp",
                "process entry point, [rsp] holds argc, not a return address",
                ".cold fragment, entered by jmp",
            ]),
            "3 functions get entries only, not returns (2 .cold fragments, 1 process entry point); -v lists them"
        );
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
