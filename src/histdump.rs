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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000.000Z");
        assert_eq!(utc_stamp(1_764_000_000_123), "20251124T160000.123Z");
    }
}
