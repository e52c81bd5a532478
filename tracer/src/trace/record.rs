//! Decoding the agent's call records (`probes::trace`) and matching entries with returns
//! per thread.

use super::signature::CopiedStr;
use probes::trace::{RecordKind, RECORD_HEAD, STR_HEAD};

/// One decoded record.
#[derive(Clone, Debug)]
pub struct Record {
    pub kind: RecordKind,
    pub probe: u32,
    pub tid: u32,
    /// Open calls of the thread below this one (see `probes::trace::RecordHead::depth`).
    pub depth: u32,
    pub tsc: u64,
    pub regs: [u64; 6],
    pub fregs: [u64; 4],
    /// (argument, or `STR_RETURN`; the copy)
    pub strings: Vec<(u8, CopiedStr)>,
}

fn word(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// A record's payload, checked: the target can write anything into the ring.
pub fn decode(b: &[u8]) -> Result<Record, String> {
    if b.len() < RECORD_HEAD {
        return Err(format!("call record of {} bytes", b.len()));
    }
    let w0 = word(b, 0);
    let kind = RecordKind::from_u8(w0 as u8)
        .ok_or_else(|| format!("call record of unknown kind {}", w0 as u8))?;
    let count = (w0 >> 8) as u8;
    let mut regs = [0; 6];
    let mut fregs = [0; 4];
    for (i, r) in regs.iter_mut().enumerate() {
        *r = word(b, 3 + i);
    }
    for (i, r) in fregs.iter_mut().enumerate() {
        *r = word(b, 9 + i);
    }
    let mut strings = Vec::new();
    let mut at = RECORD_HEAD;
    for _ in 0..count {
        let h = b
            .get(at..at + STR_HEAD)
            .ok_or("call record cut inside a string")?;
        let len = u16::from_le_bytes([h[2], h[3]]) as usize;
        let bytes = b
            .get(at + STR_HEAD..at + STR_HEAD + len)
            .ok_or("call record cut inside a string")?;
        strings.push((
            h[0],
            CopiedStr {
                bytes: bytes.to_vec(),
                flags: h[1],
            },
        ));
        at += STR_HEAD + len;
    }
    Ok(Record {
        kind,
        probe: (w0 >> 32) as u32,
        tid: word(b, 1) as u32,
        depth: (word(b, 1) >> 32) as u32,
        tsc: word(b, 2),
        regs,
        fregs,
        strings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_the_agent_writes_and_refuses_short_strings() {
        let mut b = vec![0u8; RECORD_HEAD];
        b[0] = RecordKind::Entry as u8;
        b[1] = 1;
        b[4..8].copy_from_slice(&7u32.to_le_bytes());
        b[8..12].copy_from_slice(&42u32.to_le_bytes());
        b[16..24].copy_from_slice(&1000u64.to_le_bytes());
        b[24..32].copy_from_slice(&5u64.to_le_bytes());
        b.extend_from_slice(&[0, 0, 3, 0]);
        b.extend_from_slice(b"abc");
        let r = decode(&b).expect("decodes");
        assert_eq!((r.probe, r.tid, r.tsc, r.regs[0]), (7, 42, 1000, 5));
        assert_eq!(r.strings[0].1.bytes, b"abc");
        assert!(decode(&b[..b.len() - 1]).is_err());
        b[0] = 9;
        assert!(decode(&b).is_err());
    }
}
