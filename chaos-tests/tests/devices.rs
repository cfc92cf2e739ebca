//! Device discovery on a real network (root only, like the chaos lab): five hubs on LAN A, two
//! of them also on LAN B; simulated devices (`hubmesh-devsim`, mDNS) on each LAN. Every hub
//! must know every device with the right seen-by set, a clean leave must be gone everywhere, a
//! silent vanish must leave within its probe bound, a partition must make a device
//! `unreachable`, never missing, and heal without a flap, and a task placed near a device
//! fails over only to a hub that sees it and follows the device when it moves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hubmesh_chaos::lab::{skip_without_root, Lab, Rules};
use hubmesh_proto::api::{DeployParams, DeviceInfo};

const ECHO: &[u8] = include_bytes!("../../examples/tasks/echo.wat");

fn id(name: &str) -> String {
    format!("mdns:_hubmesh-dev._tcp/id={name}")
}

/// Every hub's device list, by hub index (each must answer: an absence proves nothing otherwise).
async fn lists(lab: &Lab, hubs: &[usize]) -> BTreeMap<usize, BTreeMap<String, DeviceInfo>> {
    let mut out = BTreeMap::new();
    for &i in hubs {
        let list = lab.hubs[i].client.devices().await.unwrap_or_else(|e| panic!("n{} does not answer: {e}", i + 1));
        out.insert(i, list.into_iter().map(|d| (d.id.clone(), d)).collect());
    }
    out
}

fn seen_by(d: &DeviceInfo) -> BTreeSet<String> {
    d.seen_by.iter().map(|s| s.node_name.clone()).collect()
}

