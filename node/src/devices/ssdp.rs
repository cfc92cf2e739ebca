//! SSDP (UPnP discovery) messages: what a hub reads from 239.255.255.250:1900 and what it sends
//! to search (docs/plans/devices.md §4). Pure: parsing and building only. A device is known by its
//! UDN (the `uuid:…` before `::` in its USN), never by its address.

use thiserror::Error;

/// The multicast group and port of SSDP.
pub(crate) const GROUP: std::net::SocketAddrV4 =
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(239, 255, 255, 250), 1900);
/// The largest datagram read (real ones are well under 1 KiB).
pub(crate) const MAX_DATAGRAM: usize = 4096;
/// Longest a device may say its announcement lasts: a longer `max-age` is cut to this (the hub
/// probes again anyway).
const MAX_AGE_CAP_S: u32 = 3600;

/// Why a datagram is not an SSDP message this hub takes.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum SsdpError {
    #[error("the datagram is larger than {MAX_DATAGRAM} bytes")]
    TooLarge,
    #[error("not an SSDP message (start line {0:?})")]
    NotSsdp(String),
    #[error("an M-SEARCH (another searcher), not an announcement")]
    Search,
    #[error("no USN with a uuid")]
    NoUdn,
    #[error("unknown NTS {0:?}")]
    UnknownNts(String),
}

/// What an SSDP message says about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Announcement {
    /// `NOTIFY ssdp:alive` or a search response: it is there, for `max_age_s`.
    Alive { udn: String, kind: String, location: Option<String>, server: Option<String>, max_age_s: u32 },
    /// `NOTIFY ssdp:byebye`: it left cleanly.
    ByeBye { udn: String, kind: String },
}

impl Announcement {
    /// The registry's id of the device.
    pub(crate) fn device_id(&self) -> String {
        let (Self::Alive { udn, .. } | Self::ByeBye { udn, .. }) = self;
        format!("ssdp:{udn}")
    }
}

/// Parses one datagram.
pub(crate) fn parse(datagram: &[u8]) -> Result<Announcement, SsdpError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(SsdpError::TooLarge);
    }
    let text = String::from_utf8_lossy(datagram);
    let mut lines = text.split('\n').map(str::trim);
    let start = lines.next().unwrap_or_default();
    let upper = start.to_ascii_uppercase();
    if upper.starts_with("M-SEARCH") {
        return Err(SsdpError::Search);
    }
    let notify = upper == "NOTIFY * HTTP/1.1";
    if !notify && !upper.starts_with("HTTP/1.1 200") {
        return Err(SsdpError::NotSsdp(start.chars().take(40).collect()));
    }
    let headers: Vec<(&str, &str)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim(), v.trim())).collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| (*v).to_owned());
    let usn = header("USN").unwrap_or_default();
    // `get`, not an index: byte 5 of what a stranger sent may fall inside a character.
    let udn =
        usn.split("::").next().filter(|u| u.len() > 5 && u.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("uuid:")));
    let Some(udn) = udn.map(|u| u.to_ascii_lowercase()) else { return Err(SsdpError::NoUdn) };
    // A search response names its type in ST, an announcement in NT.
    let kind = header(if notify { "NT" } else { "ST" }).unwrap_or_default();
    if notify {
        match header("NTS").unwrap_or_default().to_ascii_lowercase().as_str() {
            "ssdp:alive" | "ssdp:update" => {}
            "ssdp:byebye" => return Ok(Announcement::ByeBye { udn, kind }),
            other => return Err(SsdpError::UnknownNts(other.chars().take(40).collect())),
        }
    }
    let max_age_s = header("CACHE-CONTROL")
        .and_then(|c| {
            c.split(',').find_map(|d| {
                let (k, v) = d.split_once('=')?;
                k.trim().eq_ignore_ascii_case("max-age").then(|| v.trim().parse::<u32>().ok())?
            })
        })
        .unwrap_or(1800)
        .min(MAX_AGE_CAP_S);
    Ok(Announcement::Alive { udn, kind, location: header("LOCATION"), server: header("SERVER"), max_age_s })
}

