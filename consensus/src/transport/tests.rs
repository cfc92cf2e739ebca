//! The mesh endpoint against real quinn and rustls on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hubmesh_proto::{pb, Message};

use crate::tls::{fingerprint, CaMaterial, Identity, NodeKey};
use crate::transport::{
    bulk_handler, handler, lock, BulkBody, Caller, RpcError, StreamKind, Transport, MAX_FRAME, MODULE_FETCH,
};

pub(super) const T: Duration = Duration::from_secs(5);
/// The untyped echo handler of these tests rides on a kind a bare endpoint does not serve.
pub(super) const ECHO: StreamKind = StreamKind::ModuleFetch;
/// The frame-counting bulk handler.
const FRAMES: StreamKind = StreamKind::CheckpointPush;
/// Frame size of the [`FRAMES`] bulk handler.
const FRAME: usize = 64 << 10;

fn identity(ca: &CaMaterial, id: u64) -> Identity {
    let key = NodeKey::generate().unwrap();
    Identity { ca_der: ca.cert_der.clone(), cert_der: ca.issue(id, key.public_key()).unwrap(), key }
}

pub(super) fn hub(ca: &CaMaterial, id: u64) -> Arc<Transport> {
    let t = Transport::bind("127.0.0.1:0".parse().unwrap(), &identity(ca, id), id, Duration::from_millis(30)).unwrap();
    t.register(
        ECHO,
        handler(|caller, payload: Vec<u8>| async move {
            let who = match caller {
                Caller::Member(id) => format!("member {id}"),
                Caller::Joiner => "joiner".into(),
            };
            Ok([who.into_bytes(), b":".to_vec(), payload].concat())
        }),
    );
    t.register(StreamKind::Join, handler(|caller, _p| async move { Ok(format!("{caller:?}").into_bytes()) }));
    // Counts whole frames until the body ends and sums their bytes: "<header>:<frames>:<sum>"
    // (read as a checkpoint's holder reads pages).
    t.register_bulk(
        FRAMES,
        bulk_handler(|_caller, header: Vec<u8>, mut body: BulkBody| async move {
            let (mut frames, mut sum) = (0u64, 0u64);
            let mut count = |buf: &[u8]| {
                frames += 1;
                sum += buf.iter().map(|b| *b as u64).sum::<u64>();
            };
            // A header of "exact" reads into one buffer, as a holder reads a page's frame head.
            if header == b"exact" {
                let mut buf = vec![0u8; FRAME];
                while body.read_exact_or_end(&mut buf).await? {
                    count(&buf);
                }
            } else {
                while let Some(buf) = body.read_vec(FRAME).await? {
                    count(&buf);
                }
            }
            Ok(format!("{}:{frames}:{sum}", String::from_utf8_lossy(&header)).into_bytes())
        }),
    );
    t
}

pub(super) fn addr(t: &Transport) -> SocketAddr {
    t.local_addr().unwrap()
}

#[tokio::test]
async fn members_call_each_other_and_see_who_calls() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    a.set_peer(2, addr(&b));
    let out = a.call(2, ECHO, b"hi".to_vec(), T).await.unwrap();
    assert_eq!(out, b"member 1:hi");
    assert!(a.last_ok(2).is_some());
    // A kind this endpoint does not serve, and a number no kind has.
    let err = a.call(2, StreamKind::Propose, vec![], T).await.unwrap_err();
    assert_eq!(err.code(), Some(pb::ErrorCode::BadRequest), "{err:?}");
    let unknown = pb::MeshRequest { kind: 999, from: 1, payload: vec![] }.encode_to_vec();
    let resp = pb::MeshResponse::decode(raw_stream(&a, 2, &unknown).await.as_slice()).unwrap();
    assert_eq!(resp.code, pb::ErrorCode::BadRequest as i32, "{}", resp.message);
}

