//! Tables for people, JSON for scripts.

use hubmesh_proto::api;

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints rows as aligned columns.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn bytes(n: u64) -> String {
    bytesize::ByteSize(n).to_string()
}

pub(super) fn tasks(tasks: &[api::TaskInfo], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&tasks);
    }
    let rows = tasks
        .iter()
        .map(|t| {
            let kind = match (t.kind, t.checkpoint) {
                (api::TaskKind::Stateless, _) => "stateless".to_owned(),
                (api::TaskKind::Stateful, api::CheckpointMode::Durable) => "stateful/durable".to_owned(),
                (api::TaskKind::Stateful, api::CheckpointMode::Periodic) => {
                    format!("stateful/every {}ms", t.checkpoint_every_ms.unwrap_or(0))
                }
                (api::TaskKind::Stateful, api::CheckpointMode::None) => "stateful".to_owned(),
            };
            let state = match &t.reason {
                Some(r) => format!("{} ({r})", t.state),
                None => t.state.clone(),
            };
            let host =
                t.placement.as_ref().map(|p| format!("{} e{}", p.node_name, p.epoch)).unwrap_or_else(|| "-".into());
            let committed = t.committed.as_ref().map(|c| {
                let on: Vec<String> = c.stored_on.iter().map(|n| n.to_string()).collect();
                format!(
                    "#{} e{} {} ago, {}, on {}",
                    c.sequence,
                    c.epoch,
                    humantime::format_duration(std::time::Duration::from_millis(c.age_ms / 1000 * 1000)),
                    bytes(c.size_bytes),
                    on.join(",")
                )
            });
            let ckpt = committed
                .or_else(|| {
                    t.last_checkpoint.as_ref().map(|c| {
                        format!(
                            "#{} {} ago, {}",
                            c.sequence,
                            humantime::format_duration(std::time::Duration::from_millis(c.age_ms / 1000 * 1000)),
                            bytes(c.size_bytes)
                        )
                    })
                })
                .unwrap_or_else(|| "-".into());
            vec![t.name.clone(), format!("v{}", t.version), kind, state, host, t.invocations.to_string(), ckpt]
        })
        .collect();
    table(&["NAME", "VERSION", "KIND", "STATE", "HOST", "INVOCATIONS", "CHECKPOINT"], rows);
    Ok(())
}

pub(super) fn history(events: &[api::HistoryInfo], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&events);
    }
    let rows = events
        .iter()
        .map(|h| {
            let at =
                humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(h.at_ms));
            vec![
                at.to_string(),
                h.reason.clone(),
                format!("{} ({})", h.node_name, h.node_id),
                format!("e{}", h.epoch),
                h.from_sequence.map_or("-".into(), |s| format!("#{s}")),
                h.migration.as_ref().map_or("-".into(), migration_cell),
            ]
        })
        .collect();
    table(&["AT", "EVENT", "HOST", "EPOCH", "FROM CHECKPOINT", "MIGRATION"], rows);
    Ok(())
}

/// `from hub1 (1), 3 rounds, 1.2 MiB, pause 850µs`, or why it was given up.
fn migration_cell(m: &api::MigrationEventInfo) -> String {
    if let Some(why) = &m.aborted {
        return format!("to {} ({}) given up: {why}", m.to_node_name, m.to_node_id);
    }
    let pause = m.pause_us.map_or(String::new(), |us| format!(", pause {us}µs"));
    format!("from {} ({}), {} rounds, {}{pause}", m.from_node_name, m.from_node_id, m.rounds, bytes(m.bytes))
}

pub(super) fn status(s: &api::StatusInfo, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(s);
    }
    let build = if s.build.is_empty() { &s.version } else { &s.build };
    println!("hub       {} (id {}), hubmesh {build}", s.name, s.node_id);
    println!("leader    {}", s.leader.map_or("none".to_owned(), |l| l.to_string()));
    println!("term      {}   applied {}", s.term, s.last_applied);
    println!("voters    {:?}", s.voters);
    let down = s.nodes.iter().filter(|n| n.down).count();
    println!("hubs      {} up, {down} down", s.nodes.len() - down);
    println!("tasks     {} ({} placed, {} pending)", s.tasks_total, s.tasks_placed, s.tasks_pending);
    println!("uptime    {}", humantime::format_duration(std::time::Duration::from_secs(s.uptime_ms / 1000)));
    Ok(())
}

