//! Compiled modules, cached in memory and on disk so a restart does not recompile.
//!
//! File: `DATA_DIR/cache/<module hash>-<engine hash>.cwasm` = blake3 of the rest (32 bytes) +
//! wasmtime's serialized artefact. The checksum is verified before the artefact is handed to
//! `Module::deserialize` (which trusts its input); a corrupted file is deleted and the module
//! recompiled. Artefacts are only ever produced by this hub (or its compiler child, the same
//! binary): they are never shipped between hubs.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fs;
use std::hash::{Hash as _, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hubmesh_storage::Hash;
use wasmtime::{Engine, Module};

use super::compile::{CompileError, Compiled, Compiler};
use super::instrument::{ModuleFacts, PrepareError};

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
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_key = format!("{:016x}", h.finish());
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
                    tracing::warn!(path = %path.display(), "compiled module cache entry is corrupt; recompiling");
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
        // above) for an engine with the same compatibility hash (part of the file name).
        unsafe { Module::deserialize(&self.engine, artefact) }.ok()
    }

    /// Writes `module`'s artefact (`artefact` if the compiler handed it over already).
    fn store(&self, path: &Path, module: &Module, artefact: Option<Vec<u8>>) -> anyhow::Result<()> {
        let artefact = match artefact {
            Some(a) => a,
            None => module.serialize().map_err(anyhow::Error::from)?,
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