#[tokio::test]
async fn a_ping_is_not_hearing_from_a_member() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    crate::election_gate::serve(&b, || crate::transport::PingAnswer {
        hears_leader: true,
        last_log_index: Some(3),
        leader: Some(1),
    });
    a.set_peer(2, addr(&b));
    let crate::transport::Json(answer) =
        crate::transport::PING.call(&a, 2, &crate::transport::Json(()), T).await.unwrap();
    assert!(answer.hears_leader, "the answer carries what the voter hears");
    assert_eq!(answer.last_log_index, Some(3), "and how long its log is");
    assert!(b.last_heard(1).is_none(), "a ping fed the lease");
    a.call(2, ECHO, b"hi".to_vec(), T).await.unwrap();
    assert!(b.last_heard(1).is_some());
}

#[tokio::test]
async fn the_server_name_must_match_the_target() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    // A stale address book says node 3 lives where node 2 does: the call must not reach node 2.
    a.set_peer(3, addr(&b));
    let err = a.call(3, ECHO, vec![], T).await.unwrap_err();
    assert!(matches!(err, RpcError::Unreachable(3, _)), "{err:?}");
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let ca = CaMaterial::generate().unwrap();
    let other = CaMaterial::generate().unwrap();
    let a = hub(&ca, 1);
    // The stranger trusts our CA (so it accepts the server) but its own certificate is signed
    // by another CA: the server must refuse it rather than treat it as a joiner.
    let key = NodeKey::generate().unwrap();
    let forged = Identity { ca_der: ca.cert_der.clone(), cert_der: other.issue(2, key.public_key()).unwrap(), key };
    let stranger = Transport::bind("127.0.0.1:0".parse().unwrap(), &forged, 2, Duration::from_millis(30)).unwrap();
    stranger.set_peer(1, addr(&a));
    let err = stranger.call(1, ECHO, b"let me in".to_vec(), T).await.unwrap_err();
    assert!(matches!(err, RpcError::Unreachable(..)), "{err:?}");
    // A hub that trusts another CA does not accept ours either.
    let outsider = hub(&other, 3);
    outsider.set_peer(1, addr(&a));
    assert!(outsider.call(1, ECHO, vec![], T).await.is_err());
    // The members are unharmed.
    let b = hub(&ca, 2);
    b.set_peer(1, addr(&a));
    assert_eq!(b.call(1, ECHO, b"x".to_vec(), T).await.unwrap(), b"member 2:x");
}

#[tokio::test]
async fn joiners_pin_the_ca_and_may_only_join() {
    let ca = CaMaterial::generate().unwrap();
    let a = hub(&ca, 1);
    let joiner = hub(&CaMaterial::generate().unwrap(), 9);
    let out = joiner.call_as_joiner(addr(&a), fingerprint(&ca.cert_der), vec![], T).await.unwrap();
    assert_eq!(out, b"Joiner");
    let wrong = [7u8; 32];
    let err = joiner.call_as_joiner(addr(&a), wrong, vec![], T).await.unwrap_err();
    assert!(matches!(err, RpcError::Unreachable(..)), "{err:?}");
}

