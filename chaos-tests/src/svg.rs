//! `timeline.svg`, written by hand: the latency of every call coloured by outcome, a lane per task
//! coloured by the hub that ran it with epoch changes marked, the leader lane, and every fault
//! window shaded across all panels.

use std::fmt::Write as _;

use crate::check::Evidence;
use crate::history::{pair, Event, Type};

const W: f64 = 1200.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 20.0;
const HUB_COLOURS: [&str; 9] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The timeline of a run as an SVG document.
pub fn timeline(events: &[Event], ev: &Evidence) -> String {
    let end_us = events.iter().map(|e| e.t_us).max().unwrap_or(1).max(1) as f64;
    let x = |t: u64| LEFT + (t as f64 / end_us) * (W - LEFT - RIGHT);
    let tasks: Vec<String> = ev.finals.keys().cloned().chain(ev.echo.clone()).collect();
    let lat_top = 30.0;
    let lat_h = 260.0;
    let lanes_top = lat_top + lat_h + 40.0;
    let lane_h = 22.0;
    let leader_top = lanes_top + lane_h * tasks.len() as f64 + 30.0;
    let height = leader_top + lane_h + 60.0;
    let hub_of = |node: u64| ev.node_ids.iter().position(|&n| n == node);
    let colour = |node: u64| hub_of(node).map_or("#cccccc", |i| HUB_COLOURS[i % HUB_COLOURS.len()]);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    // Fault windows.
    for f in &ev.faults {
        let (a, b) = (x(f.start_us), x(f.end_us.max(f.start_us + 1)));
        let _ = writeln!(
            s,
            r##"<rect x="{a:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#d62728" fill-opacity="0.12"><title>{}</title></rect>"##,
            lat_top,
            (b - a).max(1.0),
            height - lat_top - 40.0,
            esc(&f.note)
        );
        let _ = writeln!(
            s,
            r##"<text x="{a:.1}" y="{:.1}" font-size="9" fill="#a01010">{}</text>"##,
            lat_top - 4.0,
            f.fault.name()
        );
    }
    // Latency panel (log scale, 1 ms .. 10 s).
    let _ = writeln!(s, r#"<text x="4" y="{:.1}">latency</text>"#, lat_top + 12.0);
    let y_of = |ms: f64| {
        let l = (ms.clamp(1.0, 10_000.0)).log10() / 4.0;
        lat_top + lat_h - l * lat_h
    };
    for (ms, label) in [(1.0, "1ms"), (10.0, "10ms"), (100.0, "100ms"), (1000.0, "1s"), (10_000.0, "10s")] {
        let y = y_of(ms);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#eeeeee"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#666">{label}</text>"##,
            W - RIGHT,
            LEFT - 4.0,
            y + 4.0
        );
    }
    for o in pair(events) {
        let Some(done) = o.done else { continue };
        let ms = (done.t_us - o.invoke.t_us) as f64 / 1e3;
        let c = match done.kind {
            Type::Ok if done.error.is_none() => "#2ca02c",
            Type::Ok => "#000000",
            Type::Fail => "#d62728",
            _ => "#ff7f0e",
        };
        let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="{c}"/>"#, x(o.invoke.t_us), y_of(ms));
    }
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="{:.1}" fill="#2ca02c">● ok</text><text x="{:.1}" y="{:.1}" fill="#d62728">● fail</text><text x="{:.1}" y="{:.1}" fill="#ff7f0e">● unknown</text>"##,
        lat_top + lat_h + 16.0,
        LEFT + 50.0,
        lat_top + lat_h + 16.0,
        LEFT + 110.0,
        lat_top + lat_h + 16.0
    );
    // Task lanes: the newest epoch any hub reported, coloured by its host.
    for (i, task) in tasks.iter().enumerate() {
        let y = lanes_top + i as f64 * lane_h;
        let _ = writeln!(s, r#"<text x="4" y="{:.1}">{}</text>"#, y + 14.0, esc(task));
        let mut cur: Option<(u64, u64, u64)> = None; // (since, node, epoch)
        let mut segs = Vec::new();
        for smp in &ev.samples {
            let Some(&(node, epoch, _)) = smp.tasks.get(task) else { continue };
            match cur {
                Some((_, _, e)) if epoch <= e => {}
                Some((since, n, e)) => {
                    segs.push((since, smp.t_us, n, e));
                    cur = Some((smp.t_us, node, epoch));
                }
                None => cur = Some((smp.t_us, node, epoch)),
            }
        }
        if let Some((since, n, e)) = cur {
            segs.push((since, end_us as u64, n, e));
        }
        for (a, b, n, e) in segs {
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{task} on {} epoch {e}</title></rect><line x1="{:.1}" x2="{:.1}" y1="{y:.1}" y2="{:.1}" stroke="black"/><text x="{:.1}" y="{:.1}" font-size="9" fill="white">e{e}</text>"##,
                x(a),
                (x(b) - x(a)).max(1.0),
                lane_h - 4.0,
                colour(n),
                hub_of(n).map_or(n.to_string(), crate::lab::hub_name),
                x(a),
                x(a),
                y + lane_h - 4.0,
                x(a) + 2.0,
                y + 13.0
            );
        }
    }
    // Leader lane.
    let _ = writeln!(s, r#"<text x="4" y="{:.1}">leader</text>"#, leader_top + 14.0);
    let mut cur: Option<(u64, u64, u64)> = None; // (since, term, leader)
    let mut segs = Vec::new();
    for smp in &ev.samples {
        let Some(l) = smp.leader else { continue };
        match cur {
            Some((_, term, _)) if smp.term <= term => {}
            Some((since, term, leader)) => {
                segs.push((since, smp.t_us, term, leader));
                cur = Some((smp.t_us, smp.term, l));
            }
            None => cur = Some((smp.t_us, smp.term, l)),
        }
    }
    if let Some((since, term, leader)) = cur {
        segs.push((since, end_us as u64, term, leader));
    }
    for (a, b, term, leader) in segs {
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{leader_top:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>term {term}</title></rect><text x="{:.1}" y="{:.1}" font-size="9" fill="white">t{term}</text>"#,
            x(a),
            (x(b) - x(a)).max(1.0),
            lane_h - 4.0,
            colour(leader),
            x(a) + 2.0,
            leader_top + 13.0
        );
    }
    // Hub legend and time axis.
    let legend_y = leader_top + lane_h + 20.0;
    for (i, _) in ev.node_ids.iter().enumerate() {
        let lx = LEFT + i as f64 * 60.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{legend_y:.1}">{}</text>"#,
            legend_y - 9.0,
            HUB_COLOURS[i % HUB_COLOURS.len()],
            lx + 14.0,
            crate::lab::hub_name(i)
        );
    }
    let secs = (end_us / 1e6).ceil() as u64;
    let step = (secs / 10).max(1);
    for t in (0..=secs).step_by(step as usize) {
        let tx = x(t * 1_000_000);
        let _ =
            writeln!(s, r##"<text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#666">{t}s</text>"##, height - 8.0);
    }
    s.push_str("</svg>\n");
    s
}
