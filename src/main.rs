//! The `switchyard` binary: flags → Config → start → run until a signal;
//! or one of the operator subcommands (`token`, `check-config`: [`switchyard::cli`]).

use std::process::ExitCode;

use clap::Parser;
use switchyard::config::{Config, Flags, LogFormat};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("token") => return switchyard::cli::token(&args[1..]),
        Some("check-config") => return switchyard::cli::check_config(&args[1..]),
        _ => {}
    }
    let flags = Flags::parse(); // exits 2 with a message naming the flag on bad values
    init_logs(flags.log_format);
    if !switchyard::hugepages::disable() {
        tracing::debug!("could not turn transparent huge pages off; page faults may stall a shard");
    }
    let config = match Config::from_flags(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return ExitCode::from(2);
        }
    };
    let want = config.max_connections as u64 + 4096;
    let limit = switchyard::fdlimit::raise(want);
    if limit < want {
        tracing::warn!(limit, wanted = want, "open-file limit is below --max-connections");
    }
    let hist_dir = config.hist_dir.clone();
    let signals = match switchyard::signals::Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("switchyard: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let broker = match switchyard::start(config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    signals.wait_for_shutdown(&broker);
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

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log line that cannot be written is dropped: with the default
    // (`log_internal_errors`), a closed stderr (a log collector that went
    // away) made the failed write fall back to `eprintln!`, which panics
    // and would take down whichever shard was logging.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}
