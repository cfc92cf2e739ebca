//! The checkpoint manifest as a domain type, and its protobuf form (`pb::CheckpointManifest`).

use hubmesh_proto::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use hubmesh_proto::{pb, Message};
use hubmesh_storage::Hash;
use wasmtime::Val;

/// Bytes in a page of linear memory (wasm's page size), as checkpoints count them.
pub(crate) const PAGE: usize = 65536;

use super::Answer;

/// Format of manifests written by this build.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// One mutable global's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GlobalValue {
    I32(i32),
    I64(i64),
    F32(u32),
    F64(u64),
}

impl GlobalValue {
    pub(crate) fn from_val(v: &Val) -> Option<Self> {
        Some(match v {
            Val::I32(x) => Self::I32(*x),
            Val::I64(x) => Self::I64(*x),
            Val::F32(x) => Self::F32(*x),
            Val::F64(x) => Self::F64(*x),
            _ => return None,
        })
    }

    pub(crate) fn to_val(self) -> Val {
        match self {
            Self::I32(x) => Val::I32(x),
            Self::I64(x) => Val::I64(x),
            Self::F32(x) => Val::F32(x),
            Self::F64(x) => Val::F64(x),
        }
    }
}

/// Everything needed to restore an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub task: String,
    pub task_version: u64,
    pub epoch: u64,
    pub sequence: u64,
    pub module_hash: Hash,
    pub memory_pages: u32,
    /// Non-zero pages: (index, hash).
    pub pages: Vec<(u32, Hash)>,
    pub globals: Vec<(String, GlobalValue)>,
    pub answers: Vec<(String, Answer)>,
    pub invocations: u64,
    pub created_unix_ms: u64,
    /// Invocations accepted but not yet run, in order: (key, input).
    pub pending: Vec<(Option<String>, Vec<u8>)>,
}

/// Why a stored manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest does not decode: {0}")]
    Decode(#[from] hubmesh_proto::DecodeError),
    #[error("manifest format {0} is newer than this hub understands")]
    Version(u32),
    #[error("manifest field {0} is malformed")]
    Field(&'static str),
}

impl Manifest {
    /// The protobuf encoding: byte for byte what `pb::CheckpointManifest::from(self)` encodes to,
    /// without the heap copy of each page's hash that form makes. A durable task writes a
    /// manifest at every call, listing every non-zero page: a 64 MiB task's 1,024 small
    /// allocations and frees were a large part of a checkpoint with one dirty page
    /// (docs/benchmarks.md, "fifth pass"). prost
    /// writes fields in field-number order and a message is the concatenation of its fields, so
    /// the fields before `pages`, the pages, and the fields after are written one after another.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut head = self.to_pb(false);
        let tail = pb::CheckpointManifest {
            globals: std::mem::take(&mut head.globals),
            answers: std::mem::take(&mut head.answers),
            invocations: std::mem::take(&mut head.invocations),
            created_unix_ms: std::mem::take(&mut head.created_unix_ms),
            pending: std::mem::take(&mut head.pending),
            ..Default::default()
        };
        let pages: usize =
            self.pages.iter().map(|(i, _)| page_ref_len(*i)).map(|l| 1 + encoded_len_varint(l as u64) + l).sum();
        let size = head.encoded_len() + pages + tail.encoded_len();
        let mut buf = Vec::with_capacity(size);
        // Writing into a Vec cannot run out of room.
        head.encode(&mut buf).expect("a Vec grows");
        for (index, hash) in &self.pages {
            encode_key(PAGES_FIELD, WireType::LengthDelimited, &mut buf);
            encode_varint(page_ref_len(*index) as u64, &mut buf);
            // proto3 leaves a field at its default value out.
            if *index != 0 {
                encode_key(1, WireType::Varint, &mut buf);
                encode_varint(u64::from(*index), &mut buf);
            }
            encode_key(2, WireType::LengthDelimited, &mut buf);
            encode_varint(hash.0.len() as u64, &mut buf);
            buf.extend_from_slice(&hash.0);
        }
        tail.encode(&mut buf).expect("a Vec grows");
        debug_assert_eq!(buf.len(), size, "the page list's length is computed as it is written");
        buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        Self::try_from(pb::CheckpointManifest::decode(bytes)?)
    }

    /// Bytes of the pages the manifest refers to.
    pub fn size_bytes(&self) -> u64 {
        self.pages.len() as u64 * PAGE as u64
    }
}

/// The field number of `pages` in `pb::CheckpointManifest` (its fields `index` = 1, `hash` = 2).
const PAGES_FIELD: u32 = 9;

/// The encoded length of one `pb::PageRef` (an index and a 32-byte hash).
fn page_ref_len(index: u32) -> usize {
    let index = if index == 0 { 0 } else { 1 + encoded_len_varint(u64::from(index)) };
    index + 1 + 1 + 32
}

impl From<&Manifest> for pb::CheckpointManifest {
    fn from(m: &Manifest) -> Self {
        m.to_pb(true)
    }
}

