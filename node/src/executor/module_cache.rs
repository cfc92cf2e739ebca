//! Compiled modules, cached in memory and on disk so a restart does not recompile.
//!
//! File: `DATA_DIR/cache/<module hash>-<arch>-<build key>.cwasm`: the blake3 of the rest (32
//! bytes), then wasmtime's serialized artefact. The build key hashes `HUBMESH_BUILD_ID` (the
//! version and a hash of what decides the compiled code: node/build.rs), so another build's
//! files are not even read: at open, files of this architecture under another key (and of the
//! older `<hash>-<key>` naming) are deleted, and another architecture's are left alone (one data
//! dir may be run by an x86_64 and an arm64 build in turn). The checksum is verified before the
//! artefact is handed to `Module::deserialize` (which trusts its input), and that still refuses
//! an artefact of another wasmtime or engine setting; a file that fails either is deleted and the
//! module recompiled. Artefacts are only ever produced by this hub (or its compiler program, of
//! the same build): they are never shipped between hubs.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hubmesh_storage::Hash;
use wasmtime::{Engine, Module};

use super::compile::{CompileError, Compiled, Compiler};
use super::prepared::{ModuleFacts, PrepareError};

/// This machine's architecture, as a cache file names it.
const ARCH: &str = std::env::consts::ARCH;

/// Whether the cache file `name` is of this architecture but not of `key` (this build's
/// `<arch>-<hash>`), or of the older naming, or a write a crash left behind.
fn is_stale(name: &str, key: &str) -> bool {
    let Some((stem, extension)) = name.rsplit_once('.') else { return false };
    let parts: Vec<&str> = stem.split('-').collect();
    match (extension, parts.as_slice()) {
        ("cwasm", [_, _]) => true,
        ("cwasm", [_, arch, hash]) => *arch == ARCH && format!("{arch}-{hash}") != key,
        ("tmp", [_, arch, _]) => *arch == ARCH,
        ("tmp", [_, _]) => true,
        _ => false,
    }
}

/// Where a module came from, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheSource {
    Memory,
    Disk,
    Compiled,
    /// The disk artefact was corrupt and has been rebuilt.
    Rebuilt,
}

pub(crate) struct ModuleCache {
    dir: PathBuf,
    engine: Engine,
    engine_key: String,
    compiler: Compiler,
    memory: Mutex<HashMap<Hash, Module>>,
}

