//! The page log's on-disk format (version 2), its scan, and the migration of version-1 logs.
//!
//! ```text
//! file   := MAGIC record*
//! record := kind:u8 | key_len:u16 | key | data_len:u32 | data | sum:32
//! kind 1 = page      key = blake3(data)     sum = blake3(kind | key | data_len)
//! kind 2 = manifest  key = instance name    sum = blake3(kind | key | data)
//!                    data = n:u32 | n page hashes | manifest bytes
//! kind 3 = tombstone key = instance name    sum = blake3(kind | key)   (the manifest is gone)
//! ```
//! A page's key is the hash of its bytes, so its checksum covers only its header: the bytes are
//! hashed once when they are checked against the key (on scan and on read), never again on write.
//! Version 1 (no magic; every checksum over the whole data, so pages were hashed twice) is read
//! once and rewritten as version 2 when a hub opens it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::{io, Loc, ManifestLoc, PageLogError};
use crate::Hash;

pub(super) const KIND_PAGE: u8 = 1;
pub(super) const KIND_MANIFEST: u8 = 2;
pub(super) const KIND_TOMBSTONE: u8 = 3;
/// The first bytes of a version-2 page log.
pub(super) const MAGIC: &[u8; 8] = b"HMPLOG2\n";
/// Largest record data we accept when scanning (a page or a manifest is far smaller).
const MAX_RECORD: u32 = 64 << 20;

/// Which format a file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    /// Checksums over whole records; no magic.
    V1,
    V2,
}

pub(super) fn checksum(version: Version, kind: u8, key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[kind]);
    h.update(key);
    if kind == KIND_PAGE && version == Version::V2 {
        h.update(&(data.len() as u32).to_le_bytes());
    } else {
        h.update(data);
    }
    *h.finalize().as_bytes()
}

/// Appends a record's head (kind, key, data length) to `out`.
pub(super) fn encode_head(out: &mut Vec<u8>, kind: u8, key: &[u8], data_len: usize) {
    out.push(kind);
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(data_len as u32).to_le_bytes());
}

/// Appends one record (version 2) to `out`; returns where its data sits in `out`.
pub(super) fn encode(out: &mut Vec<u8>, kind: u8, key: &[u8], data: &[&[u8]]) -> Loc {
    let data_len: usize = data.iter().map(|d| d.len()).sum();
    encode_head(out, kind, key, data_len);
    let data_start = out.len();
    for d in data {
        out.extend_from_slice(d);
    }
    let sum = checksum(Version::V2, kind, key, &out[data_start..]);
    out.extend_from_slice(&sum);
    Loc { offset: data_start as u64, len: data_len as u32 }
}

pub(super) fn encode_refs(refs: &[Hash]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + refs.len() * 32);
    out.extend_from_slice(&(refs.len() as u32).to_le_bytes());
    for r in refs {
        out.extend_from_slice(&r.0);
    }
    out
}

fn decode_refs(data: &[u8]) -> Option<(Vec<Hash>, usize)> {
    let n = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let end = 4usize.checked_add(n.checked_mul(32)?)?;
    let body = data.get(4..end)?;
    Some((body.chunks_exact(32).filter_map(Hash::from_slice).collect(), end))
}

/// What a scan found.
#[derive(Default)]
pub(super) struct Index {
    pub(super) pages: HashMap<Hash, Loc>,
    pub(super) manifests: HashMap<String, ManifestLoc>,
    /// The offset after the last whole record (a torn tail starts there).
    pub(super) good: u64,
}

/// The version of the file at `path` (an empty file, or one cut inside its magic, is version 2).
pub(super) fn version_of(path: &Path) -> Result<Version, PageLogError> {
    let mut head = Vec::with_capacity(MAGIC.len());
    File::open(path).map_err(io(path))?.take(MAGIC.len() as u64).read_to_end(&mut head).map_err(io(path))?;
    if head[..] == MAGIC[..head.len()] {
        Ok(Version::V2)
    } else if matches!(head[0], KIND_PAGE | KIND_MANIFEST | KIND_TOMBSTONE) {
        Ok(Version::V1)
    } else {
        Err(PageLogError::Format { path: path.to_owned() })
    }
}

/// Reads every record of the file into an index.
pub(super) fn scan(path: &Path, version: Version) -> Result<Index, PageLogError> {
    let file = File::open(path).map_err(io(path))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut index = Index::default();
    let mut offset = 0u64;
    if version == Version::V2 {
        let mut magic = [0u8; 8];
        if !read_full(&mut r, &mut magic).map_err(io(path))? {
            return Ok(index);
        }
        offset = MAGIC.len() as u64;
    }
    index.good = offset;
    loop {
        let mut head = [0u8; 3];
        if !read_full(&mut r, &mut head).map_err(io(path))? {
            return Ok(index);
        }
        let kind = head[0];
        let key_len = u16::from_le_bytes([head[1], head[2]]) as usize;
        let mut key = vec![0u8; key_len];
        let mut len = [0u8; 4];
        if !read_full(&mut r, &mut key).map_err(io(path))? || !read_full(&mut r, &mut len).map_err(io(path))? {
            return Ok(index);
        }
        let data_len = u32::from_le_bytes(len);
        if data_len > MAX_RECORD || !matches!(kind, KIND_PAGE | KIND_MANIFEST | KIND_TOMBSTONE) {
            return Ok(index);
        }
        let mut data = vec![0u8; data_len as usize];
        let mut sum = [0u8; 32];
        if !read_full(&mut r, &mut data).map_err(io(path))? || !read_full(&mut r, &mut sum).map_err(io(path))? {
            return Ok(index);
        }
        let data_offset = offset + 3 + key_len as u64 + 4;
        offset = data_offset + u64::from(data_len) + 32;
        let page_ok = kind != KIND_PAGE || Hash::from_slice(&key).is_some_and(|h| h == Hash::of(&data));
        if checksum(version, kind, &key, &data) != sum || !page_ok {
            // A whole record whose bytes rotted (the file goes on after it): skip it, keep the
            // rest. Only a record cut short by the end of the file is a torn tail.
            tracing::error!(path = %path.display(), offset = data_offset, "a page log record fails its check; skipping it");
            index.good = offset;
            continue;
        }
        match kind {
            KIND_PAGE => {
                if let Some(hash) = Hash::from_slice(&key) {
                    index.pages.insert(hash, Loc { offset: data_offset, len: data_len });
                }
            }
            KIND_MANIFEST => {
                let Some((refs, used)) = decode_refs(&data) else { return Ok(index) };
                let key = String::from_utf8_lossy(&key).into_owned();
                let loc = Loc { offset: data_offset + used as u64, len: data_len - used as u32 };
                index.manifests.insert(key, ManifestLoc { loc, refs });
            }
            _ => {
                index.manifests.remove(&*String::from_utf8_lossy(&key));
            }
        }
        index.good = offset;
    }
}

/// Fills `buf` completely; `Ok(false)` at a clean or torn end of file.
pub(super) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A version-1 record, for the migration test.
#[cfg(test)]
pub(super) fn encode_v1(out: &mut Vec<u8>, kind: u8, key: &[u8], data: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&checksum(Version::V1, kind, key, data));
}
