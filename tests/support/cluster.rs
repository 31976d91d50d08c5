//! A Postgres cluster of a test's own (`initdb` and `pg_ctl` as the `postgres`
//! user, on a free port, its data in a scratch directory), for what the shared
//! server must not see: a test that stops the database, or one that needs
//! to know that no other transaction on the cluster holds the read horizon
//! (`pg_snapshot_xmin` is cluster-wide). Stopped and removed on `Drop`.

use std::{path::PathBuf, process::Command};

use uuid::Uuid;

pub struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
    running: bool,
}

impl PrivatePostgres {
    /// A fresh cluster, started (autovacuum off: nothing but the test runs on it).
    pub async fn start() -> PrivatePostgres {
        let dir =
            std::env::temp_dir().join(format!("ai-secretary-test-pg-{}", Uuid::new_v4().simple()));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut cluster = PrivatePostgres {
            dir,
            port,
            running: false,
        };
        let data = cluster.dir.display().to_string();
        run_as_postgres(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )
        .await;
        cluster.start_again().await;
        cluster
    }

    /// `postgres://postgres@127.0.0.1:<port>` (no database name).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Start it (again, after `stop`) on the same port and data; waits until it accepts connections.
    pub async fn start_again(&mut self) {
        assert!(!self.running, "the private Postgres is already running");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c autovacuum=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        let data = self.dir.display().to_string();
        run_as_postgres(
            "pg_ctl",
            &["-D", &data, "-o", &options, "-l", &log, "-w", "start"],
        )
        .await;
        self.running = true;
    }

    /// Stop it at once (`-m immediate`: like a crash, no checkpoint, clients cut).
    pub async fn stop(&mut self) {
        let data = self.dir.display().to_string();
        run_as_postgres("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]).await;
        self.running = false;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let stopped = postgres_command("pg_ctl")
                .args(["-D", &self.dir.display().to_string()])
                .args(["-m", "immediate", "-w", "stop"])
                .output();
            if !matches!(&stopped, Ok(out) if out.status.success()) {
                eprintln!("warning: could not stop the private Postgres: {stopped:?}");
            }
        }
        if std::thread::panicking() {
            eprintln!("--- private Postgres log (port {}) ---", self.port);
            eprintln!("{}", self.log());
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// Run a Postgres server program to its end (off the async runtime) and fail
/// the test with its output if it fails.
async fn run_as_postgres(program: &'static str, args: &[&str]) {
    let mut command = postgres_command(program);
    command.args(args);
    let what = format!("{command:?}");
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the command's thread")
        .unwrap_or_else(|e| {
            panic!("cannot run {what}: {e} (the PostgreSQL server package provides it)")
        });
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `program` from the server's bin directory, run as the `postgres` user when
/// the tests run as root (the server refuses to run as root).
fn postgres_command(program: &str) -> Command {
    let path = server_bin_dir()
        .map(|dir| dir.join(program))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(program));
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        command
    } else {
        Command::new(path)
    }
}

/// Debian and Ubuntu keep `initdb` and `pg_ctl` off the PATH, in
/// `pg_config --bindir` or else `/usr/lib/postgresql/<version>/bin` (the newest).
fn server_bin_dir() -> Option<PathBuf> {
    let configured = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|dir| PathBuf::from(dir.trim()))
        .filter(|dir| dir.join("initdb").exists());
    configured.or_else(|| {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let version = entry.file_name().to_str()?.parse().ok()?;
                Some((version, entry.path().join("bin")))
            })
            .filter(|(_, bin)| bin.join("initdb").exists())
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin)
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}
