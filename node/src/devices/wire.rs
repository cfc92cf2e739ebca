//! Sightings on the gossip plane: conversion between the registry's types and protobuf, with the
//! bounds a member's message must keep (a registry entry stays small whoever sent it).

use hubmesh_proto::pb;

use super::registry::{Description, Sighting};

/// Longest device id.
pub(crate) const MAX_ID: usize = 256;
/// Longest name or kind.
pub(crate) const MAX_TEXT: usize = 256;
/// Most addresses of one device, and the longest.
pub(crate) const MAX_ADDRESSES: usize = 16;
const MAX_ADDRESS: usize = 64;
/// Most properties of one device, and the longest key and value.
pub(crate) const MAX_PROPERTIES: usize = 32;
const MAX_KEY: usize = 64;
const MAX_VALUE: usize = 255;

/// What is wrong with a sighting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum WireError {
    #[error("the device id is empty or longer than {MAX_ID} bytes")]
    Id,
    #[error("the name or kind is longer than {MAX_TEXT} bytes")]
    Text,
    #[error("more than {MAX_ADDRESSES} addresses, or one longer than {MAX_ADDRESS} bytes")]
    Addresses,
    #[error("more than {MAX_PROPERTIES} properties, or a key over {MAX_KEY} or a value over {MAX_VALUE} bytes")]
    Properties,
    #[error("version 0 is never written")]
    Version,
}

/// Checks a description against the bounds (also what discovery may put in one).
pub(crate) fn check(device: &str, d: &Description) -> Result<(), WireError> {
    if device.is_empty() || device.len() > MAX_ID {
        return Err(WireError::Id);
    }
    if d.name.len() > MAX_TEXT || d.kind.len() > MAX_TEXT {
        return Err(WireError::Text);
    }
    if d.addresses.len() > MAX_ADDRESSES || d.addresses.iter().any(|a| a.len() > MAX_ADDRESS) {
        return Err(WireError::Addresses);
    }
    if d.properties.len() > MAX_PROPERTIES || d.properties.iter().any(|(k, v)| k.len() > MAX_KEY || v.len() > MAX_VALUE)
    {
        return Err(WireError::Properties);
    }
    Ok(())
}

/// A device id within [`MAX_ID`]: a longer one (a UDN or TXT id a device may make as long as a
/// datagram) keeps its start and ends in a hash of the whole, so it stays stable and distinct.
pub(crate) fn bounded_id(id: &str) -> String {
    if id.len() <= MAX_ID {
        return id.to_owned();
    }
    let hash = blake3::hash(id.as_bytes()).to_hex();
    let mut at = MAX_ID - 1 - hash.len();
    while !id.is_char_boundary(at) {
        at -= 1;
    }
    format!("{}#{hash}", &id[..at])
}

/// Cuts what discovery found down to the bounds (a device may announce more than a registry
/// entry keeps): the first addresses and properties in order, texts cut at a char boundary.
pub(crate) fn fit(mut d: Description) -> Description {
    fn cut(s: &mut String, max: usize) {
        if s.len() > max {
            let mut at = max;
            while !s.is_char_boundary(at) {
                at -= 1;
            }
            s.truncate(at);
        }
    }
    cut(&mut d.name, MAX_TEXT);
    cut(&mut d.kind, MAX_TEXT);
    d.addresses = d.addresses.into_iter().filter(|a| a.len() <= MAX_ADDRESS).take(MAX_ADDRESSES).collect();
    d.properties = d
        .properties
        .into_iter()
        .filter(|(k, _)| k.len() <= MAX_KEY)
        .map(|(k, mut v)| {
            cut(&mut v, MAX_VALUE);
            (k, v)
        })
        .take(MAX_PROPERTIES)
        .collect();
    d
}

pub(crate) fn to_pb(device: &str, s: &Sighting) -> pb::DeviceSighting {
    pb::DeviceSighting {
        device: device.to_owned(),
        version: s.version,
        at_ms: s.at_ms,
        present: s.present,
        name: s.description.name.clone(),
        kind: s.description.kind.clone(),
        addresses: s.description.addresses.iter().cloned().collect(),
        properties: s.description.properties.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

pub(crate) fn from_pb(s: pb::DeviceSighting) -> Result<(String, Sighting), WireError> {
    let description = Description {
        name: s.name,
        kind: s.kind,
        addresses: s.addresses.into_iter().collect(),
        properties: s.properties.into_iter().collect(),
    };
    check(&s.device, &description)?;
    if s.version == 0 {
        return Err(WireError::Version);
    }
    Ok((s.device, Sighting { version: s.version, at_ms: s.at_ms, present: s.present, description }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sighting() -> Sighting {
        let description = Description {
            name: "Hall lamp".into(),
            kind: "_hap._tcp".into(),
            addresses: ["10.0.0.5:80".to_owned(), "[fe80::1]:80".to_owned()].into(),
            properties: [("id".to_owned(), "AA:BB".to_owned())].into(),
        };
        Sighting { version: 7, at_ms: 1234, present: true, description }
    }

    #[test]
    fn a_sighting_survives_the_wire() {
        let s = sighting();
        assert_eq!(from_pb(to_pb("mdns:_hap._tcp/lamp", &s)), Ok(("mdns:_hap._tcp/lamp".to_owned(), s)));
    }

    #[test]
    fn an_oversized_or_empty_sighting_is_refused_and_fit_makes_any_one_pass() {
        let mut big = sighting();
        big.description.name = "é".repeat(MAX_TEXT);
        big.description.addresses = (0..40).map(|i| format!("10.0.0.{i}:80")).collect();
        big.description.properties = (0..40).map(|i| (format!("k{i}"), "v".repeat(400))).collect();
        assert_eq!(from_pb(to_pb("lamp", &big)), Err(WireError::Text));
        assert_eq!(from_pb(to_pb("", &sighting())), Err(WireError::Id));
        assert_eq!(from_pb(to_pb(&"x".repeat(MAX_ID + 1), &sighting())), Err(WireError::Id));
        let mut zero = to_pb("lamp", &sighting());
        zero.version = 0;
        assert_eq!(from_pb(zero), Err(WireError::Version));
        let long = format!("ssdp:uuid:{}", "é".repeat(300));
        let bounded = bounded_id(&long);
        assert!(bounded.len() <= MAX_ID && bounded.starts_with("ssdp:uuid:é"), "{bounded}");
        assert_eq!(bounded, bounded_id(&long), "stable");
        assert_ne!(bounded, bounded_id(&format!("{long}x")), "distinct");
        assert_eq!(bounded_id("mdns:_hap._tcp/lamp"), "mdns:_hap._tcp/lamp");
        let fitted = fit(big.description);
        assert_eq!(check("lamp", &fitted), Ok(()));
        assert_eq!(fitted.addresses.len(), MAX_ADDRESSES);
        assert_eq!(fitted.properties.len(), MAX_PROPERTIES);
    }
}
