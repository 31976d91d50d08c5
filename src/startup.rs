//! Building the service apart from running it (zero2prod's split): `build`
//! connects, migrates and binds (port 0 works, for tests); `run_until` serves until
//! the shutdown future resolves, then lets in-flight requests finish.

use std::{future::Future, net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;

use crate::{
    app::Commands,
    auth::Tokens,
    config::Config,
    http::{self, AppState},
    store::{
        PgEventStore,
        postgres::{self, CoalescingConfig},
    },
};

pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    store: PgEventStore,
}

impl Application {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        config.validate()?;
        let pool = postgres::connect(
            config.database_url.expose(),
            config.database_max_connections,
        )
        .await?;
        let store = PgEventStore::new(
            pool,
            CoalescingConfig {
                max_batch: config.append_max_batch,
                flushers: config.append_flushers,
            },
        );
        let commands = Commands::new(Arc::new(store.clone()));
        let tokens = Tokens::new(config.jwt_secret_key.expose(), config.access_token_ttl());
        let router = http::router(AppState::new(commands, tokens), &config.cors_origins);
        let listener = TcpListener::bind(config.bind).await?;
        Ok(Self {
            listener,
            router,
            store,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "api listening");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await?;
        // Requests are done: let the appends they queued finish, then disconnect.
        self.store.close().await;
        tracing::info!("api stopped");
        Ok(())
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}
