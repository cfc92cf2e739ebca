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
use std::io::Read;
use std::os::unix::fs::FileExt;
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

/// Reads every record of the file into an index. A record that fails its check is skipped: when
/// its header is known intact (a page's header has its own checksum; another record's length is
/// trusted only when a valid record follows where it says), the scan goes on after it; when its header rotted, the scan looks
/// for the next whole record that passes its checksum. Every valid record after the rot is kept;
/// only what follows the last valid record is a torn tail (`Index::good`). A manifest whose pages
/// are not all in the file (a batch torn in its middle) is left out: it would restore nothing, and
/// an older manifest of the same key cannot stand in for it (a key may be written again with
/// other contents), so the checkpoint is simply not here and replication fetches it again.
pub(super) fn scan(path: &Path, version: Version) -> Result<Index, PageLogError> {
    let file = File::open(path).map_err(io(path))?;
    let end = file.metadata().map_err(io(path))?.len();
    let mut index = Index::default();
    let mut offset = 0u64;
    if version == Version::V2 {
        if end < MAGIC.len() as u64 {
            return Ok(index);
        }
        offset = MAGIC.len() as u64;
    }
    index.good = offset;
    while offset < end {
        let next = match record_at(&file, version, offset, end).map_err(io(path))? {
            Found::Valid(rec) => {
                if add(&mut index, rec) {
                    offset = index.good;
                    continue;
                }
                None
            }
            Found::BadBody { next, header_checked } => {
                let trusted = header_checked
                    || matches!(record_at(&file, version, next, end).map_err(io(path))?, Found::Valid(_));
                trusted.then_some(next)
            }
            Found::Nothing => None,
        };
        let next = match next {
            Some(n) => Some(n),
            None => resync(&file, version, offset + 1, end).map_err(io(path))?,
        };
        match next {
            Some(next) => {
                tracing::error!(path = %path.display(), offset, skipped = next - offset, "page log bytes fail their check; skipping them");
                offset = next;
            }
            None => break,
        }
    }
    let pages = &index.pages;
    index.manifests.retain(|key, m| {
        let complete = m.refs.iter().all(|h| pages.contains_key(h));
        if !complete {
            tracing::error!(path = %path.display(), %key, "a manifest lacks pages (its batch tore); leaving it out");
        }
        complete
    });
    Ok(index)
}

/// A whole record that passed its checks.
struct Record {
    kind: u8,
    key: Vec<u8>,
    data: Vec<u8>,
    data_offset: u64,
    /// Where the next record starts.
    next: u64,
}

/// What a scan finds at an offset.
enum Found {
    Valid(Record),
    /// A plausible header whose record fails its check; `header_checked`: the checksum that
    /// passed covers the header, so `next` is where the next record starts.
    BadBody {
        next: u64,
        header_checked: bool,
    },
    /// No plausible record.
    Nothing,
}

/// Adds a record to the index; `false` if its contents do not decode (a manifest's references).
fn add(index: &mut Index, rec: Record) -> bool {
    let data_len = rec.data.len() as u32;
    match rec.kind {
        KIND_PAGE => {
            let Some(hash) = Hash::from_slice(&rec.key) else { return false };
            index.pages.insert(hash, Loc { offset: rec.data_offset, len: data_len });
        }
        KIND_MANIFEST => {
            let Some((refs, used)) = decode_refs(&rec.data) else { return false };
            let key = String::from_utf8_lossy(&rec.key).into_owned();
            let loc = Loc { offset: rec.data_offset + used as u64, len: data_len - used as u32 };
            index.manifests.insert(key, ManifestLoc { loc, refs });
        }
        _ => {
            let key = String::from_utf8_lossy(&rec.key);
            index.manifests.remove(&*key);
        }
    }
    index.good = rec.next;
    true
}

/// Longest key of a manifest or tombstone (an instance name) a scan takes for real.
const MAX_KEY: usize = 4096;

/// The record at `at` in a file of `end` bytes. Cheap checks come first (a rotten header makes
/// the scan try every offset): the head's shape, the length against the file, a page's
/// header-only checksum and a manifest's UTF-8 key before any data is read.
fn record_at(file: &File, version: Version, at: u64, end: u64) -> std::io::Result<Found> {
    let mut head = [0u8; 3];
    if at + 3 > end {
        return Ok(Found::Nothing);
    }
    file.read_exact_at(&mut head, at)?;
    let kind = head[0];
    let key_len = u16::from_le_bytes([head[1], head[2]]) as usize;
    let key_ok = match kind {
        KIND_PAGE => key_len == 32,
        KIND_MANIFEST | KIND_TOMBSTONE => key_len <= MAX_KEY,
        _ => false,
    };
    let len_at = at + 3 + key_len as u64;
    if !key_ok || len_at + 4 > end {
        return Ok(Found::Nothing);
    }
    let mut key_and_len = vec![0u8; key_len + 4];
    file.read_exact_at(&mut key_and_len, at + 3)?;
    let data_len = u32::from_le_bytes(key_and_len[key_len..].try_into().expect("4 bytes"));
    key_and_len.truncate(key_len);
    let key = key_and_len;
    let data_offset = len_at + 4;
    let next = data_offset + u64::from(data_len) + 32;
    let shape_ok = match kind {
        KIND_TOMBSTONE => data_len == 0,
        KIND_MANIFEST => data_len >= 4 && std::str::from_utf8(&key).is_ok(),
        _ => true,
    };
    if data_len > MAX_RECORD || next > end || !shape_ok {
        return Ok(Found::Nothing);
    }
    let mut sum = [0u8; 32];
    file.read_exact_at(&mut sum, next - 32)?;
    let head_only = kind == KIND_PAGE && version == Version::V2;
    if head_only && checksum_of_head(kind, &key, data_len) != sum {
        return Ok(Found::Nothing);
    }
    let mut data = vec![0u8; data_len as usize];
    file.read_exact_at(&mut data, data_offset)?;
    let page_ok = kind != KIND_PAGE || Hash::from_slice(&key).is_some_and(|h| h == Hash::of(&data));
    if (!head_only && checksum(version, kind, &key, &data) != sum) || !page_ok {
        return Ok(Found::BadBody { next, header_checked: head_only });
    }
    Ok(Found::Valid(Record { kind, key, data, data_offset, next }))
}

/// A version-2 page's checksum, which covers only its header.
fn checksum_of_head(kind: u8, key: &[u8], data_len: u32) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[kind]);
    h.update(key);
    h.update(&data_len.to_le_bytes());
    *h.finalize().as_bytes()
}

/// Where the first whole, valid record at or after `from` starts, if any.
fn resync(file: &File, version: Version, from: u64, end: u64) -> std::io::Result<Option<u64>> {
    let mut window = vec![0u8; 1 << 20];
    let mut base = from;
    while base < end {
        let n = ((end - base) as usize).min(window.len());
        let w = &mut window[..n];
        file.read_exact_at(w, base)?;
        for i in 0..n {
            // A cheap look at the head first; only a plausible one is read and checked.
            let plausible = match w[i] {
                KIND_PAGE => w.get(i + 1..i + 3).is_none_or(|l| l == [32, 0]),
                KIND_MANIFEST | KIND_TOMBSTONE => w.get(i + 2).is_none_or(|hi| usize::from(*hi) << 8 <= MAX_KEY),
                _ => false,
            };
            let at = base + i as u64;
            if plausible && matches!(record_at(file, version, at, end)?, Found::Valid(_)) {
                return Ok(Some(at));
            }
        }
        base += n as u64;
    }
    Ok(None)
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
