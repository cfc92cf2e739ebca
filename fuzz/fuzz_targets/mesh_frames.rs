//! Mesh frames as the endpoint reads them: a unary request (or a bulk stream's length-prefixed
//! header, or a kept stream's frame) and its payload decoded as the request type of its stream
//! kind; answers as a caller reads them. Nothing may panic.
#![no_main]

use hubmesh_consensus::transport::{
    StreamKind, CHECKPOINT_FETCH, CHECKPOINT_PUSH, INVOKE_FORWARD, JOIN, MIGRATE_END, MIGRATE_PAGES, MIGRATE_PREPARE,
    MIGRATE_REQUEST, MIGRATE_WATCH, MODULE_FETCH, PING, PROPOSE, RAFT_APPEND, RAFT_SNAPSHOT, RAFT_VOTE, READ_INDEX,
};
use hubmesh_proto::{pb, Message};
use libfuzzer_sys::fuzz_target;

fn payload(kind: u32, raw: &[u8]) {
    match StreamKind::from_wire(kind) {
        Some(StreamKind::RaftAppend) => drop(RAFT_APPEND.decode_request(raw)),
        Some(StreamKind::RaftVote) => drop(RAFT_VOTE.decode_request(raw)),
        Some(StreamKind::RaftSnapshot) => drop(RAFT_SNAPSHOT.decode_request(raw)),
        Some(StreamKind::Join) => drop(JOIN.decode_request(raw)),
        Some(StreamKind::Ping) => drop(PING.decode_request(raw)),
        Some(StreamKind::ReadIndex) => drop(READ_INDEX.decode_request(raw)),
        Some(StreamKind::Propose) => {
            if let Ok(req) = PROPOSE.decode_request(raw) {
                if let Some(cmd) = req.command {
                    drop(hubmesh_consensus::Command::try_from(cmd));
                }
            }
        }
        Some(StreamKind::ModuleFetch) => drop(MODULE_FETCH.decode_request(raw)),
        Some(StreamKind::InvokeForward) => drop(INVOKE_FORWARD.decode_request(raw)),
        Some(StreamKind::CheckpointPush) => drop(CHECKPOINT_PUSH.decode_header(raw)),
        Some(StreamKind::CheckpointFetch) => drop(CHECKPOINT_FETCH.decode_request(raw)),
        Some(StreamKind::MigrateRequest) => drop(MIGRATE_REQUEST.decode_request(raw)),
        Some(StreamKind::MigratePrepare) => drop(MIGRATE_PREPARE.decode_request(raw)),
        Some(StreamKind::MigratePages) => drop(MIGRATE_PAGES.decode_request(raw)),
        Some(StreamKind::MigrateEnd) => drop(MIGRATE_END.decode_request(raw)),
        Some(StreamKind::MigrateWatch) => drop(MIGRATE_WATCH.decode_request(raw)),
        None => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // A unary request.
    if let Ok(req) = pb::MeshRequest::decode(data) {
        payload(req.kind, &req.payload);
    }
    // A bulk stream after its mark (u32 length, header), or a frame of a kept stream (u32
    // length, request).
    if let Some((len, rest)) = data.split_first_chunk::<4>() {
        let len = u32::from_le_bytes(*len) as usize;
        if let Some(head) = rest.get(..len) {
            if let Ok(req) = pb::MeshRequest::decode(head) {
                payload(req.kind, &req.payload);
            }
        }
    }
    // Answers, as a caller reads them.
    if let Ok(resp) = pb::MeshResponse::decode(data) {
        drop(RAFT_APPEND.decode_answer(&resp.payload));
        drop(JOIN.decode_answer(&resp.payload));
        drop(PROPOSE.decode_answer(&resp.payload));
        drop(READ_INDEX.decode_answer(&resp.payload));
        drop(INVOKE_FORWARD.decode_answer(&resp.payload));
        drop(CHECKPOINT_FETCH.decode_answer(&resp.payload));
        drop(MIGRATE_REQUEST.decode_answer(&resp.payload));
    }
});
