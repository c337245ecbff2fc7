//! The `--data-dir` directory as a whole: created if missing, proven
//! writable, locked for this process (so two brokers never share one), and
//! the clean-shutdown marker that tells a restart whether the last stop was
//! clean (contract §10).
//!
//! The lock is an exclusive `flock` on `DIR/LOCK`, held for as long as the
//! [`DataDir`] lives; the kernel drops it when the process dies, `kill -9`
//! included, so a crashed broker never leaves a stale lock behind.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

const LOCK_FILE: &str = "LOCK";
const CLEAN_FILE: &str = "CLEAN";

/// Why a data directory cannot be used; every message names `--data-dir`.
#[derive(Debug, Error)]
pub enum DataDirError {
    #[error("--data-dir {path}: cannot create or open it: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("--data-dir {path}: not writable: {source}")]
    NotWritable { path: PathBuf, source: std::io::Error },
    #[error("--data-dir {path}: held by another running broker (its LOCK file is locked)")]
    Locked { path: PathBuf },
}

/// An opened, locked data directory.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Holds the `flock`; closing it releases the lock.
    _lock: File,
    /// Whether the previous broker stopped cleanly (its marker was there).
    was_clean: bool,
}

impl DataDir {
    /// Creates (if needed), checks and locks `path`, and consumes the clean
    /// marker: from now until [`DataDir::mark_clean`] the directory counts
    /// as uncleanly stopped.
    pub fn open(path: &Path) -> Result<DataDir, DataDirError> {
        let p = path.to_path_buf();
        std::fs::create_dir_all(path).map_err(|source| DataDirError::Open { path: p.clone(), source })?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join(LOCK_FILE))
            .map_err(|source| DataDirError::NotWritable { path: p.clone(), source })?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EWOULDBLOCK) => Err(DataDirError::Locked { path: p }),
                _ => Err(DataDirError::NotWritable { path: p, source: err }),
            };
        }
        // Prove we can create files here (a read-only mount passes the lock).
        let probe = path.join(".write-probe");
        File::create(&probe)
            .and_then(|mut f| f.write_all(b"ok"))
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|source| DataDirError::NotWritable { path: p.clone(), source })?;
        let marker = path.join(CLEAN_FILE);
        let was_clean = marker.exists();
        if was_clean {
            std::fs::remove_file(&marker)
                .map_err(|source| DataDirError::NotWritable { path: p.clone(), source })?;
            sync_dir(path).map_err(|source| DataDirError::NotWritable { path: p.clone(), source })?;
        }
        Ok(DataDir { path: p, _lock: lock, was_clean })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the broker that last held this directory stopped cleanly.
    pub fn was_clean(&self) -> bool {
        self.was_clean
    }

    /// Records a clean stop: called last at shutdown, after every log is synced.
    pub fn mark_clean(&self) -> std::io::Result<()> {
        let mut f = File::create(self.path.join(CLEAN_FILE))?;
        f.write_all(b"clean\n")?;
        f.sync_all()?;
        sync_dir(&self.path)
    }
}

/// Makes a directory's entries (files created, renamed, removed) durable.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_is_refused_while_the_first_holds_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DataDir::open(tmp.path()).unwrap();
        let e = DataDir::open(tmp.path()).unwrap_err();
        assert!(matches!(e, DataDirError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("--data-dir"));
        drop(first);
        assert!(DataDir::open(tmp.path()).is_ok(), "the lock goes with its holder");
    }

    #[test]
    fn the_clean_marker_is_consumed_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let d = DataDir::open(tmp.path()).unwrap();
        assert!(!d.was_clean(), "a new directory has no clean stop behind it");
        d.mark_clean().unwrap();
        drop(d);
        let d = DataDir::open(tmp.path()).unwrap();
        assert!(d.was_clean());
        drop(d);
        // Not marked again: the next start counts as after a crash.
        assert!(!DataDir::open(tmp.path()).unwrap().was_clean());
    }

    #[test]
    fn an_unwritable_directory_is_refused_naming_the_flag() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let e = DataDir::open(&file).unwrap_err();
        assert!(e.to_string().starts_with("--data-dir"), "{e}");
    }
}