impl Manifest {
    /// The protobuf form, with or without the page list.
    fn to_pb(&self, with_pages: bool) -> pb::CheckpointManifest {
        let m = self;
        let pages = if with_pages {
            m.pages.iter().map(|(i, h)| pb::PageRef { index: *i, hash: h.0.to_vec() }).collect()
        } else {
            Vec::new()
        };
        pb::CheckpointManifest {
            format_version: FORMAT_VERSION,
            task: m.task.clone(),
            task_version: m.task_version,
            epoch: m.epoch,
            sequence: m.sequence,
            module_hash: m.module_hash.0.to_vec(),
            memory_pages: m.memory_pages,
            page_size: PAGE as u32,
            pages,
            globals: m
                .globals
                .iter()
                .map(|(name, v)| {
                    let (kind, bits) = match *v {
                        GlobalValue::I32(x) => (pb::GlobalKind::I32, x as u32 as u64),
                        GlobalValue::I64(x) => (pb::GlobalKind::I64, x as u64),
                        GlobalValue::F32(x) => (pb::GlobalKind::F32, u64::from(x)),
                        GlobalValue::F64(x) => (pb::GlobalKind::F64, x),
                    };
                    pb::GlobalValue { name: name.clone(), kind: kind as i32, bits }
                })
                .collect(),
            answers: m
                .answers
                .iter()
                .map(|(k, a)| pb::IdempotentAnswer { key: k.clone(), output: a.output.clone(), status: a.status })
                .collect(),
            invocations: m.invocations,
            created_unix_ms: m.created_unix_ms,
            pending: m
                .pending
                .iter()
                .map(|(k, input)| pb::PendingInvocation { input: input.clone(), key: k.clone().unwrap_or_default() })
                .collect(),
        }
    }
}

impl TryFrom<pb::CheckpointManifest> for Manifest {
    type Error = ManifestError;

    fn try_from(p: pb::CheckpointManifest) -> Result<Self, ManifestError> {
        if p.format_version > FORMAT_VERSION {
            return Err(ManifestError::Version(p.format_version));
        }
        if p.page_size as usize != PAGE {
            return Err(ManifestError::Field("page_size"));
        }
        let module_hash = Hash::from_slice(&p.module_hash).ok_or(ManifestError::Field("module_hash"))?;
        let mut pages = Vec::with_capacity(p.pages.len());
        for r in p.pages {
            if r.index >= p.memory_pages {
                return Err(ManifestError::Field("pages.index"));
            }
            pages.push((r.index, Hash::from_slice(&r.hash).ok_or(ManifestError::Field("pages.hash"))?));
        }
        let mut globals = Vec::with_capacity(p.globals.len());
        for g in p.globals {
            let v = match pb::GlobalKind::try_from(g.kind) {
                Ok(pb::GlobalKind::I32) => GlobalValue::I32(g.bits as u32 as i32),
                Ok(pb::GlobalKind::I64) => GlobalValue::I64(g.bits as i64),
                Ok(pb::GlobalKind::F32) => GlobalValue::F32(g.bits as u32),
                Ok(pb::GlobalKind::F64) => GlobalValue::F64(g.bits),
                _ => return Err(ManifestError::Field("globals.kind")),
            };
            globals.push((g.name, v));
        }
        Ok(Self {
            task: p.task,
            task_version: p.task_version,
            epoch: p.epoch,
            sequence: p.sequence,
            module_hash,
            memory_pages: p.memory_pages,
            pages,
            globals,
            answers: p.answers.into_iter().map(|a| (a.key, Answer { status: a.status, output: a.output })).collect(),
            invocations: p.invocations,
            created_unix_ms: p.created_unix_ms,
            pending: p.pending.into_iter().map(|i| ((!i.key.is_empty()).then_some(i.key), i.input)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let m = Manifest {
            task: "counter".into(),
            task_version: 2,
            epoch: 7,
            sequence: 9,
            module_hash: Hash::of(b"m"),
            memory_pages: 3,
            pages: vec![(0, Hash::of(b"p0")), (2, Hash::of(b"p2"))],
            globals: vec![("hm:g0".into(), GlobalValue::I32(-5)), ("hm:g1".into(), GlobalValue::F64(1.5f64.to_bits()))],
            answers: vec![("k".into(), Answer { status: 0, output: b"42".to_vec() })],
            invocations: 11,
            created_unix_ms: 123,
            pending: vec![(Some("k2".into()), b"1".to_vec()), (None, b"2".to_vec())],
        };
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert!(Manifest::decode(b"\xff\xff\xff").is_err());
        let mut bad = pb::CheckpointManifest::from(&m);
        bad.pages[0].index = 99;
        assert!(Manifest::try_from(bad).is_err());
    }

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        let text = "[a-z:0-9]{0,12}";
        let pages = proptest::collection::vec(
            (prop_oneof![Just(0u32), Just(127), Just(128), Just(16_384), any::<u32>()], any::<[u8; 32]>()),
            0..40,
        );
        let globals = proptest::collection::vec((text, any::<i64>()), 0..4);
        let answers =
            proptest::collection::vec((text, any::<i32>(), proptest::collection::vec(any::<u8>(), 0..20)), 0..4);
        let pending = proptest::collection::vec(
            (proptest::option::of(text), proptest::collection::vec(any::<u8>(), 0..20)),
            0..4,
        );
        (text, any::<[u64; 5]>(), any::<u32>(), pages, globals, answers, pending).prop_map(
            |(task, n, memory_pages, pages, globals, answers, pending)| Manifest {
                task,
                task_version: n[0] % 3,
                epoch: n[1],
                sequence: n[2] % 2,
                module_hash: Hash::of(&n[3].to_le_bytes()),
                memory_pages,
                pages: pages.into_iter().map(|(i, h)| (i, Hash(h))).collect(),
                globals: globals.into_iter().map(|(k, v)| (k, GlobalValue::I64(v))).collect(),
                answers: answers.into_iter().map(|(k, status, output)| (k, Answer { status, output })).collect(),
                invocations: n[4] % 2,
                created_unix_ms: n[4],
                pending,
            },
        )
    }

    proptest! {
        /// The hand-written page list encodes exactly as prost encodes the generated form (the
        /// manifest's hash is taken over these bytes, by hubs of older builds too).
        #[test]
        fn encode_is_byte_for_byte_the_generated_encoding(m in arb_manifest()) {
            prop_assert_eq!(m.encode(), pb::CheckpointManifest::from(&m).encode_to_vec());
        }
    }
}