/// An M-SEARCH for `target` (`ssdp:all` for everything), answered within `mx_s` seconds.
pub(crate) fn search(target: &str, mx_s: u8) -> Vec<u8> {
    format!(
        "M-SEARCH * HTTP/1.1\r\nHOST: {GROUP}\r\nMAN: \"ssdp:discover\"\r\nMX: {}\r\nST: {target}\r\n\r\n",
        mx_s.clamp(1, 5)
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIVE: &str = "NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nCACHE-CONTROL: max-age=100\r\n\
        LOCATION: http://192.168.1.20:80/description.xml\r\nNT: urn:schemas-upnp-org:device:basic:1\r\n\
        NTS: ssdp:alive\r\nSERVER: Linux/3.14.0 UPnP/1.0 IpBridge/1.48.0\r\n\
        USN: uuid:2f402f80-da50-11e1-9b23-001788255acc::urn:schemas-upnp-org:device:basic:1\r\n\r\n";

    #[test]
    fn an_announcement_names_its_device_by_udn_not_address() {
        let a = parse(ALIVE.as_bytes()).unwrap();
        assert_eq!(a.device_id(), "ssdp:uuid:2f402f80-da50-11e1-9b23-001788255acc");
        let Announcement::Alive { kind, location, max_age_s, .. } = &a else { panic!("{a:?}") };
        assert_eq!((kind.as_str(), max_age_s), ("urn:schemas-upnp-org:device:basic:1", &100));
        assert_eq!(location.as_deref(), Some("http://192.168.1.20:80/description.xml"));
        // The same device answering a search from another address is the same id.
        let response = "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=99999\r\nST: upnp:rootdevice\r\n\
            USN: UUID:2F402F80-DA50-11E1-9B23-001788255ACC::upnp:rootdevice\r\nLOCATION: http://10.0.0.9/d.xml\r\n\r\n";
        let r = parse(response.as_bytes()).unwrap();
        assert_eq!(r.device_id(), a.device_id());
        assert!(matches!(r, Announcement::Alive { max_age_s: MAX_AGE_CAP_S, .. }), "capped: {r:?}");
    }

    #[test]
    fn a_byebye_says_the_device_left() {
        let bye = ALIVE.replace("ssdp:alive", "ssdp:byebye");
        assert!(matches!(parse(bye.as_bytes()), Ok(Announcement::ByeBye { .. })));
    }

    #[test]
    fn what_is_not_an_announcement_is_refused() {
        assert_eq!(parse(&search("ssdp:all", 2)), Err(SsdpError::Search));
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n\r\n"), Err(SsdpError::NotSsdp(_))));
        assert!(matches!(parse(&[0xff; 64]), Err(SsdpError::NotSsdp(_))));
        assert_eq!(parse(&vec![b'a'; MAX_DATAGRAM + 1]), Err(SsdpError::TooLarge));
        assert_eq!(parse(ALIVE.replace("USN: uuid:", "USN: x:").as_bytes()), Err(SsdpError::NoUdn));
        assert!(matches!(parse(ALIVE.replace("ssdp:alive", "ssdp:odd").as_bytes()), Err(SsdpError::UnknownNts(_))));
        assert_eq!(parse(b""), Err(SsdpError::NotSsdp(String::new())));
        // Found by the fuzzer: a USN whose fifth byte falls inside a character (a panic before).
        assert_eq!(parse(ALIVE.replace("USN: uuid:", "USN: uui\u{20ac}:").as_bytes()), Err(SsdpError::NoUdn));
    }

    #[test]
    fn a_search_is_a_well_formed_m_search() {
        let s = String::from_utf8(search("ssdp:all", 9)).unwrap();
        assert!(s.starts_with("M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n"), "{s}");
        assert!(s.contains("MX: 5\r\n") && s.ends_with("ST: ssdp:all\r\n\r\n"), "{s}");
    }
}