/// Polls `done` until it holds, for at most `T`.
pub(super) async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A raw endpoint at `bind` that connects like a joiner (no certificate, the CA pinned), with a
/// stream receive window of `window` bytes.
pub(super) fn raw_joiner(ca: &CaMaterial, bind: &str, window: u32) -> quinn::Endpoint {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(
        crate::tls::join_client_config(fingerprint(&ca.cert_der)).unwrap(),
    )
    .unwrap();
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(window.into());
    cfg.transport_config(Arc::new(transport));
    let mut ep = quinn::Endpoint::client(bind.parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    ep
}

/// A joiner that sends a join and never reads the answer (its window too small for it) must not
/// hold its unauthenticated slot for ever: it loses the answer and then its connection.
#[tokio::test]
async fn a_joiner_that_never_takes_its_answer_loses_its_connection() {
    let ca = CaMaterial::generate().unwrap();
    let a = hub(&ca, 1);
    // A large refusal (real ones are small; a large one shows the bound, not the answer's size).
    a.register(
        StreamKind::Join,
        handler(|_caller, _p| async move {
            Err(crate::transport::Refusal::new(pb::ErrorCode::Unauthorized, "x".repeat(256 << 10)))
        }),
    );
    let ep = raw_joiner(&ca, "127.0.0.1:0", 1024);
    let conn = ep.connect(addr(&a), crate::tls::JOIN_SERVER_NAME).unwrap().await.unwrap();
    let _recv = send_empty_join(&conn).await;
    wait_for("the joiner holds a slot", || a.unauthenticated_for_tests() == 1).await;
    // The joiner's lifetime (10 s) and its answer's time (5 s) bound how long it holds the slot.
    let closed = tokio::time::timeout(Duration::from_secs(20), conn.closed()).await;
    assert!(closed.is_ok(), "the joiner still holds its connection");
    wait_for("the slot is given back", || a.unauthenticated_for_tests() == 0).await;
}

/// An admission (only a valid token gets one) is delivered whole to a joiner that takes it slowly,
/// past the joiner's lifetime: cutting it off would leave a member without its certificate.
#[tokio::test]
async fn an_admitted_joiner_gets_its_whole_answer_even_when_slow() {
    let ca = CaMaterial::generate().unwrap();
    let a = hub(&ca, 1);
    a.register(StreamKind::Join, handler(|_caller, _p| async move { Ok(vec![7u8; 256 << 10]) }));
    let ep = raw_joiner(&ca, "127.0.0.1:0", 1024);
    let conn = ep.connect(addr(&a), crate::tls::JOIN_SERVER_NAME).unwrap().await.unwrap();
    let mut recv = send_empty_join(&conn).await;
    // Deliberately slow: the reader starts after the joiner's 10 s lifetime and 5 s refusal time.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let raw = tokio::time::timeout(T, recv.read_to_end(1 << 20)).await.expect("answered").unwrap();
    let resp = pb::MeshResponse::decode(raw.as_slice()).unwrap();
    assert_eq!(resp.payload.len(), 256 << 10, "the whole admission arrived");
    let closed = tokio::time::timeout(T, conn.closed()).await;
    assert!(closed.is_ok(), "then the connection is closed");
    wait_for("the slot is given back", || a.unauthenticated_for_tests() == 0).await;
}

/// Sends an empty JOIN request on a new stream of `conn`; the stream's receiving end.
async fn send_empty_join(conn: &quinn::Connection) -> quinn::RecvStream {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let req = pb::MeshRequest { kind: StreamKind::Join as u32, from: 0, payload: vec![] };
    send.write_all(&req.encode_to_vec()).await.unwrap();
    send.finish().unwrap();
    recv
}

/// A connection from a member's own mesh address that shows no certificate is closed at once: a
/// joiner has no mesh address yet, and the member address's few slots are the mesh's.
#[tokio::test]
async fn a_member_address_without_a_certificate_is_turned_away() {
    let ca = CaMaterial::generate().unwrap();
    let a = hub(&ca, 1);
    let poser = raw_joiner(&ca, "127.0.0.1:0", 1 << 20);
    a.set_peer(2, poser.local_addr().unwrap());
    let conn = poser.connect(addr(&a), crate::tls::JOIN_SERVER_NAME).unwrap().await.unwrap();
    let reason = tokio::time::timeout(T, conn.closed()).await.expect("closed by the hub");
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == super::CLOSE_REFUSED.into()),
        "{reason:?}"
    );
    // Once the address is no longer a member's (the book rebuilt without it), it may join.
    a.set_peers(Default::default());
    let conn = poser.connect(addr(&a), crate::tls::JOIN_SERVER_NAME).unwrap().await.unwrap();
    let mut recv = send_empty_join(&conn).await;
    let resp = pb::MeshResponse::decode(recv.read_to_end(1 << 20).await.unwrap().as_slice()).unwrap();
    assert_eq!(resp.payload, b"Joiner");
}