/// Polls until `ok` holds for the lists of `hubs`, or fails after `limit` with the last lists.
async fn until(
    lab: &Lab,
    hubs: &[usize],
    limit: Duration,
    what: &str,
    ok: impl Fn(&BTreeMap<String, DeviceInfo>) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let all = lists(lab, hubs).await;
        if all.values().all(&ok) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}; the hubs' lists: {all:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn names(set: &[&str]) -> BTreeSet<String> {
    set.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_discover_devices_gossip_them_and_keep_them_through_a_partition() {
    if skip_without_root() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("devices-lab");
    let _ = std::fs::remove_dir_all(&dir);
    let bin: PathBuf = hubmesh_chaos::find_hubmesh(None).expect("the hubmesh binary next to this test");
    let devsim = Path::new(env!("CARGO_BIN_EXE_hubmesh-devsim"));
    let mut lab = Lab::up(&dir, 5, false, &bin, "lan", &[], Duration::from_secs(5)).await.expect("the lab is up");
    let all: Vec<usize> = (0..5).collect();
    lab.add_lan_b(&[3, 4]).expect("LAN B");
    let mut lamps = lab.spawn_devsim(devsim, 1, false, "mdns", "lamp", 2).expect("lamps on LAN A");
    let _fan = lab.spawn_devsim(devsim, 2, true, "mdns", "fan", 1).expect("a fan on LAN B");
    let mut plug = lab.spawn_devsim(devsim, 3, false, "mdns", "plug", 1).expect("a plug on LAN A");
    let mut tv = lab.spawn_devsim(devsim, 4, false, "ssdp", "tv", 1).expect("a UPnP TV on LAN A");
    let tv_id = "ssdp:uuid:hubmesh-devsim-tv-0".to_owned();
    let mut radio = lab.spawn_devsim(devsim, 5, false, "ssdp", "radio", 1).expect("a UPnP radio on LAN A");
    let radio_id = "ssdp:uuid:hubmesh-devsim-radio-0".to_owned();

    // 1. Every hub knows every device; a LAN A device is seen by all five, LAN B's only by the
    //    two hubs on LAN B (the others learnt it by gossip); one entry per device.
    let every_hub = names(&["n1", "n2", "n3", "n4", "n5"]);
    let took = until(&lab, &all, Duration::from_secs(60), "discovery", |l| {
        l.len() == 6
            && ["lamp-0", "lamp-1", "plug-0"].iter().all(|n| l.get(&id(n)).is_some_and(|d| seen_by(d) == every_hub))
            && [&tv_id, &radio_id].iter().all(|i| l.get(*i).is_some_and(|d| seen_by(d) == every_hub))
            && l.get(&id("fan-0")).is_some_and(|d| seen_by(d) == names(&["n4", "n5"]) && d.reach == "seen")
    })
    .await;
    eprintln!("discovered everywhere in {took:?}");
    let lamp = &lists(&lab, &[0]).await[&0][&id("lamp-0")];
    assert_eq!(lamp.name, "lamp-0");
    assert_eq!(lamp.kind, "_hubmesh-dev._tcp");
    assert_eq!(lamp.addresses, vec!["10.77.0.101:8000".to_owned()], "one entry, its own address: {lamp:?}");
    assert_eq!(lamp.properties.get("model").map(String::as_str), Some("hubmesh-devsim"));
    let tvs = &lists(&lab, &[0]).await[&0][&tv_id];
    assert_eq!(tvs.kind, "urn:schemas-upnp-org:device:BinaryLight:1");
    assert_eq!(tvs.addresses, vec!["10.77.0.104".to_owned()]);
    assert_eq!(tvs.properties.get("location").map(String::as_str), Some("http://10.77.0.104:8000/description.xml"));

    // A stranger on LAN A — a libp2p node with its own key, announcing itself by mDNS, dialling
    // every hub's gossip port and publishing forged sightings in n1's name — gets nothing in.
    let n1 = lab.hubs[0].node_id;
    let said = lab.run_stranger(devsim, 6, n1, 5).expect("the stranger runs");
    eprintln!("stranger: {said}");
    let said: serde_json::Value = serde_json::from_str(&said).expect("the stranger's JSON");
    assert_eq!(said["published"], 0, "a non-member never has a subscribed member to publish to: {said}");
    assert!(said["longest_ms"].as_u64().is_some_and(|ms| ms < 1000), "no connection stays up: {said}");
    for (hub, l) in lists(&lab, &all).await {
        assert!(!l.keys().any(|k| k.contains("intruder")), "n{} took a forged sighting: {l:#?}", hub + 1);
    }

    // 2. A clean leave (mDNS goodbye) is gone from every hub.
    lamps.leave(1).expect("lamp-1 leaves");
    let lamp0 = id("lamp-0");
    let took = until(&lab, &all, Duration::from_secs(10), "a clean leave", |l| {
        !l.contains_key(&id("lamp-1")) && l.contains_key(&lamp0)
    })
    .await;
    eprintln!("a clean leave (mDNS goodbye) gone everywhere in {took:?}");
    tv.leave(0).expect("the TV leaves");
    let took = until(&lab, &all, Duration::from_secs(10), "an SSDP byebye", |l| {
        !l.contains_key(&tv_id) && l.contains_key(&radio_id)
    })
    .await;
    eprintln!("a clean leave (SSDP byebye) gone everywhere in {took:?}");

    // 3. A silent vanish (SIGKILL: no goodbye) leaves every hub within the probe bound (mDNS: a
    //    10 s probe + 10 s verify, far below its 75-minute TTL; SSDP: 25 s of silence, looked for each second).
    plug.vanish();
    radio.vanish();
    let took = until(&lab, &all, Duration::from_secs(45), "a silent vanish", |l| {
        !l.contains_key(&id("plug-0")) && !l.contains_key(&radio_id) && l.contains_key(&lamp0)
    })
    .await;
    eprintln!("a silent vanish (mDNS and SSDP) gone everywhere in {took:?}");

    // 4. Cut n4 and n5 (the only hubs on LAN B) off from n1-n3: for n1-n3 the fan turns
    //    `unreachable`, and is never missing; lamp-0 stays seen (n1-n3 see it themselves).
    let side = |others: [usize; 3]| Rules { drop_from: others.into(), drop_to: others.into(), ..Default::default() };
    for i in [3, 4] {
        lab.set_rules(i, &side([0, 1, 2])).expect("cutting");
    }
    let start = Instant::now();
    let mut turned = None;
    while start.elapsed() < Duration::from_secs(20) {
        let now = lists(&lab, &[0, 1, 2]).await;
        for (hub, l) in &now {
            let fan =
                l.get(&id("fan-0")).unwrap_or_else(|| panic!("n{} lost the fan during the partition: {l:#?}", hub + 1));
            assert_eq!(l.get(&id("lamp-0")).map(|d| d.reach.as_str()), Some("seen"), "lamp-0 on n{}", hub + 1);
            if fan.reach == "unreachable" && hub == &0 && turned.is_none() {
                turned = Some(start.elapsed());
            }
        }
        if now.values().all(|l| l[&id("fan-0")].reach == "unreachable") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = turned.expect("the fan turned unreachable on n1 within 20 s");
    let now = lists(&lab, &[0, 1, 2]).await;
    assert!(now.values().all(|l| l[&id("fan-0")].reach == "unreachable"), "on every hub of the cut side: {now:#?}");
    eprintln!("partition: the fan unreachable on n1 after {took:?}");
    let fan = &lists(&lab, &[0]).await[&0][&id("fan-0")];
    assert_eq!(seen_by(fan), names(&["n4", "n5"]), "seen-by kept: {fan:?}");
    assert!(fan.unreachable_since_ms.is_some());

    // Heal: the fan is seen again without ever having been missing.
    for i in [3, 4] {
        lab.set_rules(i, &Rules::default()).expect("healing");
    }
    let start = Instant::now();
    loop {
        let now = lists(&lab, &[0, 1, 2]).await;
        for (hub, l) in &now {
            assert!(l.contains_key(&id("fan-0")), "n{} lost the fan while healing: {l:#?}", hub + 1);
        }
        if now.values().all(|l| l[&id("fan-0")].reach == "seen") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the fan is not seen again after the heal: {now:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("healed: the fan seen again after {:?}", start.elapsed());
    // And it stays so: no flap after the heal.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let now = lists(&lab, &all).await;
        assert!(
            now.values().all(|l| l.get(&id("fan-0")).is_some_and(|d| d.reach == "seen")),
            "a flap after the heal: {now:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 5. The registries converge: every hub holds the same devices with the same seen-by sets.
    let view = |l: &BTreeMap<String, DeviceInfo>| -> Vec<(String, BTreeSet<String>, String)> {
        l.values().map(|d| (d.id.clone(), seen_by(d), d.reach.clone())).collect()
    };
    let start = Instant::now();
    loop {
        let now = lists(&lab, &all).await;
        let first = view(&now[&0]);
        if now.values().all(|l| view(l) == first) {
            assert_eq!(first.len(), 2, "lamp-0 and the fan: {first:?}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "the registries differ: {now:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 6. `--near`: a task near the fan runs only on n4 or n5 (the hubs that see it) and fails
    //    over only to the other; a task near a device nobody sees waits, with the reason.
    let c = lab.hubs[0].client.clone();
    let near_fan = DeployParams { near: Some(id("fan-0")), ..Default::default() };
    let task = c.deploy("fan-control", ECHO.to_vec(), &near_fan, false).await.expect("deploy near the fan").task;
    let host = task.placement.as_ref().map(|p| p.node_name.clone()).expect("placed at once");
    assert!(host == "n4" || host == "n5", "placed near the fan: {task:?}");
    assert_eq!(c.invoke("fan-control", b"hi".to_vec(), None).await.expect("it answers"), b"hi");
    let ghost = DeployParams { near: Some(id("ghost")), ..Default::default() };
    let waiting = c.deploy("ghost-control", ECHO.to_vec(), &ghost, false).await.expect("deploy near a ghost").task;
    assert_eq!(waiting.state, "pending", "{waiting:?}");
    assert_eq!(waiting.reason.as_deref(), Some(format!("no hub sees {}", id("ghost")).as_str()));
    let (host_i, other) = if host == "n4" { (3, "n5") } else { (4, "n4") };
    lab.kill(host_i).expect("killing the task's host");
    let start = Instant::now();
    loop {
        let t = c.task("fan-control").await.expect("task show");
        let now = t.placement.as_ref().map(|p| p.node_name.clone());
        if now.as_deref() == Some(other) {
            break;
        }
        assert!(now.as_deref() == Some(host.as_str()), "failed over to a hub that does not see the fan: {t:?}");
        assert!(start.elapsed() < Duration::from_secs(30), "no failover to {other}: {t:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the task near the fan failed over from {host} to {other} in {:?}", start.elapsed());

    // 7. The dead host comes back off LAN B: it no longer sees the fan, and its complete account
    //    makes every hub forget the sighting it had before the restart.
    lab.detach_lan_b(host_i).expect("off LAN B");
    lab.restart(host_i).await.expect("restart");
    let took = until(&lab, &all, Duration::from_secs(30), "forgetting a restarted hub's stale sighting", |l| {
        l.get(&id("fan-0")).is_some_and(|d| seen_by(d) == names(&[other]))
    })
    .await;
    eprintln!("a restarted hub's stale sighting forgotten everywhere in {took:?}");

    // 8. A task follows its device: near lamp-0 (LAN A, seen by every hub) and moved to n1 by
    //    hand, then lamp-0 moves to LAN B, where only `other` sees it: the leader live-migrates
    //    the task there, and its history says why.
    let near_lamp = DeployParams { near: Some(id("lamp-0")), ..Default::default() };
    c.deploy("lamp-control", ECHO.to_vec(), &near_lamp, false).await.expect("deploy near lamp-0");
    // (Its hub answers `not now` until the instance runs: tried again for a while.)
    let start = Instant::now();
    loop {
        let on = c.task("lamp-control").await.expect("task show").placement.map(|p| p.node_name);
        if on.as_deref() == Some("n1") {
            break;
        }
        match c.migrate("lamp-control", Some("n1")).await {
            Ok(_) => break,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(20), "migrate to n1, which sees lamp-0: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    lamps.leave(0).expect("lamp-0 leaves LAN A");
    until(&lab, &all, Duration::from_secs(10), "lamp-0's goodbye", |l| !l.contains_key(&id("lamp-0"))).await;
    let _moved = lab.spawn_devsim(devsim, 6, true, "mdns", "lamp", 1).expect("lamp-0 on LAN B");
    let start = Instant::now();
    let t = loop {
        let t = c.task("lamp-control").await.expect("task show");
        if t.placement.as_ref().is_some_and(|p| p.node_name == other) {
            break t;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the task did not follow lamp-0 to {other}: {t:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let last = t.history.last().expect("a history");
    assert_eq!(last.reason, "device", "{last:?}");
    assert!(last.migration.as_ref().is_some_and(|m| m.aborted.is_none()), "a completed live migration: {last:?}");
    assert_eq!(c.invoke("lamp-control", b"hi".to_vec(), None).await.expect("it answers"), b"hi");
    eprintln!("the task followed lamp-0 from n1 to {other} in {:?} (grace 10 s)", start.elapsed());
    lab.teardown();
}
