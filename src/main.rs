//! Entry point: configuration → telemetry → subcommand.

use std::process::ExitCode;

use ai_secretary::{
    app::users::EMAIL_SCOPE,
    cli::{Cli, Command},
    config::Database,
    crypto::MasterKey,
    recovery,
    startup::{Application, Roles, shutdown_signal},
    store::{
        postgres,
        rotation::{rotate_master_key, rotate_master_key_sqlite},
        sqlite,
    },
    telemetry,
};
use anyhow::Context;
use clap::Parser;

/// mimalloc rather than glibc's malloc. Under load the service's threads
/// (tokio's workers, the Redis, NATS and Postgres drivers) allocate and free
/// each other's buffers all the time. glibc gives threads that allocate at
/// once arenas of their own, up to eight per core, and each keeps the peak of
/// what was freed in it: 73 MiB resident in all-in-one under the http bench.
/// Capping it at two arenas (`M_ARENA_MAX`) held that to 56 MiB, but the
/// threads then queued on the arenas' locks: a tenth of the service's CPU in a
/// cached GET went to futex waits and wake-ups. mimalloc's heaps are per
/// thread, a free from another thread is a lock-free push, and it returns
/// freed pages to the system. Built without transparent huge pages
/// (`no_thp`): with them each arena is backed by 2 MiB pages, and the idle
/// process took 48 MiB instead of 27 (82 MiB at peak under the http bench
/// instead of 56). docs/benchmarks.md has the figures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(start()),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn start() -> ExitCode {
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
    let roles = match cli.command {
        None => Roles::all(),
        Some(Command::Serve) => Roles::only_api(),
        Some(Command::Relay) => Roles::only_relay(),
        Some(Command::Project { names }) => Roles::only_projections(names)?,
        Some(Command::Reply) => Roles::only_replier(),
        Some(Command::Migrate) => {
            config.validate()?;
            match config.database()? {
                Database::Postgres(url) => drop(postgres::connect(url.expose(), 1).await?),
                Database::Sqlite(path) => {
                    sqlite::connect(&path.to_string_lossy(), 1)
                        .await?
                        .close()
                        .await
                }
            }
            tracing::info!("migrations applied");
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Backup { file }) => {
            config.validate()?;
            let Database::Sqlite(path) = config.database()? else {
                anyhow::bail!(
                    "backup copies the embedded SQLite database; back Postgres up with pg_dump (scripts/backup.sh)"
                );
            };
            if !path.exists() {
                anyhow::bail!("no database at {}", path.display());
            }
            let pool = sqlite::connect(&path.to_string_lossy(), 1).await?;
            let backup = sqlite::backup_into(&pool, &file).await;
            pool.close().await;
            let backup = backup?;
            println!(
                "backed up {} events into {} ({} bytes), integrity ok",
                backup.events,
                backup.file.display(),
                backup.bytes
            );
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Replay { name, all }) => {
            config.validate()?;
            let names: Vec<&str> = match (&name, all) {
                (Some(name), false) => vec![name.as_str()],
                (None, true) => ai_secretary_projections::NAMES.to_vec(),
                _ => anyhow::bail!("name a projection, or pass --all"),
            };
            recovery::replay(&config, &names).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::RotateEncryptionKey { new_encryption_key }) => {
            config.validate()?;
            let new = MasterKey::from_hex(new_encryption_key.expose())
                .context("NEW_ENCRYPTION_KEY must be 32 bytes written as 64 hex characters")?;
            let old = config.master_key()?;
            let rotated = match config.database()? {
                Database::Postgres(url) => {
                    let pool = postgres::connect(url.expose(), 1).await?;
                    rotate_master_key(&pool, &old, &new, EMAIL_SCOPE).await?
                }
                Database::Sqlite(path) => {
                    let pool = sqlite::connect(&path.to_string_lossy(), 1).await?;
                    rotate_master_key_sqlite(&pool, &old, &new, EMAIL_SCOPE).await?
                }
            };
            println!(
                "rotated {} user keys and {} email lookups; start the service with the new ENCRYPTION_KEY",
                rotated.keys, rotated.reservations
            );
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Verify { name }) => {
            config.validate()?;
            let names: Vec<&str> = name.iter().map(String::as_str).collect();
            let clean = recovery::verify(&config, &names).await?;
            return Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
    };
    Application::build(&config, roles)
        .await?
        .run_until(shutdown_signal())
        .await?;
    Ok(ExitCode::SUCCESS)
}
