//! The mesh port (UDP, QUIC) played as an attacker on the LAN would, from this machine, against a
//! running 3-hub mesh: a flood of unauthenticated connections with oversized requests, garbage and
//! wrong-secret joins, a member that lies about who it is, and a removed hub that keeps its open
//! connection. Each is refused, and nothing changes: hub memory stays near its idle figure, the
//! Raft log does not move, the mesh keeps its three voters.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hubmesh_consensus::join::JoinToken;
use hubmesh_consensus::tls::{self, Identity, NodeKey};
use hubmesh_consensus::transport::StreamKind;
use hubmesh_proto::{pb, Message};

use crate::harness::{step, wait_until, Hub};

fn mesh_addr(hub: &Hub) -> SocketAddr {
    std::fs::read_to_string(hub.data_dir().join("mesh.addr")).unwrap().trim().parse().unwrap()
}

/// A hub's certificate and key, as a thief of its data dir would have them.
fn identity(hub: &Hub) -> Identity {
    let read = |f: &str| std::fs::read(hub.data_dir().join("tls").join(f)).unwrap();
    Identity {
        ca_der: read("ca.der"),
        cert_der: read("node.der"),
        key: NodeKey::from_pkcs8(&read("node.key")).unwrap(),
    }
}

fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

fn quic_config(crypto: rustls::ClientConfig) -> quinn::ClientConfig {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()));
    cfg.transport_config(Arc::new(t));
    cfg
}

/// No certificate; the hub's chain must end in the mesh CA (the token's fingerprint).
fn joiner(token: &JoinToken) -> quinn::ClientConfig {
    quic_config(tls::join_client_config(token.ca_fingerprint).unwrap())
}

/// One request on a new stream of `conn`, and the hub's answer.
async fn exchange(
    conn: &quinn::Connection,
    kind: StreamKind,
    from: u64,
    payload: Vec<u8>,
) -> Result<pb::MeshResponse, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let req = pb::MeshRequest { kind: kind as u32, from, payload };
    send.write_all(&req.encode_to_vec()).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let bytes = recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())?;
    pb::MeshResponse::decode(bytes.as_slice()).map_err(|e| e.to_string())
}

fn code(resp: &pb::MeshResponse) -> pb::ErrorCode {
    pb::ErrorCode::try_from(resp.code).unwrap()
}

fn ping() -> Vec<u8> {
    serde_json::to_vec(&()).unwrap()
}

struct Baseline {
    last_applied: u64,
    term: u64,
    nodes: usize,
}

async fn baseline(hub: &Hub) -> Baseline {
    let s = hub.client.status().await.unwrap();
    Baseline { last_applied: s.last_applied, term: s.term, nodes: s.nodes.len() }
}

