//! Content-addressed blobs (task modules), one file per blake3 hash.
//!
//! Writes go to a temporary file that is fsynced and renamed into place, so a crash leaves
//! either the whole blob or none. Every read re-hashes the bytes: a corrupted file is reported,
//! never returned.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Hash;

/// Errors of [`BlobStore`].
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No blob with this hash is stored here.
    #[error("blob {0} is not stored on this hub")]
    NotFound(Hash),
    /// The stored bytes no longer match their hash; fetch the blob again.
    #[error("blob {0} is corrupted on disk")]
    Corrupt(Hash),
    /// The disk failed.
    #[error("blob store I/O at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A directory of blobs named by their hash.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io { path: path.to_owned(), source }
}

impl BlobStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(Self { dir: dir.to_owned() })
    }

    fn path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(hash.to_hex())
    }

    /// Stores `bytes` durably and returns their hash. Storing the same bytes twice is a no-op.
    pub fn put(&self, bytes: &[u8]) -> Result<Hash, BlobError> {
        let hash = Hash::of(bytes);
        let path = self.path(&hash);
        if path.exists() {
            return Ok(hash);
        }
        // A name of its own per write: two writers of the same blob (a fetch for a start and one
        // for the module copy every hub keeps) must not share a temporary file.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.dir.join(format!(".{}.{}.{n}.tmp", hash.to_hex(), std::process::id()));
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(hash)
    }

    /// Reads and verifies the blob `hash`.
    pub fn get(&self, hash: &Hash) -> Result<Vec<u8>, BlobError> {
        let path = self.path(hash);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BlobError::NotFound(*hash)),
            Err(e) => return Err(io(&path)(e)),
        };
        if Hash::of(&bytes) != *hash {
            return Err(BlobError::Corrupt(*hash));
        }
        Ok(bytes)
    }

    /// Whether a blob with this hash is stored (not verified).
    pub fn contains(&self, hash: &Hash) -> bool {
        self.path(hash).exists()
    }

    /// Deletes the blob, if stored.
    pub fn remove(&self, hash: &Hash) -> Result<(), BlobError> {
        let path = self.path(hash);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_puts_of_one_blob_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(BlobStore::open(dir.path()).unwrap());
        let bytes = vec![7u8; 1 << 20];
        let writers: Vec<_> = (0..8)
            .map(|_| {
                let (s, b) = (store.clone(), bytes.clone());
                std::thread::spawn(move || s.put(&b))
            })
            .collect();
        for w in writers {
            w.join().unwrap().unwrap();
        }
        assert_eq!(store.get(&Hash::of(&bytes)).unwrap(), bytes);
    }

    #[test]
    fn put_get_and_detect_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let h = store.put(b"module bytes").unwrap();
        assert_eq!(store.put(b"module bytes").unwrap(), h);
        assert_eq!(store.get(&h).unwrap(), b"module bytes");
        fs::write(dir.path().join(h.to_hex()), b"module bytez").unwrap();
        assert!(matches!(store.get(&h), Err(BlobError::Corrupt(x)) if x == h));
        let missing = Hash::of(b"nothing");
        assert!(matches!(store.get(&missing), Err(BlobError::NotFound(_))));
        store.remove(&h).unwrap();
        assert!(!store.contains(&h));
    }
}
