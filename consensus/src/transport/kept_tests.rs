//! Kept streams (`kept`) against real quinn and rustls on loopback.

use std::time::Duration;

use hubmesh_proto::{pb, Message};

use super::kept::{KEEP_MARK, MAX_IDLE, MAX_KEPT_REQUEST};
use super::tests::{addr, hub, raw_joiner, raw_stream, serve_propose_that_runs, wait_for, ECHO, T};
use crate::tls::CaMaterial;
use crate::transport::{handler, RpcError, StreamKind};

fn echoed(payload: &[u8]) -> Vec<u8> {
    [b"member 1:".as_slice(), payload].concat()
}

/// The first call to a peer takes a stream of its own; its answer says that the peer keeps
/// streams, and later calls go as frames on kept streams: one stream for calls in turn, one per
/// call in flight at once, at most `MAX_IDLE` kept idle. A request too large for a kept stream
/// takes one of its own.
#[tokio::test]
async fn calls_after_the_first_go_on_kept_streams() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    a.set_peer(2, addr(&b));
    assert_eq!(a.call(2, ECHO, b"first".to_vec(), T).await.unwrap(), echoed(b"first"));
    assert_eq!(a.kept_streams_for_tests(2), (0, 0), "the first call opens no kept stream");
    for i in 0..50u32 {
        let p = i.to_le_bytes();
        assert_eq!(a.call(2, ECHO, p.to_vec(), T).await.unwrap(), echoed(&p));
    }
    assert_eq!(a.kept_streams_for_tests(2), (1, 1), "one stream carried 50 calls in turn");
    let stats = a.kept_stream_stats();
    assert_eq!((stats.opened, stats.reused, stats.idle), (1, 49, 1), "49 calls took the idle stream");
    let big = vec![7u8; MAX_KEPT_REQUEST + 1];
    assert_eq!(a.call(2, ECHO, big.clone(), T).await.unwrap(), echoed(&big));
    assert_eq!(a.kept_streams_for_tests(2), (1, 1), "the large request took a stream of its own");
    let calls = (0..40u8).map(|i| {
        let a = a.clone();
        async move { a.call(2, ECHO, vec![i], T).await }
    });
    for (i, r) in futures_util::future::join_all(calls).await.into_iter().enumerate() {
        assert_eq!(r.unwrap(), echoed(&[i as u8]), "call {i} got its own answer");
    }
    let (opened, idle) = a.kept_streams_for_tests(2);
    assert_eq!((opened, idle), (40, MAX_IDLE), "39 streams opened for the calls in flight besides the idle one");
}

/// A call on a kept stream that its caller gives up after the peer ran it is an unknown outcome,
/// never "not delivered", as on a stream of its own; its stream is not reused (the late answer
/// could reach the next call), and the next call gets its own answer.
#[tokio::test]
async fn a_call_given_up_on_a_kept_stream_is_an_unknown_outcome_and_its_stream_goes() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    // Ran; the answer comes after the caller has given up.
    let ran = serve_propose_that_runs(&b, Some(Duration::from_millis(50)));
    a.set_peer(2, addr(&b));
    a.call(2, ECHO, b"learn".to_vec(), T).await.unwrap();
    for round in 0..10u8 {
        let err = a.call_unless(2, StreamKind::Propose, vec![round], T, ran.next()).await.unwrap_err();
        assert!(matches!(err, RpcError::Timeout), "round {round}: the peer ran the request, yet {err:?}");
    }
    assert_eq!(a.kept_streams_for_tests(2), (10, 0), "each given-up call's stream went");
    // The late answers are written to the streams the caller dropped before the next call.
    wait_for("the peer answered every given-up call", || ran.answered() == 10).await;
    assert_eq!(a.call(2, ECHO, b"after".to_vec(), T).await.unwrap(), echoed(b"after"));
    assert_eq!(a.kept_streams_for_tests(2), (11, 1));
}

