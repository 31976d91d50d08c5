//! The service running inside a benchmark's own process: `Application::build`
//! from command-line options, bound to `127.0.0.1:0`, `run_until` in a task
//! stopped through a oneshot. `service.rs` starts it on the shared servers;
//! the embedded bench on a SQLite file.

use ai_secretary::{
    cli::Cli,
    startup::{Application, Roles},
};
use anyhow::{Context, Result};
use clap::Parser;
use tokio::{sync::oneshot, task::JoinHandle};

/// Options every benchmark's service gets: load tests measure the service,
/// not its abuse limits.
const UNLIMITED: [&str; 8] = [
    "--environment",
    "development",
    "--rate-limit-commands-per-minute",
    "0",
    "--rate-limit-signups-per-hour",
    "0",
    "--rate-limit-logins-per-minute",
    "0",
];

pub struct Service {
    /// `http://127.0.0.1:<port>`, when the roles include a listener.
    pub address: Option<String>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<()>>,
}

impl Service {
    /// Build and start the service with `options` (besides the bind address
    /// and the limits) and `roles`.
    pub async fn launch(options: &[&str], roles: Roles) -> Result<Service> {
        let args = ["ai-secretary", "--bind", "127.0.0.1:0"]
            .into_iter()
            .chain(UNLIMITED)
            .chain(options.iter().copied());
        let cli = Cli::try_parse_from(args).context("the service's configuration")?;
        let app = Application::build(&cli.config, roles)
            .await
            .context("building the service")?;
        let address = app.local_addr().map(|a| format!("http://{a}"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Ok(Service {
            address,
            stop,
            task,
        })
    }

    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("the service task panicked")?
    }
}
