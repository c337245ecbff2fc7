//! The measured window: CPU of the generator and the broker over it, and
//! the broker's own latency histogram collected beside the client's.

use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};

use crate::args::{Common, Peer};
use crate::http::http_get_text;

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
pub(crate) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// The measured window as it opened: when, and both processes' CPU then.
pub(crate) struct Window {
    pub(crate) at: Instant,
    pub(crate) own: Option<f64>,
    pub(crate) broker: Option<f64>,
}

/// CPU used over the window, in cores.
pub(crate) struct WindowCpu {
    pub(crate) seconds: f64,
    pub(crate) generator_cores: Option<f64>,
    pub(crate) broker_cores: Option<f64>,
}

impl Window {
    pub(crate) fn close(self, common: &Common) -> WindowCpu {
        let seconds = self.at.elapsed().as_secs_f64().max(1e-9);
        let per = |before: Option<f64>, now: Option<f64>| Some((now? - before?) / seconds);
        let broker_now = common.broker_pid.and_then(|p| cpu_seconds(&p.to_string()));
        WindowCpu {
            seconds,
            generator_cores: per(self.own, cpu_seconds("self")),
            broker_cores: per(self.broker, broker_now),
        }
    }
}

/// Waits for the window to open (after `--warmup`), resets the broker's
/// histogram then (when asked for it), and samples CPU.
pub(crate) async fn measure_window(api: String, common: Common, at: Instant) -> anyhow::Result<Window> {
    tokio::time::sleep_until(at.into()).await;
    if common.broker_hgrm.is_some() && common.peer == Peer::Switchyard {
        http_get_text(&api, "/debug/histograms?reset=1", common.api_key.as_deref()).await?;
    }
    Ok(Window {
        at: Instant::now(),
        own: cpu_seconds("self"),
        broker: common.broker_pid.and_then(|p| cpu_seconds(&p.to_string())),
    })
}

/// The broker's latency histogram over the window, written to `--broker-hgrm`;
/// returns its percentiles line for the report.
pub(crate) async fn broker_histogram(api: &str, common: &Common) -> anyhow::Result<Option<String>> {
    let Some(path) = common.broker_hgrm.as_ref().filter(|_| common.peer == Peer::Switchyard) else {
        return Ok(None);
    };
    let text = http_get_text(api, "/debug/histograms", common.api_key.as_deref()).await?;
    std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(path.display().to_string()))
}

pub(crate) fn report_window(
    common: &Common,
    cpu: &WindowCpu,
    broker_hgrm: Option<&String>,
) -> anyhow::Result<()> {
    let fmt = |c: Option<f64>| c.map_or("n/a".to_string(), |c| format!("{c:.2}"));
    println!(
        "  window      {:.1}s measured (after {:?} warm-up); CPU cores: generator {}, broker {}",
        cpu.seconds,
        common.warmup,
        fmt(cpu.generator_cores),
        fmt(cpu.broker_cores)
    );
    if let Some(path) = broker_hgrm {
        println!("  broker      latency histogram over the window: {path}");
    }
    if let Some(path) = &common.json {
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        v["window_s"] = json!(cpu.seconds);
        v["generator_cpu_cores"] = json!(cpu.generator_cores);
        v["broker_cpu_cores"] = json!(cpu.broker_cores);
        std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
