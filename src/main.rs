//! Entry point: configuration → telemetry → subcommand.

use std::process::ExitCode;

use ai_secretary::{
    cli::{Cli, Command},
    startup::{Application, shutdown_signal},
    store::postgres,
    telemetry,
};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    // A .env file is optional; real environment variables win over it.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let _guard = match telemetry::init(cli.config.log_format(), cli.config.log_dir.as_deref()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("cannot start logging: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "fatal");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.config;
    match cli.command {
        // The read side, relay and replier are not built yet: the all-in-one
        // process is the API (the write side) until they are.
        None | Some(Command::Serve) => {
            Application::build(&config)
                .await?
                .run_until(shutdown_signal())
                .await?;
        }
        Some(Command::Migrate) => {
            config.validate()?;
            postgres::connect(config.database_url.expose(), 1).await?;
            tracing::info!("migrations applied");
        }
        Some(
            command @ (Command::Relay
            | Command::Project { .. }
            | Command::Reply
            | Command::Replay { .. }
            | Command::Verify { .. }),
        ) => {
            eprintln!(
                "`{}` is not built yet: it comes with the read side (relay, projections, \
                 replay, verify) and AI replies work. Today the service runs the API only.",
                subcommand_name(&command)
            );
            return Ok(ExitCode::from(2));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn subcommand_name(command: &Command) -> &'static str {
    match command {
        Command::Serve => "serve",
        Command::Relay => "relay",
        Command::Project { .. } => "project",
        Command::Reply => "reply",
        Command::Replay { .. } => "replay",
        Command::Verify { .. } => "verify",
        Command::Migrate => "migrate",
    }
}
