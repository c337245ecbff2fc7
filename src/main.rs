//! The `switchyard` binary: flags → Config → start → run until a signal.

use std::process::ExitCode;

use clap::Parser;
use switchyard::config::{Config, Flags, LogFormat};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let flags = Flags::parse(); // exits 2 with a message naming the flag on bad values
    init_logs(flags.log_format);
    let config = match Config::from_flags(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return ExitCode::from(2);
        }
    };
    raise_fd_limit(config.max_connections as u64 + 4096);
    let hist_dir = config.hist_dir.clone();
    let broker = match switchyard::start(config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = switchyard::signals::wait_for_shutdown(&broker) {
        eprintln!("switchyard: cannot install signal handlers: {e}");
        return ExitCode::from(1);
    }
    tracing::info!("shutting down: draining connections");
    let latency = broker.shutdown();
    if let Some(dir) = hist_dir {
        if let Err(e) = switchyard::histdump::write_hgrm(&dir, &latency.all) {
            tracing::error!(error = %e, "could not write the final histogram");
        }
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Raises the open-file limit so `--max-connections` sockets can be held:
/// the soft limit up to `want` (raising the hard limit too where permitted),
/// else as far as the hard limit allows.
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into a valid, local rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= want {
        return;
    }
    let raised = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max.max(want) };
    // SAFETY: setrlimit reads a valid, local rlimit; failure leaves the limit unchanged.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return;
    }
    let soft = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) };
    if lim.rlim_max < want {
        tracing::warn!(limit = lim.rlim_max, wanted = want, "open-file limit is below --max-connections");
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}