#[tokio::test]
async fn garbage_on_the_port_changes_nothing() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    step_garbage_udp(addr(&a)).await;
    // Garbage inside a valid stream: an error answer, not a crash.
    let conn = {
        b.set_peer(1, addr(&a));
        b.call(1, ECHO, vec![], T).await.unwrap();
        b.clone()
    };
    let raw = raw_stream(&conn, 1, b"\xff\xff\xff\xff garbage").await;
    let resp = pb::MeshResponse::decode(raw.as_slice()).unwrap();
    assert_eq!(resp.code, pb::ErrorCode::BadRequest as i32);
    assert_eq!(b.call(1, ECHO, b"ok".to_vec(), T).await.unwrap(), b"member 2:ok");
}

async fn step_garbage_udp(to: SocketAddr) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..200u32 {
        let mut junk = vec![(i % 251) as u8; 1200];
        junk[0] = (i * 7) as u8;
        sock.send_to(&junk, to).await.unwrap();
    }
    let truncated_initial = [0xc0u8, 0, 0, 0, 1, 8];
    sock.send_to(&truncated_initial, to).await.unwrap();
}

pub(super) async fn raw_stream(t: &Transport, target: u64, bytes: &[u8]) -> Vec<u8> {
    t.raw_exchange_for_tests(target, bytes).await
}

#[tokio::test]
async fn bulk_streams_carry_large_bodies_in_chunks() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    a.set_peer(2, addr(&b));
    let mut call = a.call_bulk(2, FRAMES, b"h".to_vec()).await.unwrap();
    let mut want = 0u64;
    for i in 0..640u32 {
        let frame = vec![(i % 7) as u8; FRAME];
        want += frame.iter().map(|b| *b as u64).sum::<u64>();
        call.send(frame.into()).await.unwrap();
    }
    let out = tokio::time::timeout(Duration::from_secs(60), call.finish()).await.unwrap().unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), format!("h:640:{want}"));
    // 40 MiB over loopback: MTU discovery has found loopback's large datagrams.
    assert!(a.path_mtu(2).unwrap() > 1452, "path MTU {:?}", a.path_mtu(2));
    // Unary calls share the connection and still work.
    assert_eq!(a.call(2, ECHO, b"ok".to_vec(), T).await.unwrap(), b"member 1:ok");
}

#[tokio::test]
async fn bad_bulk_streams_get_clear_errors() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    a.set_peer(2, addr(&b));
    let code = |raw: Vec<u8>| pb::MeshResponse::decode(raw.as_slice()).unwrap();
    // A body that ends inside a frame, read either way.
    for header in [&b""[..], b"exact"] {
        let mut call = a.call_bulk(2, FRAMES, header.to_vec()).await.unwrap();
        call.send(vec![1u8; FRAME + 10].into()).await.unwrap();
        let err = call.finish().await.unwrap_err();
        assert!(matches!(&err, RpcError::Remote(r) if r.message.contains("ended after 10")), "{err:?}");
    }
    // Whole frames read either way.
    let mut call = a.call_bulk(2, FRAMES, b"exact".to_vec()).await.unwrap();
    call.send(vec![2u8; 2 * FRAME].into()).await.unwrap();
    let out = call.finish().await.unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), format!("exact:2:{}", 4 * FRAME));
    // A kind without a bulk handler: refused, the sender's body is not read, and the sender
    // learns why.
    let err = a.call_bulk(2, StreamKind::CheckpointFetch, vec![]).await.unwrap().finish().await.unwrap_err();
    assert_eq!(err.code(), Some(pb::ErrorCode::BadRequest), "{err:?}");
    let mut call = a.call_bulk(2, StreamKind::CheckpointFetch, vec![]).await.unwrap();
    let sent = async {
        for _ in 0..4096 {
            call.send(vec![0u8; FRAME].into()).await?;
        }
        call.finish().await
    };
    let err = tokio::time::timeout(Duration::from_secs(30), sent).await.unwrap().unwrap_err();
    assert!(matches!(&err, RpcError::Remote(r) if r.message.contains("unknown bulk stream kind")), "{err:?}");
    // An oversized header length, a truncated header, a header that is not protobuf.
    for raw in [&b"\x00\xff\xff\xff\xff"[..], b"\x00\x10\x00\x00\x00abc", b"\x00\x02\x00\x00\x00\xff\xff"] {
        let resp = code(raw_stream(&a, 2, raw).await);
        assert_eq!(resp.code, pb::ErrorCode::BadRequest as i32, "{raw:?}: {}", resp.message);
    }
    // The endpoint goes on.
    assert_eq!(a.call(2, ECHO, b"ok".to_vec(), T).await.unwrap(), b"member 1:ok");
}

