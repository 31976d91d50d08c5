//! Servers of a test's own: a `nats-server` or `redis-server` on a free port,
//! with a data directory of its own, that the test may kill, restart on the same
//! port (and, for NATS, the same JetStream store), or freeze; always killed at
//! the end (a `Drop` guard). The shared servers other tests use are never
//! stopped.

use std::{
    fs::OpenOptions,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use uuid::Uuid;

use crate::helpers::eventually;

/// A `nats-server` or `redis-server` of this test's own, killed (and its data
/// directory removed) on `Drop`.
pub struct PrivateServer {
    program: &'static str,
    scheme: &'static str,
    args: Vec<String>,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateServer {
    /// NATS with JetStream, its store in a directory of its own.
    pub async fn nats() -> PrivateServer {
        let program = if std::path::Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server"
        } else {
            "nats-server"
        };
        let (port, dir) = (free_port(), scratch_dir("nats"));
        let args = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-js".into(),
            "-sd".into(),
            dir.display().to_string(),
        ];
        Self::launch(program, "nats", args, port, dir).await
    }

    /// Redis with an append-only file synced on every write, so what it held
    /// survives a kill: a restarted Redis still has the copies it had cached.
    pub async fn redis() -> PrivateServer {
        let (port, dir) = (free_port(), scratch_dir("redis"));
        let args = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "yes".into(),
            "--appendfsync".into(),
            "always".into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        Self::launch("redis-server", "redis", args, port, dir).await
    }

    async fn launch(
        program: &'static str,
        scheme: &'static str,
        args: Vec<String>,
        port: u16,
        dir: PathBuf,
    ) -> PrivateServer {
        let mut server = PrivateServer {
            program,
            scheme,
            args,
            port,
            dir,
            child: None,
        };
        server.start().await;
        server
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// Start (or restart, on the same port and data) and wait until it answers.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.program);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("open the server log");
        let child = Command::new(self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program));
        self.child = Some(child);
        let what = format!("{} on port {} answers", self.program, self.port);
        eventually(&what, async || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("{} exited with {status}:\n{}", self.program, self.log());
            }
            self.ping().await
        })
        .await;
    }

    async fn ping(&self) -> Result<(), String> {
        let url = self.url();
        let ping = async {
            if self.scheme == "nats" {
                let client = async_nats::connect(&url).await.map_err(|e| e.to_string())?;
                client.flush().await.map_err(|e| e.to_string())
            } else {
                let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        };
        tokio::time::timeout(Duration::from_secs(2), ping)
            .await
            .map_err(|_| "no answer within 2 s".to_owned())?
    }

    /// SIGKILL: no goodbye to the clients, nothing flushed on the way out.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- last lines of {} (port {}) ---",
                self.program, self.port
            );
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
        // A warning, not a panic: this runs in a drop, maybe during one.
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {e}", self.dir.display());
        }
    }
}

impl PrivateServer {
    /// SIGSTOP: the server keeps its connections open and answers nothing, like
    /// a process stuck in a long GC pause or a host frozen by its hypervisor.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT: back from `freeze`.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the server is running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {}", child.id());
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn scratch_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ai-secretary-test-{kind}-{}",
        Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}
