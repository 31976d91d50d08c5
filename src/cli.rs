//! The command line: one binary, one subcommand per process role
//! (docs/architecture.md, "Processes").

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "ai-secretary",
    version,
    about = "AI secretary team platform: event-sourced CQRS backend"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,

    /// Without a subcommand, everything runs in one process.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The HTTP API alone.
    Serve,
    /// Tail the event store and publish to NATS JetStream.
    Relay,
    /// Projection workers (all, or the ones named).
    Project { names: Vec<String> },
    /// The LLM replier.
    Reply,
    /// Rebuild projections from the event store.
    Replay {
        name: Option<String>,
        #[arg(long, conflicts_with = "name")]
        all: bool,
    },
    /// Diff live read models against a fresh fold of the store.
    Verify { name: Option<String> },
    /// Apply database migrations and exit.
    Migrate,
    /// Copy the embedded (SQLite) database to FILE while the service runs
    /// (`VACUUM INTO`), then check the copy; Postgres is backed up with
    /// `pg_dump` (scripts/backup.sh does either).
    Backup {
        /// The file to write (it must not exist).
        file: std::path::PathBuf,
    },
    /// Re-wrap every user's data key (and re-hash every email lookup) from
    /// ENCRYPTION_KEY to NEW_ENCRYPTION_KEY, with the service stopped; then
    /// start it with the new key (docs/operations.md).
    RotateEncryptionKey {
        /// The key to rotate to: 64 hex characters.
        #[arg(long, env = "NEW_ENCRYPTION_KEY", hide_env_values = true)]
        new_encryption_key: crate::config::Secret,
    },
}
