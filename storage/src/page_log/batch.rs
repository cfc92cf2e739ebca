//! A batch of records about to be appended, written with vectored writes: a page's bytes go to
//! the file from the caller's buffer, never copied into an encoding buffer first (a full
//! checkpoint of a big task is tens of MiB, and a holder writes every page it is pushed).

use std::fs::File;
use std::io::{IoSlice, Write};

use super::record::{checksum, encode, encode_head, Version, KIND_PAGE};
use super::Loc;
use crate::Hash;

/// Records in file order: headers and small records in `owned`, page bytes borrowed.
pub(super) struct Batch<'a> {
    owned: Vec<u8>,
    parts: Vec<Part<'a>>,
    len: u64,
}

enum Part<'a> {
    /// `owned[start..end]`.
    Owned {
        start: usize,
        end: usize,
    },
    Borrowed(&'a [u8]),
}

impl<'a> Batch<'a> {
    pub(super) fn new() -> Self {
        Self { owned: Vec::new(), parts: Vec::new(), len: 0 }
    }

    /// Bytes in the batch.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Runs `f` to append to `owned`, as the next part; returns where in the batch it started.
    fn append_owned(&mut self, f: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let at = self.len;
        let start = self.owned.len();
        f(&mut self.owned);
        let end = self.owned.len();
        match self.parts.last_mut() {
            Some(Part::Owned { end: e, .. }) if *e == start => *e = end,
            _ => self.parts.push(Part::Owned { start, end }),
        }
        self.len += (end - start) as u64;
        at
    }

    /// A page record whose bytes stay in `data`; returns where its data sits in the batch.
    pub(super) fn page(&mut self, hash: &Hash, data: &'a [u8]) -> Loc {
        self.append_owned(|o| encode_head(o, KIND_PAGE, &hash.0, data.len()));
        let loc = Loc { offset: self.len, len: data.len() as u32 };
        if !data.is_empty() {
            self.parts.push(Part::Borrowed(data));
            self.len += data.len() as u64;
        }
        // A version-2 page's checksum covers its header only (its key is its bytes' hash).
        self.append_owned(|o| o.extend_from_slice(&checksum(Version::V2, KIND_PAGE, &hash.0, data)));
        loc
    }

    /// Any other record, copied (manifests and tombstones are small); returns where its data
    /// sits in the batch.
    pub(super) fn record(&mut self, kind: u8, key: &[u8], data: &[&[u8]]) -> Loc {
        let mut loc = Loc { offset: 0, len: 0 };
        let start = self.owned.len() as u64;
        let at = self.append_owned(|o| loc = encode(o, kind, key, data));
        Loc { offset: loc.offset - start + at, ..loc }
    }

    /// Appends the whole batch to `file` (opened for appending).
    pub(super) fn write_to(&self, mut file: &File) -> std::io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Owned { start, end } => IoSlice::new(&self.owned[*start..*end]),
                Part::Borrowed(d) => IoSlice::new(d),
            })
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match file.write_vectored(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_log::record::{KIND_MANIFEST, KIND_TOMBSTONE};

    /// A batch writes exactly what encoding every record into one buffer would, with the same
    /// places, also when a write takes more slices than one system call carries (1,024).
    #[test]
    fn a_batch_writes_what_encode_would() {
        let pages: Vec<(Hash, Vec<u8>)> = (0..700u32)
            .map(|i| {
                let bytes = vec![(i % 251) as u8; 100 + i as usize];
                (Hash::of(&bytes), bytes)
            })
            .collect();
        let mut batch = Batch::new();
        let mut expected = Vec::new();
        let mut locs = Vec::new();
        assert_eq!(
            batch.record(KIND_TOMBSTONE, b"old#1", &[]).offset,
            encode(&mut expected, KIND_TOMBSTONE, b"old#1", &[]).offset
        );
        for (h, p) in &pages {
            locs.push((batch.page(h, p), encode(&mut expected, KIND_PAGE, &h.0, &[p])));
        }
        locs.push((
            batch.record(KIND_MANIFEST, b"t#2", &[b"refs", b"manifest"]),
            encode(&mut expected, KIND_MANIFEST, b"t#2", &[b"refs", b"manifest"]),
        ));
        for (got, want) in &locs {
            assert_eq!((got.offset, got.len), (want.offset, want.len));
        }
        assert_eq!(batch.len(), expected.len() as u64);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new().create(true).append(true).read(true).open(&path).unwrap();
        batch.write_to(&file).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }
}