impl ModuleCache {
    pub(crate) fn open(dir: &Path, engine: Engine, compiler: Compiler) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        // Not wasmtime's `precompile_compatibility_hash`: a hub without the compiler has none.
        // The instance pool's sizes are no part of an artefact (see `engine::build_for_compiling`):
        // a hub restarted with other limits keeps its cache.
        let engine_key = format!("{ARCH}-{}", &blake3::hash(super::compile::BUILD_ID.as_bytes()).to_hex()[..16]);
        for entry in fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| is_stale(n, &engine_key)) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir: dir.to_owned(), engine, engine_key, compiler, memory: Mutex::new(HashMap::new()) })
    }

    fn path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(format!("{}-{}.cwasm", hash.to_hex(), self.engine_key))
    }

    /// The compiled form of `wasm` (whose hash is `hash`).
    pub(crate) fn get(&self, hash: &Hash, wasm: &[u8]) -> Result<(Module, CacheSource), CompileError> {
        if let Some(m) = self.memory.lock().unwrap_or_else(|p| p.into_inner()).get(hash) {
            return Ok((m.clone(), CacheSource::Memory));
        }
        let path = self.path(hash);
        let mut source = CacheSource::Compiled;
        if let Ok(bytes) = fs::read(&path) {
            match self.load(&bytes) {
                Some(module) => {
                    self.remember(hash, &module);
                    return Ok((module, CacheSource::Disk));
                }
                None => {
                    tracing::warn!(path = %path.display(), "compiled module cache entry is corrupt or does not load here; recompiling");
                    let _ = fs::remove_file(&path);
                    source = CacheSource::Rebuilt;
                }
            }
        }
        let compiled = self.compiler.compile(&self.engine, wasm)?;
        Ok((self.keep(hash, compiled), source))
    }

    /// Instruments the uploaded `source` and compiles the result (see `compile::Compiler`):
    /// the instrumented module, its hash, what instrumentation learned and the compiled module.
    pub(crate) fn prepare(&self, source: &[u8]) -> Result<(Vec<u8>, Hash, ModuleFacts, Module), PrepareError> {
        let (wasm, facts, compiled) = self.compiler.prepare(&self.engine, source)?;
        let hash = Hash::of(&wasm);
        // A module deployed again: keep the copy running tasks hold, not a second one.
        let known = self.memory.lock().unwrap_or_else(|p| p.into_inner()).get(&hash).cloned();
        let module = match known {
            Some(module) => module,
            None => self.keep(&hash, compiled),
        };
        Ok((wasm, hash, facts, module))
    }

    /// Writes a freshly compiled module to disk and keeps it in memory.
    fn keep(&self, hash: &Hash, compiled: Compiled) -> Module {
        let path = self.path(hash);
        if let Err(e) = self.store(&path, &compiled.module, compiled.artefact) {
            tracing::warn!(path = %path.display(), error = %e, "could not cache the compiled module");
        }
        self.remember(hash, &compiled.module);
        compiled.module
    }

    /// Drops the in-memory entry (the disk entry stays for the next start).
    pub(crate) fn forget(&self, hash: &Hash) {
        self.memory.lock().unwrap_or_else(|p| p.into_inner()).remove(hash);
    }

    fn remember(&self, hash: &Hash, module: &Module) {
        self.memory.lock().unwrap_or_else(|p| p.into_inner()).insert(*hash, module.clone());
    }

    fn load(&self, bytes: &[u8]) -> Option<Module> {
        let (sum, artefact) = bytes.split_at_checked(32)?;
        if blake3::hash(artefact).as_bytes() != sum {
            return None;
        }
        Engine::detect_precompiled(artefact)?;
        // SAFETY: the artefact was written by this hub's own `store` (checked by the checksum
        // above) for a build with the same key (part of the file name); `deserialize` still
        // checks wasmtime's version and the engine's settings.
        unsafe { Module::deserialize(&self.engine, artefact) }.ok()
    }

    /// Writes `module`'s artefact (`artefact` if the compiler handed it over already).
    fn store(&self, path: &Path, module: &Module, artefact: Option<Vec<u8>>) -> anyhow::Result<()> {
        #[cfg(feature = "compiler")]
        let artefact = match artefact {
            Some(a) => a,
            None => module.serialize().map_err(anyhow::Error::from)?,
        };
        // Without the compiler every module comes from the compiler program, artefact and all.
        #[cfg(not(feature = "compiler"))]
        let Some(artefact) = artefact
        else {
            anyhow::bail!("no artefact for {:?}", module.name())
        };
        let tmp = path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(blake3::hash(&artefact).as_bytes())?;
        f.write_all(&artefact)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn file_of(&self, hash: &Hash) -> PathBuf {
        self.path(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_cache_files_are_this_architectures_of_other_builds_older_names_and_leftover_writes() {
        let key = format!("{ARCH}-0123456789abcdef");
        let hash = "ab".repeat(32);
        assert!(!is_stale(&format!("{hash}-{key}.cwasm"), &key), "this build's");
        assert!(is_stale(&format!("{hash}-{ARCH}-fedcba9876543210.cwasm"), &key), "another build's");
        assert!(!is_stale(&format!("{hash}-riscv32-fedcba9876543210.cwasm"), &key), "another machine's");
        assert!(is_stale(&format!("{hash}-fedcba9876543210.cwasm"), &key), "the older naming");
        assert!(is_stale(&format!("{hash}-{key}.tmp"), &key), "a write a crash left");
        assert!(!is_stale(&format!("{hash}-riscv32-fedcba9876543210.tmp"), &key));
        assert!(!is_stale("README", &key) && !is_stale("notes.txt", &key));
    }
}