#[tokio::test]
async fn typed_endpoints_decode_once_refuse_garbage_and_short_cut_to_this_hub() {
    let ca = CaMaterial::generate().unwrap();
    let serve = |t: &Transport| {
        MODULE_FETCH.serve(t, |from, req: pb::ModuleFetchRequest| async move {
            if req.hash.is_empty() {
                return Err(crate::transport::Refusal::new(pb::ErrorCode::NotFound, "no such module")
                    .with_hint(pb::ErrorHint { limit: 42, ..Default::default() }));
            }
            Ok(pb::ModuleFetchResponse { module: [from.0.to_le_bytes().to_vec(), req.hash].concat() })
        })
    };
    let a = Transport::bind("127.0.0.1:0".parse().unwrap(), &identity(&ca, 1), 1, Duration::from_millis(30)).unwrap();
    let b = Transport::bind("127.0.0.1:0".parse().unwrap(), &identity(&ca, 2), 2, Duration::from_millis(30)).unwrap();
    serve(&a);
    serve(&b);
    a.set_peer(2, addr(&b));
    let req = pb::ModuleFetchRequest { hash: b"h".to_vec() };
    let remote = MODULE_FETCH.call(&a, 2, &req, T).await.unwrap();
    assert_eq!(remote.module, [1u64.to_le_bytes().to_vec(), b"h".to_vec()].concat());
    // To itself: the handler runs in process (no peer address is known for hub 1).
    let local = MODULE_FETCH.call(&a, 1, &req, T).await.unwrap();
    assert_eq!(local.module, [1u64.to_le_bytes().to_vec(), b"h".to_vec()].concat());
    // A refusal comes back with its code and hint, not as text to parse.
    let err = MODULE_FETCH.call(&a, 2, &pb::ModuleFetchRequest::default(), T).await.unwrap_err();
    let RpcError::Remote(r) = err else { panic!("{err:?}") };
    assert_eq!((r.code, r.hint.limit), (pb::ErrorCode::NotFound, 42));
    // A payload that does not decode as the endpoint's request type is refused before the handler.
    let err = a.call(2, StreamKind::ModuleFetch, vec![0xff, 0xff, 0xff], T).await.unwrap_err();
    assert_eq!(err.code(), Some(pb::ErrorCode::BadRequest), "{err:?}");
}

/// Tells when a handler ran, and how many times it answered.
#[derive(Clone)]
pub(super) struct Ran {
    ran: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<()>>>,
    answered: Arc<std::sync::atomic::AtomicUsize>,
}