/// Kept streams belong to a connection: when a peer moves to another address (a hub restarted
/// elsewhere), its idle streams go with the old connection, the first call to the new one takes a
/// stream of its own, and later calls go on streams kept on the new connection.
#[tokio::test]
async fn kept_streams_follow_the_peers_connection() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    a.set_peer(2, addr(&b));
    for _ in 0..3 {
        assert_eq!(a.call(2, ECHO, b"b".to_vec(), T).await.unwrap(), echoed(b"b"));
    }
    assert_eq!(a.kept_streams_for_tests(2), (1, 1));
    let moved = hub(&ca, 2);
    moved.register(ECHO, handler(|_caller, p: Vec<u8>| async move { Ok([b"moved:".as_slice(), &p].concat()) }));
    a.set_peer(2, addr(&moved));
    assert_eq!(a.kept_streams_for_tests(2), (1, 0), "the old connection's idle stream went with it");
    assert_eq!(a.call(2, ECHO, b"1".to_vec(), T).await.unwrap(), b"moved:1");
    assert_eq!(a.kept_streams_for_tests(2), (1, 0), "the first call to the new connection took its own stream");
    assert_eq!(a.call(2, ECHO, b"2".to_vec(), T).await.unwrap(), b"moved:2");
    assert_eq!(a.kept_streams_for_tests(2), (2, 1));
    drop(b);
}

/// The frames an answer stream carried (each a u32 little-endian length and a `MeshResponse`).
fn frames(mut raw: &[u8]) -> Vec<pb::MeshResponse> {
    let mut out = Vec::new();
    while let Some((len, rest)) = raw.split_first_chunk::<4>() {
        let len = u32::from_le_bytes(*len) as usize;
        out.push(pb::MeshResponse::decode(&rest[..len]).unwrap());
        raw = &rest[len..];
    }
    out
}

fn frame(body: &[u8]) -> Vec<u8> {
    [&(body.len() as u32).to_le_bytes(), body].concat()
}

/// Garbage on a member's kept stream gets a clear refusal and the stream goes on; a frame larger
/// than a kept stream carries is refused before it is read and the stream ends; a joiner is
/// refused a kept stream outright.
#[tokio::test]
async fn garbage_on_a_kept_stream_is_refused_and_changes_nothing() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    a.set_peer(2, addr(&b));
    b.set_peer(1, addr(&a));
    a.call(2, ECHO, vec![], T).await.unwrap();
    let ok = pb::MeshRequest { kind: ECHO as u32, from: 1, payload: b"ok".to_vec() }.encode_to_vec();
    let forged = pb::MeshRequest { kind: ECHO as u32, from: 3, payload: vec![] }.encode_to_vec();
    let unknown = pb::MeshRequest { kind: 999, from: 1, payload: vec![] }.encode_to_vec();
    let raw = [
        vec![KEEP_MARK],
        frame(b"\xff\xff\xff garbage"),
        frame(&ok),
        frame(&forged),
        frame(&unknown),
        frame(&ok),
        b"\x07\x00".to_vec(), // a truncated length, then the end
    ]
    .concat();
    let got = frames(&raw_stream(&a, 2, &raw).await);
    let codes: Vec<i32> = got.iter().map(|r| r.code).collect();
    let bad = pb::ErrorCode::BadRequest as i32;
    assert_eq!(codes, [bad, 0, pb::ErrorCode::Unauthorized as i32, bad, 0], "{got:?}");
    assert_eq!(got[1].payload, echoed(b"ok"));
    assert!(got.iter().all(|r| r.keeps_streams));

    let too_large = [vec![KEEP_MARK], ((MAX_KEPT_REQUEST + 1) as u32).to_le_bytes().to_vec(), frame(&ok)].concat();
    let got = frames(&raw_stream(&a, 2, &too_large).await);
    assert_eq!(got.len(), 1, "refused, and the stream ended: {got:?}");
    assert_eq!(got[0].code, bad);

    let ep = raw_joiner(&ca, "127.0.0.1:0", 1 << 20);
    let conn = ep.connect(addr(&b), crate::tls::JOIN_SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[vec![KEEP_MARK], frame(&ok)].concat()).await.unwrap();
    send.finish().unwrap();
    let resp = pb::MeshResponse::decode(recv.read_to_end(1 << 20).await.unwrap().as_slice()).unwrap();
    assert_eq!(resp.code, pb::ErrorCode::Unauthorized as i32);
    assert!(!resp.keeps_streams, "a joiner does not learn of kept streams");

    assert_eq!(a.call(2, ECHO, b"still".to_vec(), T).await.unwrap(), echoed(b"still"));
}
