//! `hubmesh-devsim`: simulated LAN devices for tests and demos. It advertises devices by mDNS
//! (the `mdns-sd` crate as a responder, as a real device's stack would) or, with `--via ssdp`, by
//! SSDP (UPnP), from whatever network it runs in — a network namespace of the chaos lab's,
//! say — and makes them leave on command.
//!
//! ```text
//! hubmesh-devsim --ip 10.77.0.101 --count 3 --prefix lamp     # lamp-0 .. lamp-2
//! stdin:  leave N   -> device N says goodbye (mDNS records with TTL 0, or SSDP byebye)
//!         leave all -> every device says goodbye, then the simulator exits
//! SIGTERM: as `leave all`.  SIGKILL (or a cut link): the devices vanish without a word.
//! ```
//! It prints `ready` once every device is registered, and `left N` for each goodbye.

use std::io::BufRead;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use mdns_sd::{ServiceDaemon, ServiceInfo};

mod ssdp;
mod stranger;

/// How the devices advertise themselves.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Via {
    /// mDNS/DNS-SD, service `PREFIX-N` of `--type`, TXT `id=PREFIX-N`.
    Mdns,
    /// SSDP (UPnP), device `uuid:hubmesh-devsim-PREFIX-N`.
    Ssdp,
}

#[derive(Parser)]
#[command(about = "Simulated LAN devices (mDNS or SSDP) for hubmesh's tests and demos")]
struct Args {
    /// The address the devices answer from (the namespace's own).
    #[arg(long)]
    ip: Ipv4Addr,
    /// How many devices.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Device names are PREFIX-0, PREFIX-1, …
    #[arg(long, default_value = "dev")]
    prefix: String,
    /// How they advertise themselves.
    #[arg(long, value_enum, default_value_t = Via::Mdns)]
    via: Via,
    /// The mDNS service type they advertise.
    #[arg(long = "type", default_value = "_hubmesh-dev._tcp")]
    service_type: String,
    /// The first device's port (the others count up).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Instead of devices: be a stranger — a libp2p node of no mesh — that dials these gossip
    /// addresses (repeatable) and publishes forged sightings of the device `PREFIX-intruder` in
    /// the name of hub `--as-node`, for `--for` seconds; prints what it managed as JSON.
    #[arg(long = "stranger", value_name = "ADDR")]
    stranger: Vec<std::net::SocketAddr>,
    #[arg(long = "as-node", default_value_t = 1)]
    as_node: u64,
    #[arg(long = "for", default_value_t = 5)]
    for_s: u64,
}

fn fullname(args: &Args, i: usize) -> String {
    format!("{}-{i}.{}.local.", args.prefix, args.service_type)
}

/// The simulator's two ways of advertising.
struct Advertiser {
    mdns: Option<ServiceDaemon>,
    ssdp: Option<ssdp::Ssdp>,
    devices: Vec<ssdp::Device>,
}

impl Advertiser {
    /// Device `i` says goodbye (once).
    async fn leave(&mut self, args: &Args, i: usize) -> anyhow::Result<()> {
        if std::mem::replace(&mut self.devices[i].gone, true) {
            return Ok(());
        }
        if let Some(daemon) = &self.mdns {
            let status = daemon.unregister(&fullname(args, i)).context("unregistering")?;
            // The daemon answers once the goodbye went out.
            let _ = tokio::time::timeout(Duration::from_secs(2), status.recv_async()).await;
        }
        if let Some(u) = &self.ssdp {
            u.byebye(&self.devices[i]).await;
        }
        println!("left {i}");
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.count == 0 || args.count > 1000 {
        bail!("--count must be 1..=1000");
    }
    if !args.stranger.is_empty() {
        let device = format!("mdns:{}/id={}-intruder", args.service_type, args.prefix);
        let out = stranger::run(&args.stranger, args.as_node, &device, Duration::from_secs(args.for_s)).await?;
        println!(
            "{{\"established\":{},\"published\":{},\"longest_ms\":{}}}",
            out.established, out.published, out.longest_ms
        );
        return Ok(());
    }
    let mut adv = Advertiser {
        mdns: None,
        ssdp: None,
        devices: (0..args.count)
            .map(|i| ssdp::Device {
                udn: format!("uuid:hubmesh-devsim-{}-{i}", args.prefix),
                location: format!("http://{}:{}/description.xml", args.ip, usize::from(args.port) + i),
                gone: false,
            })
            .collect(),
    };
    match args.via {
        Via::Mdns => {
            let daemon = ServiceDaemon::new().context("starting the mDNS responder")?;
            let host = format!("devsim-{}.local.", args.prefix);
            for i in 0..args.count {
                let name = format!("{}-{i}", args.prefix);
                let port = args.port.checked_add(i as u16).context("ports run out")?;
                let props = [("id", name.as_str()), ("model", "hubmesh-devsim")];
                let ty = format!("{}.local.", args.service_type);
                let info = ServiceInfo::new(&ty, &name, &host, std::net::IpAddr::V4(args.ip), port, &props[..])
                    .context("describing a device")?;
                // The daemon's command queue holds 100: many devices at once wait for room.
                let mut info = Some(info);
                while let Some(i) = info.take() {
                    match daemon.register(i.clone()) {
                        Err(mdns_sd::Error::Again) => {
                            info = Some(i);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        r => r.context("registering a device")?,
                    }
                }
            }
            adv.mdns = Some(daemon);
        }
        Via::Ssdp => {
            let s = ssdp::Ssdp::bind(args.ip).context("binding SSDP")?;
            s.alive(&adv.devices).await;
            adv.ssdp = Some(s);
        }
    }
    let mut announce = tokio::time::interval_at(tokio::time::Instant::now() + ssdp::ANNOUNCE, ssdp::ANNOUNCE);
    println!("ready");
    // stdin on a thread (a blocking read), its lines into the loop.
    let (tx, mut commands) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut stdin_open = true;
    let ssdp_on = adv.ssdp.is_some();
    loop {
        let command = tokio::select! {
            _ = term.recv() => "leave all".to_owned(),
            Some((text, from)) = async { adv.ssdp.as_ref().expect("guarded").receive().await }, if ssdp_on => {
                if let Some(u) = &adv.ssdp {
                    u.answer(&adv.devices, &text, from).await;
                }
                continue;
            }
            _ = announce.tick(), if ssdp_on => {
                if let Some(u) = &adv.ssdp {
                    u.alive(&adv.devices).await;
                }
                continue;
            }
            line = commands.recv(), if stdin_open => match line {
                Some(line) => line,
                // stdin closed: keep advertising until a signal.
                None => {
                    stdin_open = false;
                    continue;
                }
            },
        };
        match command.trim().split_once(' ') {
            Some(("leave", "all")) => {
                for i in 0..args.count {
                    adv.leave(&args, i).await?;
                }
                if let Some(d) = &adv.mdns {
                    let _ = d.shutdown();
                }
                return Ok(());
            }
            Some(("leave", n)) => match n.parse::<usize>() {
                Ok(i) if i < args.count => adv.leave(&args, i).await?,
                _ => eprintln!("no device {n:?}"),
            },
            _ => eprintln!("commands: leave N | leave all"),
        }
    }
}
