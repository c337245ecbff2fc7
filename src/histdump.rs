//! Histogram files in `--hist-dir`: `<UTC timestamp>.hgrm` dumps (on SIGUSR1
//! and at shutdown). Touches only the filesystem.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use crate::observe::hgrm;

/// `YYYYMMDDTHHMMSS.mmmZ` for a unix time in milliseconds (UTC).
pub fn utc_stamp(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (H. Hinnant), valid for dates after 1970.
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// Writes `h` as `.hgrm` text to `dir/<UTC timestamp>.hgrm`; returns the path.
pub fn write_hgrm(dir: &Path, h: &Histogram<u64>) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let mut path = dir.join(format!("{}.hgrm", utc_stamp(now)));
    let mut n = 1;
    while path.exists() {
        path = dir.join(format!("{}-{n}.hgrm", utc_stamp(now)));
        n += 1;
    }
    std::fs::write(&path, hgrm(h))?;
    Ok(path)
}

/// Appends one interval histogram per `every` to `dir/<UTC timestamp>.hlog`
/// (HdrHistogram interval log, V2 deflate encoding, readable by
/// HistogramLogProcessor and friends) until `shutdown` fires. Each interval
/// is the difference between two merged snapshots, so the shards' own
/// histograms are never reset by this.
pub async fn interval_log(
    shared: std::sync::Arc<crate::shared::Shared>,
    dir: PathBuf,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
    use hdrhistogram::serialization::V2DeflateSerializer;
    use std::io::Write;

    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::error!(error = %e, dir = %dir.display(), "cannot create --hist-dir");
        return;
    }
    let start = SystemTime::now();
    let start_instant = std::time::Instant::now();
    let start_ms = start.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let path = dir.join(format!("{}.hlog", utc_stamp(start_ms)));
    let mut file = match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, path = %path.display(), "cannot open the interval log");
            return;
        }
    };
    let mut serializer = V2DeflateSerializer::new();
    let mut buf = Vec::new();
    let header = IntervalLogWriterBuilder::new()
        .add_comment("switchyard publish->write latency, microseconds")
        .with_start_time(start)
        .begin_log_with(&mut buf, &mut serializer)
        .map(|_| ());
    if header.is_err() || file.write_all(&buf).is_err() {
        tracing::error!(path = %path.display(), "cannot write the interval log header");
        return;
    }
    let mut previous = crate::metrics::Latency::default().all;
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    let mut interval_start = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = crate::observe::merged_latency(&shared, false).await.all;
        let mut delta = now.clone();
        if delta.subtract(&previous).is_err() {
            delta = now.clone(); // someone reset the histograms: this interval is all of it
        }
        previous = now;
        let offset = interval_start.duration_since(start_instant);
        let duration = interval_start.elapsed();
        interval_start = std::time::Instant::now();
        buf.clear();
        let written = IntervalLogWriterBuilder::new()
            .begin_log_with(&mut buf, &mut serializer)
            .map_err(|e| e.to_string())
            .and_then(|mut w| w.write_histogram(&delta, offset, duration, None).map_err(|e| format!("{e:?}")))
            .and_then(|_| file.write_all(&buf).map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::error!(error = %e, "cannot append to the interval log");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000.000Z");
        assert_eq!(utc_stamp(1_764_000_000_123), "20251124T160000.123Z");
    }
}