pub(super) fn nodes(nodes: &[api::NodeInfo], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&nodes);
    }
    let pct = |permille: u32| format!("{}.{}%", permille / 10, permille % 10);
    let rows = nodes
        .iter()
        .map(|n| {
            let (cpu, mem, wait) = match &n.load {
                Some(l) => (
                    format!("{} of {}", pct(l.cpu_permille), l.task_cpus),
                    pct(l.memory_permille),
                    format!("{:.1}ms", l.queue_wait_us as f64 / 1000.0),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            vec![
                n.name.clone(),
                n.id.to_string(),
                n.role.clone(),
                n.api_addr.clone(),
                n.instances.to_string(),
                cpu,
                mem,
                wait,
            ]
        })
        .collect();
    table(&["NAME", "ID", "ROLE", "API", "INSTANCES", "CPU", "MEM", "WAIT"], rows);
    Ok(())
}

pub(super) fn workers(workers: &[api::WorkerInfo], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&workers);
    }
    let rows = workers
        .iter()
        .map(|w| {
            let last = w.last_error.clone().unwrap_or_else(|| "-".into());
            vec![w.name.clone(), w.state.clone(), w.rounds.to_string(), w.errors.to_string(), last]
        })
        .collect();
    table(&["WORKER", "STATE", "ROUNDS", "ERRORS", "LAST ERROR"], rows);
    Ok(())
}

pub(super) fn api_tokens(tokens: &[api::ApiTokenInfo], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&tokens);
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let rows = tokens
        .iter()
        .map(|t| {
            let tasks = if t.tasks.is_empty() { "*".to_owned() } else { t.tasks.join(",") };
            let expires = match t.expires_unix_ms {
                None => "never".to_owned(),
                Some(at) if at <= now => "expired".to_owned(),
                Some(at) => {
                    format!("in {}", humantime::format_duration(std::time::Duration::from_secs((at - now) / 1000)))
                }
            };
            let state = if t.revoked {
                "revoked"
            } else if t.valid {
                "valid"
            } else {
                "expired"
            };
            vec![t.name.clone(), t.scope.clone(), tasks, expires, state.to_owned()]
        })
        .collect();
    table(&["NAME", "SCOPE", "TASKS", "EXPIRES", "STATE"], rows);
    Ok(())
}

pub(super) fn json_or<T: serde::Serialize>(v: &T, json: bool, human: impl FnOnce()) -> anyhow::Result<()> {
    if json {
        return print_json(v);
    }
    human();
    Ok(())
}

fn seen_by(d: &api::DeviceInfo) -> String {
    let hubs: Vec<&str> =
        d.seen_by.iter().map(|h| if h.node_name.is_empty() { "?" } else { h.node_name.as_str() }).collect();
    match d.unreachable_since_ms {
        Some(_) => format!("{} (unreachable)", hubs.join(",")),
        None => hubs.join(","),
    }
}

pub(super) fn devices(devices: &[api::DeviceInfo], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&devices);
    }
    let rows = devices
        .iter()
        .map(|d| vec![d.id.clone(), d.name.clone(), d.kind.clone(), d.addresses.join(","), seen_by(d)])
        .collect();
    table(&["ID", "NAME", "KIND", "ADDRESSES", "SEEN BY"], rows);
    Ok(())
}

pub(super) fn device(d: &api::DeviceInfo, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(d);
    }
    println!("id          {}", d.id);
    println!("name        {}", d.name);
    println!("kind        {}", d.kind);
    println!("addresses   {}", d.addresses.join(", "));
    println!("reach       {}", d.reach);
    for (k, v) in &d.properties {
        println!("property    {k}={v}");
    }
    let now = hubmesh_consensus::now_ms();
    for h in &d.seen_by {
        let ago = std::time::Duration::from_millis(now.saturating_sub(h.last_seen_ms) / 1000 * 1000);
        println!("seen by     {} (#{}) {} ago", h.node_name, h.node_id, humantime::format_duration(ago));
    }
    Ok(())
}
