//! Process signals: SIGTERM/SIGINT start the shutdown; SIGUSR1 dumps the
//! merged latency histogram into `--hist-dir`. Used only by `main`.
//!
//! The handlers are installed before the broker starts: a supervisor (or a
//! test) may send SIGTERM as soon as the broker logs that it is listening,
//! and a signal that arrived before its handler would kill the process with
//! no drain and no exit status.

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::broker::Running;

/// Installed signal handlers, waited on by [`Signals::wait_for_shutdown`].
pub struct Signals {
    rt: tokio::runtime::Runtime,
    term: Signal,
    int: Signal,
    usr1: Signal,
}

impl Signals {
    /// Installs the handlers; from here on the signals are caught, not fatal.
    pub fn install() -> std::io::Result<Signals> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (term, int, usr1) = {
            let _in_rt = rt.enter();
            (
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
                signal(SignalKind::user_defined1())?,
            )
        };
        Ok(Signals { rt, term, int, usr1 })
    }

    /// Blocks until SIGTERM or SIGINT, serving SIGUSR1 dumps meanwhile.
    pub fn wait_for_shutdown(self, broker: &Running) {
        let Signals { rt, mut term, mut int, mut usr1 } = self;
        rt.block_on(async {
            loop {
                tokio::select! {
                    _ = term.recv() => return,
                    _ = int.recv() => return,
                    _ = usr1.recv() => dump(broker).await,
                }
            }
        })
    }
}

async fn dump(broker: &Running) {
    let Some(dir) = &broker.shared.config.hist_dir else {
        tracing::info!("SIGUSR1 ignored: no --hist-dir");
        return;
    };
    let lat = crate::observe::merged_latency(&broker.shared, false).await;
    match crate::histdump::write_hgrm(dir, &lat.all) {
        Ok(p) => tracing::info!(path = %p.display(), "latency histogram written"),
        Err(e) => tracing::error!(error = %e, "could not write the latency histogram"),
    }
}
