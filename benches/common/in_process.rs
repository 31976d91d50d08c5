//! The service running inside a benchmark's own process: `Application::build`
//! from the kit's command line (`tests/support/service.rs`: port 0, limits
//! off) and the bench's options, `run_until` in a task on the bench's runtime,
//! stopped through a oneshot. `service.rs` starts it on the shared servers;
//! the embedded bench on a SQLite file.

use ai_secretary::startup::{Application, Roles};
use anyhow::{Context, Result};
use tokio::{sync::oneshot, task::JoinHandle};

use crate::support::service::command_line;

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
        let cli = command_line(options).context("the service's configuration")?;
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
