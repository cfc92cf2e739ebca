//! mDNS goodbyes (RFC 6762 §10.1), read straight off the wire. A device that leaves cleanly
//! sends its PTR record with TTL 0; `mdns-sd`, as the RFC asks of a cache, keeps the record one
//! more second before it reports the removal. The registry wants the leave at once (gone from
//! every hub within a second), so the mDNS handler also listens for goodbyes itself. Pure:
//! [`goodbyes`] parses one datagram.

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

/// The service instances (full names, as `mdns-sd` reports them) whose PTR records `msg`
/// withdraws with TTL 0. Anything that is not a well-formed mDNS response gives none.
pub(crate) fn goodbyes(msg: &[u8]) -> Vec<String> {
    parse(msg).unwrap_or_default()
}

fn parse(msg: &[u8]) -> Option<Vec<String>> {
    let flags = u16_at(msg, 2)?;
    if flags & 0x8000 == 0 {
        return Some(Vec::new()); // a query
    }
    let (questions, answers) = (u16_at(msg, 4)?, u16_at(msg, 6)?);
    let mut at = 12;
    for _ in 0..questions {
        at = name(msg, at)?.1 + 4;
    }
    let mut out = Vec::new();
    for _ in 0..answers {
        let (_, after) = name(msg, at)?;
        let kind = u16_at(msg, after)?;
        let ttl = u32::from_be_bytes(msg.get(after + 4..after + 8)?.try_into().ok()?);
        let len = u16_at(msg, after + 8)? as usize;
        let data = after + 10;
        msg.get(data..data + len)?;
        if kind == PTR && ttl == 0 {
            out.push(name(msg, data)?.0);
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
    fn a_ptr_with_ttl_zero_is_a_goodbye_and_nothing_else_is() {
        assert_eq!(goodbyes(&response(0)), ["lamp-0._hubmesh-dev._tcp.local."]);
        assert!(goodbyes(&response(4500)).is_empty(), "an announcement");
        let mut query = response(0);
        query[2] = 0;
        assert!(goodbyes(&query).is_empty(), "a query");
    }

    #[test]
    fn garbage_truncation_and_pointer_loops_give_nothing() {
        let full = response(0);
        for cut in 0..full.len() {
            assert!(goodbyes(&full[..cut]).is_empty(), "cut at {cut}");
        }
        let mut looped = response(0);
        let at = looped.len() - 2;
        looped[at + 1] = at as u8; // the pointer points at itself
        assert!(goodbyes(&looped).is_empty());
        assert!(goodbyes(&[0xff; 64]).is_empty());
    }
}
