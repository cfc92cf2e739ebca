//! mDNS goodbyes (RFC 6762 §10.1), read straight off the wire. A device that leaves cleanly
//! sends its PTR record with TTL 0; `mdns-sd`, as the RFC asks of a cache, keeps the record one
//! more second before it reports the removal (another responder may still re-assert it). The
//! registry wants the leave at once (gone from every hub within a second), so the mDNS handler
//! also listens itself: a goodbye marks the device gone at once, and a PTR that re-asserts it
//! (TTL above 0) on the same socket brings it back. Pure: [`pointers`] parses one datagram.
//!
//! The socket shares port 5353 with `mdns-sd` and libp2p (`SO_REUSEPORT`): every socket gets
//! each multicast datagram, but a unicast datagram goes to one of them by hash, so a responder's
//! rare unicast answers to this port may land here instead of in `mdns-sd` (which sends no
//! unicast-response queries, so it expects none).

/// The mDNS group and port.
pub(crate) const GROUP: std::net::SocketAddrV4 =
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(224, 0, 0, 251), 5353);
/// Record type PTR.
const PTR: u16 = 12;
/// Most compression pointers one name may follow (a loop of pointers ends here).
const MAX_JUMPS: usize = 32;
/// Longest name (RFC 1035: 255 octets on the wire).
const MAX_NAME: usize = 255;

/// Reads the name at `at` (labels, compression pointers): the name as `mdns-sd` writes it
/// (labels joined by dots, a dot at the end), and where the record goes on.
fn name(msg: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut next = None;
    let mut jumps = 0;
    loop {
        let len = *msg.get(at)? as usize;
        match len & 0xC0 {
            0x00 if len == 0 => {
                return Some((out, next.unwrap_or(at + 1)));
            }
            0x00 => {
                let label = msg.get(at + 1..at + 1 + len)?;
                out.push_str(std::str::from_utf8(label).ok()?);
                out.push('.');
                if out.len() > MAX_NAME + 1 {
                    return None;
                }
                at += 1 + len;
            }
            0xC0 => {
                let target = ((len & 0x3F) << 8) | *msg.get(at + 1)? as usize;
                next.get_or_insert(at + 2);
                jumps += 1;
                if jumps > MAX_JUMPS {
                    return None;
                }
                at = target;
            }
            _ => return None,
        }
    }
}

fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]))
}

/// A PTR record of a response: `owner` (a service type, `_hap._tcp.local.`) points at
/// `target` (an instance's full name, as `mdns-sd` reports it) for `ttl` seconds (0: goodbye).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pointer {
    pub(crate) owner: String,
    pub(crate) target: String,
    pub(crate) ttl: u32,
}

/// The PTR answers of `msg`, an mDNS response from port `from_port`. Anything that is not a
/// well-formed mDNS response (RFC 6762 §18: from port 5353, opcode and rcode 0) gives none.
pub(crate) fn pointers(msg: &[u8], from_port: u16) -> Vec<Pointer> {
    if from_port != GROUP.port() {
        return Vec::new();
    }
    parse(msg).unwrap_or_default()
}

fn parse(msg: &[u8]) -> Option<Vec<Pointer>> {
    let flags = u16_at(msg, 2)?;
    // A response (QR), opcode 0 (bits 11-14), rcode 0 (bits 0-3).
    if flags & 0x8000 == 0 || flags & 0x7800 != 0 || flags & 0x000F != 0 {
        return Some(Vec::new());
    }
    let (questions, answers) = (u16_at(msg, 4)?, u16_at(msg, 6)?);
    let mut at = 12;
    for _ in 0..questions {
        at = name(msg, at)?.1 + 4;
    }
    let mut out = Vec::new();
    for _ in 0..answers {
        let (owner, after) = name(msg, at)?;
        let kind = u16_at(msg, after)?;
        let ttl = u32::from_be_bytes(msg.get(after + 4..after + 8)?.try_into().ok()?);
        let len = u16_at(msg, after + 8)? as usize;
        let data = after + 10;
        msg.get(data..data + len)?;
        if kind == PTR {
            let (target, end) = name(msg, data)?;
            // The target must end within the record (its own labels; a pointer may go anywhere).
            if end > data + len {
                return None;
            }
            out.push(Pointer { owner, target, ttl });
        }
        at = data + len;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response with one PTR answer `_hubmesh-dev._tcp.local. -> lamp-0._hubmesh-dev._tcp.local.`,
    /// the target compressed against the owner name.
    fn response(ttl: u32) -> Vec<u8> {
        let mut m = vec![0, 0, 0x84, 0, 0, 0, 0, 1, 0, 0, 0, 0];
        let owner = m.len();
        for label in ["_hubmesh-dev", "_tcp", "local"] {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&PTR.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&ttl.to_be_bytes());
        let rdata = [&[6u8][..], b"lamp-0", &[0xC0, owner as u8]].concat();
        m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        m.extend_from_slice(&rdata);
        m
    }

    #[test]
    fn a_ptr_answer_says_its_type_instance_and_ttl_and_only_a_proper_response_counts() {
        let ptr = |ttl| Pointer {
            owner: "_hubmesh-dev._tcp.local.".into(),
            target: "lamp-0._hubmesh-dev._tcp.local.".into(),
            ttl,
        };
        assert_eq!(pointers(&response(0), 5353), [ptr(0)], "a goodbye");
        assert_eq!(pointers(&response(4500), 5353), [ptr(4500)], "an announcement");
        assert!(pointers(&response(0), 40000).is_empty(), "not from port 5353");
        let mut query = response(0);
        query[2] = 0;
        assert!(pointers(&query, 5353).is_empty(), "a query");
        let mut refused = response(0);
        refused[3] = 0x05;
        assert!(pointers(&refused, 5353).is_empty(), "an rcode");
        let mut update = response(0);
        update[2] |= 0x28;
        assert!(pointers(&update, 5353).is_empty(), "another opcode");
    }

    #[test]
    fn garbage_truncation_overlong_targets_and_pointer_loops_give_nothing() {
        let full = response(0);
        for cut in 0..full.len() {
            assert!(pointers(&full[..cut], 5353).is_empty(), "cut at {cut}");
        }
        let mut looped = response(0);
        let at = looped.len() - 2;
        looped[at + 1] = at as u8; // the pointer points at itself
        assert!(pointers(&looped, 5353).is_empty());
        let mut short = response(0);
        let rdlength = short.len() - 10; // the record's rdlength, one shorter than its name
        short[rdlength] -= 1;
        assert!(pointers(&short, 5353).is_empty(), "a target running past its record");
        assert!(pointers(&[0xff; 64], 5353).is_empty());
    }
}
