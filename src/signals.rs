//! Process signals: SIGTERM/SIGINT start the shutdown; SIGUSR1 dumps the
//! merged latency histogram into `--hist-dir`. Used only by `main`.

use tokio::signal::unix::{signal, SignalKind};

use crate::broker::Running;

/// Blocks until SIGTERM or SIGINT, serving SIGUSR1 dumps meanwhile.
pub fn wait_for_shutdown(broker: &Running) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        loop {
            tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                _ = usr1.recv() => dump(broker).await,
            }
        }
    })
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