impl Ran {
    /// Completes when the handler next runs (a caller's `give_up`).
    pub(super) fn next(&self) -> impl std::future::Future<Output = ()> + 'static {
        let ran = self.ran.clone();
        async move {
            ran.lock().await.recv().await;
        }
    }

    /// Answers the handler has given so far.
    pub(super) fn answered(&self) -> usize {
        self.answered.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Serves `PROPOSE` on `t` with a handler that tells when it runs, then answers its payload
/// after `answer_after` (never, if `None`).
pub(super) fn serve_propose_that_runs(t: &Transport, answer_after: Option<Duration>) -> Ran {
    let (ran_tx, ran_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = answered.clone();
    t.register(
        StreamKind::Propose,
        handler(move |_caller, payload: Vec<u8>| {
            let (ran, count) = (ran_tx.clone(), count.clone());
            async move {
                let _ = ran.send(());
                match answer_after {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending::<()>().await,
                }
                count.fetch_add(1, std::sync::atomic::Ordering::Release);
                Ok(payload)
            }
        }),
    );
    Ran { ran: Arc::new(tokio::sync::Mutex::new(ran_rx)), answered }
}

/// A handler that ran may never be reported as a request its peer did not receive, even when
/// the caller gives up before the peer's acknowledgement is back (QUIC delays acknowledgements
/// by up to 25 ms; a hub that dies in between never sends one).
#[tokio::test]
async fn a_request_the_peer_ran_is_never_reported_undelivered() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    // Ran, but no answer comes: a hub that dies right after acting.
    let ran = serve_propose_that_runs(&b, None);
    a.set_peer(2, addr(&b));
    for round in 0..20 {
        let err = a.call_unless(2, StreamKind::Propose, vec![round], T, ran.next()).await.unwrap_err();
        assert!(matches!(err, RpcError::Timeout), "round {round}: the peer ran the request, yet {err:?}");
    }
    // A caller that gives up before sending is told the peer does not have the request.
    let err = a.call_unless(2, StreamKind::Propose, vec![], T, async {}).await.unwrap_err();
    assert!(matches!(err, RpcError::NotDelivered(2)), "{err:?}");
}

/// A burst of calls to a peer with no open connection dials it once: every call is answered (each
/// opening its own connection would spend the peer's few slots for this hub's address).
#[tokio::test]
async fn a_burst_of_calls_shares_one_dial() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    a.set_peer(2, addr(&b));
    b.set_peer(1, addr(&a));
    let calls = (0..40u8).map(|i| {
        let b = b.clone();
        async move { b.call(1, ECHO, vec![i], T).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    let failed: Vec<_> = answers.iter().filter(|r| r.is_err()).collect();
    assert!(failed.is_empty(), "{} of 40 calls failed: {failed:?}", failed.len());
    assert_eq!(a.live_connections_for_tests(), 1, "one connection from b");
}

/// Every connection asks its peer to acknowledge within 1 ms (QUIC's ack-frequency extension), so
/// that a lost request or answer is resent after a probe timeout of a few ms, not after QUIC's
/// 25 ms ack delay — most of a Raft heartbeat's 30 ms.
#[tokio::test]
async fn connections_ask_their_peer_to_acknowledge_at_once() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    a.set_peer(2, addr(&b));
    assert_eq!(a.call(2, ECHO, b"hi".to_vec(), T).await.unwrap(), b"member 1:hi");
    // quinn sends ACK_FREQUENCY frames only when configured to: both ends ask, and each receives
    // the other's request.
    wait_for("each end received the other's request for immediate acks", || {
        let dialled = a.connection_stats_for_tests(2).expect("a connection to hub 2");
        let accepted = b.accepted_stats_for_tests();
        dialled.frame_rx.ack_frequency >= 1 && accepted.len() == 1 && accepted[0].frame_rx.ack_frequency >= 1
    })
    .await;
}

/// A caller that stops waiting before the handshake ends (a Raft heartbeat's 30 ms on a loaded
/// machine) does not take the dial down with it: the connection is made and kept for the next
/// call. (When every call cancelled its own dial, a restarted leader never reached its followers
/// again while the machine was busy.)
#[tokio::test]
async fn a_dial_outlives_a_caller_that_stops_waiting() {
    let ca = CaMaterial::generate().unwrap();
    let (a, b) = (hub(&ca, 1), hub(&ca, 2));
    a.set_peer(2, addr(&b));
    // Gives up at the next timer tick (1 ms), long before a debug build's handshake ends: the
    // request never left, so the peer does not have it (`NotDelivered`). A busy machine may let
    // the handshake end first (`Timeout`: sent, no answer yet) and a release build might even
    // answer within it; the rest holds either way.
    let first = a.call(2, ECHO, b"early".to_vec(), Duration::from_micros(1)).await;
    assert!(matches!(first, Err(RpcError::NotDelivered(2) | RpcError::Timeout) | Ok(_)), "{first:?}");
    wait_for("the dial the caller left ends in a connection", || a.path_mtu(2).is_some()).await;
    wait_for("the peer sees one connection", || b.live_connections_for_tests() == 1).await;
    assert_eq!(a.call(2, ECHO, b"hi".to_vec(), T).await.unwrap(), b"member 1:hi");
    assert_eq!(b.live_connections_for_tests(), 1, "the next call used it");
}

/// A hub that dies without a word (its runtime dropped: no close is sent) and comes back on the
/// same address with the same key: the peer's connection to the dead process is reset by the new
/// one (RFC 9000 stateless reset, keyed by the node's key) at the peer's next keep-alive, well
/// before its 5 s idle timeout, and the next call reaches the new process.
#[tokio::test]
async fn a_hub_restarted_on_its_address_resets_the_connections_to_its_old_self() {
    let ca = CaMaterial::generate().unwrap();
    let a = hub(&ca, 1);
    let id = identity(&ca, 2);
    let (ready, bound) = std::sync::mpsc::channel();
    let (crash, crashed) = std::sync::mpsc::channel::<()>();
    let old = {
        let id = id.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let transport = rt.block_on(async {
                let t = Transport::bind("127.0.0.1:0".parse().unwrap(), &id, 2, Duration::from_millis(30)).unwrap();
                t.register(
                    ECHO,
                    handler(|_, payload: Vec<u8>| async move { Ok([b"old:".to_vec(), payload].concat()) }),
                );
                t
            });
            ready.send(transport.local_addr().unwrap()).unwrap();
            // Serve until told to crash, then drop the runtime: its tasks and socket are gone and
            // nothing is sent.
            rt.block_on(async { tokio::task::spawn_blocking(move || crashed.recv()).await.unwrap().unwrap() });
            rt.shutdown_background();
            drop(transport);
        })
    };
    let at = bound.recv().unwrap();
    a.set_peer(2, at);
    assert_eq!(a.call(2, ECHO, b"x".to_vec(), T).await.unwrap(), b"old:x");
    let before = lock(&a.conns).get(&2).cloned().expect("a connection to the old process");
    crash.send(()).unwrap();
    old.join().unwrap();

    let new = Transport::bind(at, &id, 2, Duration::from_millis(30)).unwrap();
    new.register(ECHO, handler(|_, payload: Vec<u8>| async move { Ok([b"new:".to_vec(), payload].concat()) }));
    wait_for("the old connection is closed", || before.close_reason().is_some()).await;
    let reason = before.close_reason().unwrap();
    assert!(matches!(reason, quinn::ConnectionError::Reset), "closed by a stateless reset, not a timeout: {reason:?}");
    assert_eq!(a.call(2, ECHO, b"y".to_vec(), T).await.unwrap(), b"new:y");
}