async fn assert_unchanged(hubs: &[&Hub], before: &[Baseline], what: &str) {
    for (h, b) in hubs.iter().zip(before) {
        let s = h.client.status().await.unwrap();
        // A new term's leader appends one blank entry (an election on a loaded machine is not
        // the attacker's write); nothing else may be appended.
        let elections = s.term.saturating_sub(b.term);
        assert!(
            s.last_applied <= b.last_applied + elections,
            "{what}: hub {}'s Raft log moved from {} to {} in {elections} new terms",
            h.name,
            b.last_applied,
            s.last_applied
        );
        assert_eq!(s.nodes.len(), b.nodes, "{what}: hub {}'s membership changed", h.name);
        assert_eq!(s.voters.len(), 3, "{what}: hub {} lost a voter", h.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attacker_on_the_mesh_port_is_refused_and_changes_nothing() {
    let a = Hub::start("atk-a").await;
    let token_text = a.client.create_token(Some("10m")).await.unwrap().token;
    let b = Hub::start_with("atk-b", &["--join", &token_text]).await;
    let c = Hub::start_with("atk-c", &["--join", &token_text]).await;
    let hubs = [&a, &b, &c];
    for h in hubs {
        let client = h.client.clone();
        wait_until(Duration::from_secs(60), &format!("hub {} sees 3 voters", h.name), || {
            let c = client.clone();
            async move { c.status().await.is_ok_and(|s| s.voters.len() == 3) }
        })
        .await;
    }
    // An idle mesh appends nothing to its Raft log: wait until every hub has applied the same.
    wait_until(Duration::from_secs(30), "the Raft logs settle", || async {
        let mut applied = Vec::new();
        for h in hubs {
            applied.push(h.client.status().await.map(|s| s.last_applied).unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut again = Vec::new();
        for h in hubs {
            again.push(h.client.status().await.map(|s| s.last_applied).unwrap_or(1));
        }
        applied == again && applied.windows(2).all(|w| w[0] == w[1])
    })
    .await;
    let mut before = Vec::new();
    for h in hubs {
        before.push(baseline(h).await);
    }
    let token = JoinToken::parse(&token_text).unwrap();
    let (a_id, b_id, c_id) = (
        a.client.status().await.unwrap().node_id,
        b.client.status().await.unwrap().node_id,
        c.client.status().await.unwrap().node_id,
    );
    let target = mesh_addr(&a);
    let attacker = client_endpoint();

    step("wrong-secret and garbage joins: refused before anything is signed or proposed");
    let mut answers = std::collections::BTreeMap::<i32, usize>::new();
    for i in 0..60u64 {
        let conn = attacker.connect_with(joiner(&token), target, "join.hubmesh").unwrap().await.unwrap();
        let payload = if i % 2 == 0 {
            pb::JoinRequest {
                token_id: token.id.clone(),
                secret: vec![0; 16],
                node_id: 1_000 + i,
                name: "x".repeat(100_000.min(1 << (i % 18))),
                api_addr: String::new(),
                mesh_addr: "127.0.0.1:9".into(),
                public_key: vec![7; 32],
            }
            .encode_to_vec()
        } else {
            (0..(i * 37 % 4000)).map(|j| (j * 131 + i) as u8).collect()
        };
        let resp = exchange(&conn, StreamKind::Join, 0, payload).await;
        match resp {
            Ok(r) => *answers.entry(r.code).or_default() += 1,
            Err(_) => *answers.entry(-1).or_default() += 1,
        }
        conn.close(0u32.into(), b"");
    }
    eprintln!("join answers by code: {answers:?}");
    assert!(!answers.contains_key(&0), "a bad join was accepted: {answers:?}");
    let refused_for_cause = answers.get(&(pb::ErrorCode::Unauthorized as i32)).copied().unwrap_or(0)
        + answers.get(&(pb::ErrorCode::BadRequest as i32)).copied().unwrap_or(0);
    assert!(refused_for_cause >= 5, "the first joins are refused for what they are: {answers:?}");
    assert!(
        answers.get(&(pb::ErrorCode::Unavailable as i32)).copied().unwrap_or(0) >= 30,
        "joins beyond the per-address budget are refused: {answers:?}"
    );
    assert_unchanged(&hubs, &before, "after the joins").await;

    step("a flood of unauthenticated connections, each sending an oversized request");
    let idle = a.rss_bytes();
    let mut peak = idle;
    let (mut refused, mut accepted, mut answered_oversized) = (0usize, 0usize, 0usize);
    for _wave in 0..10 {
        let mut wave = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let cfg = joiner(&token);
            let ep = attacker.clone();
            wave.spawn(async move {
                let Ok(Ok(conn)) =
                    tokio::time::timeout(Duration::from_secs(5), ep.connect_with(cfg, target, "join.hubmesh").unwrap())
                        .await
                else {
                    return (false, false, None);
                };
                // 8 MiB in one request on a join stream, then a second stream.
                let big = pb::MeshRequest { kind: StreamKind::Join as u32, from: 0, payload: vec![0x55; 8 << 20] }
                    .encode_to_vec();
                let answer = tokio::time::timeout(Duration::from_secs(5), async {
                    let (mut send, mut recv) = conn.open_bi().await.ok()?;
                    let _ = send.write_all(&big).await;
                    let _ = send.finish();
                    let bytes = recv.read_to_end(1 << 20).await.ok()?;
                    pb::MeshResponse::decode(bytes.as_slice()).ok()
                })
                .await
                .ok()
                .flatten();
                (true, answer.as_ref().is_some_and(|r| code(r) == pb::ErrorCode::BadRequest), Some(conn))
            });
        }
        let mut held = Vec::new();
        while let Some(r) = wave.join_next().await {
            let (ok, bad_request, conn) = r.unwrap();
            if ok {
                accepted += 1;
            } else {
                refused += 1;
            }
            answered_oversized += usize::from(bad_request);
            held.extend(conn);
        }
        peak = peak.max(a.rss_bytes());
        drop(held);
    }
    eprintln!(
        "flood: {accepted} accepted, {refused} refused, {answered_oversized} oversized requests answered bad_request; \
         hub RSS idle {} KiB, peak {} KiB",
        idle >> 10,
        peak >> 10
    );
    assert!(refused > 0, "connections beyond the per-address limit are refused");
    assert!(
        accepted > 0 && answered_oversized > 0,
        "some connections were served and their oversized requests refused"
    );
    assert!(peak < idle + (8 << 20), "hub RSS grew from {} KiB to {} KiB under the flood", idle >> 10, peak >> 10);
    assert_unchanged(&hubs, &before, "after the flood").await;

    step("a member that lies about who it is");
    let a_identity = identity(&a);
    let member = quic_config(a_identity.client_config().unwrap());
    let conn = attacker.connect_with(member.clone(), mesh_addr(&b), &tls::server_name(b_id)).unwrap().await.unwrap();
    let honest = exchange(&conn, StreamKind::Ping, a_id, ping()).await.unwrap();
    assert_eq!(code(&honest), pb::ErrorCode::Unspecified, "a's own certificate speaking for a: {honest:?}");
    let lie = exchange(&conn, StreamKind::Ping, c_id, ping()).await.unwrap();
    assert_eq!(code(&lie), pb::ErrorCode::Unauthorized, "a's certificate claiming to be c: {lie:?}");
    let conn2 = attacker.connect_with(member, mesh_addr(&b), &tls::server_name(b_id)).unwrap().await.unwrap();
    let lie = exchange(&conn2, StreamKind::RaftVote, c_id, b"{}".to_vec()).await.unwrap();
    assert_eq!(code(&lie), pb::ErrorCode::Unauthorized, "a vote request as c on a fresh connection: {lie:?}");
    assert_unchanged(&hubs, &before, "after the lies").await;

    step("a removed hub's open connection is closed at once");
    let c_identity = identity(&c);
    let c_member = quic_config(c_identity.client_config().unwrap());
    let old = attacker.connect_with(c_member.clone(), target, &tls::server_name(a_id)).unwrap().await.unwrap();
    let ok = exchange(&old, StreamKind::Ping, c_id, ping()).await.unwrap();
    assert_eq!(code(&ok), pb::ErrorCode::Unspecified, "c is still a member: {ok:?}");
    a.client.remove_node("atk-c").await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), old.closed())
        .await
        .expect("the removed hub's connection is closed within 5 s");
    eprintln!("the removed hub's connection: {reason}");
    assert!(exchange(&old, StreamKind::Ping, c_id, ping()).await.is_err());
    let again = attacker.connect_with(c_member, target, &tls::server_name(a_id)).unwrap().await;
    let refused_again = match again {
        Err(_) => true,
        Ok(conn) => exchange(&conn, StreamKind::Ping, c_id, ping()).await.is_err(),
    };
    assert!(refused_again, "a new connection with the removed hub's certificate is refused");
}
