//! Progress lines while running and the final report.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::json;
use switchyard_load::check::Totals;

use crate::args::{Common, Plan};
use crate::shared::Run;

/// Live progress: an indicatif line redrawn in place on a terminal, plain
/// lines (one a second) otherwise, so logs stay readable.
pub(crate) async fn progress_task(run: Arc<Run>) {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    let mut last = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let sent: u64 = run.sent.iter().map(|s| s.load(Ordering::Relaxed)).sum();
        let recv = run.received.load(Ordering::Relaxed);
        let line = format!(
            "t={:>5.1}s sent={sent} received={recv} ({}/s) resumes={}",
            run.start.elapsed().as_secs_f64(),
            recv - last,
            run.resumes.load(Ordering::Relaxed)
        );
        last = recv;
        match &bar {
            Some(bar) => bar.set_message(line),
            None => eprintln!("{line}"),
        }
    }
}

pub(crate) fn report(
    common: &Common,
    t: &Totals,
    (h, lag): (&Histogram<u64>, &Histogram<u64>),
    publish: Duration,
    delivery: Duration,
    plan: &Plan,
) -> anyhow::Result<()> {
    let pct = |q: f64| if h.is_empty() { 0 } else { h.value_at_quantile(q) };
    let lag_pct = |q: f64| lag.value_at_quantile(q);
    let delivered_per_s = t.received as f64 / delivery.as_secs_f64().max(1e-9);
    let sent_per_s = t.sent as f64 / publish.as_secs_f64().max(1e-9);
    let mode = match plan {
        Plan::Rate { per_sec, broadcast, .. } => format!(
            "{}rate={}",
            if *broadcast { "broadcast " } else { "" },
            per_sec.map_or("max".to_string(), |r| r.to_string())
        ),
        Plan::Trace { planned, .. } => format!("trace events={}", planned.len()),
    };
    println!(
        "switchyard-load: {mode} users={} conns={} publishers={}",
        common.users,
        common.users * common.conns_per_user,
        common.publishers
    );
    println!("  sent        {:>12}   ({sent_per_s:.0}/s)", t.sent);
    println!("  received    {:>12}   ({delivered_per_s:.0}/s delivered)", t.received);
    println!("  lost        {:>12}", t.lost);
    println!("  duplicated  {:>12}", t.duplicated);
    println!("  reordered   {:>12}", t.reordered);
    println!("  misrouted   {:>12}", t.misrouted);
    println!("  shed        {:>12}   (slow consumers, reported by the broker)", t.shed);
    println!("  rejected    {:>12}   (refused by the broker: overloaded)", t.rejected);
    println!("  resumes     {:>12}   (failed: {})", t.resumes, t.resume_failed);
    println!("  retried     {:>12}   (publisher streams replaced; frames resent with their ids)", t.retried);
    println!(
        "  latency µs  p50={} p90={} p99={} p99.9={} max={}  (from intended send time)",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        h.max()
    );
    if !lag.is_empty() {
        println!(
            "  send lag µs p50={} p99={} p99.9={}  (intended send time → written to the broker: the generator's share)",
            lag_pct(0.5),
            lag_pct(0.99),
            lag_pct(0.999)
        );
    }
    println!("  result      {}", if t.ok() { "OK" } else { "FAILED" });
    if let Some(path) = &common.hgrm {
        std::fs::write(path, switchyard::observe::hgrm(h))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &common.json {
        let mut v = serde_json::to_value(t)?;
        v["delivered_per_s"] = json!(delivered_per_s);
        v["sent_per_s"] = json!(sent_per_s);
        v["latency_us"] =
            json!({"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "p999": pct(0.999), "max": h.max()});
        if !lag.is_empty() {
            v["send_lag_us"] = json!({"p50": lag_pct(0.5), "p99": lag_pct(0.99), "p999": lag_pct(0.999)});
        }
        v["ok"] = json!(t.ok());
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