/// What the tests read of an endpoint's inside.
impl Transport {
    /// Unauthenticated connections holding a stranger's slot.
    pub(super) fn unauthenticated_for_tests(&self) -> usize {
        self.admission.held()
    }

    /// quinn's statistics of the cached connection to `node`.
    pub(super) fn connection_stats_for_tests(&self, node: u64) -> Option<quinn::ConnectionStats> {
        lock(&self.conns).get(&node).map(|c| c.stats())
    }

    /// quinn's statistics of the member connections other hubs opened to this one.
    pub(super) fn accepted_stats_for_tests(&self) -> Vec<quinn::ConnectionStats> {
        lock(&self.live).values().map(|(_, c)| c.stats()).collect()
    }

    /// Kept streams opened so far, and those idle for `node`.
    pub(super) fn kept_streams_for_tests(&self, node: u64) -> (u64, usize) {
        (self.kept.stats().opened, self.kept.idle(node))
    }

    /// Open member connections to this hub.
    pub(super) fn live_connections_for_tests(&self) -> usize {
        lock(&self.live).len()
    }

    /// Sends raw bytes on a fresh stream to `target` and returns the raw answer.
    pub(super) async fn raw_exchange_for_tests(&self, target: u64, bytes: &[u8]) -> Vec<u8> {
        let conn = self.connection(target).await.expect("connected");
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        send.write_all(bytes).await.expect("write");
        send.finish().expect("finish");
        recv.read_to_end(MAX_FRAME).await.expect("answer")
    }
}
