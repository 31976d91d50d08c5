//! The service as its real binary (`ai-secretary`, every role in one process),
//! for what an in-process app cannot show: its own `/metrics` (the in-process
//! apps share this test binary's global recorder, so their counts mix), its
//! logs, its exit status, and its handling of SIGTERM. Each runs on a free port
//! with a database, stream, subject prefix and Redis key prefix of its own, out
//! of a scratch directory (a developer's `.env` in the checkout would configure
//! it), and is killed on drop, before those are removed.

use std::{
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    helpers::{Topology, eventually},
    servers::free_port,
    support::{BusNames, TestDb, http},
};

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_ai-secretary")
}

pub struct Service<D = TestDb> {
    child: Option<Child>,
    /// `127.0.0.1:<port>`.
    pub address: String,
    pub client: reqwest::Client,
    stdout: tempfile::NamedTempFile,
    stderr: tempfile::NamedTempFile,
    pub db: D,
    pub names: BusNames,
}

impl Service {
    /// The binary with the defaults (offline LLM, development secrets, warnings
    /// logged) on fresh names, answering `/health`.
    pub async fn start() -> Service {
        Service::start_on(TestDb::new().await, BusNames::new(), &[]).await
    }

    /// The binary on `db` and `names`, with `env` added (and winning over the
    /// defaults), answering `/health`.
    pub async fn start_on(db: TestDb, names: BusNames, env: &[(&str, &str)]) -> Service {
        Service::launch(db, names, env).await
    }
}

impl<D: Topology> Service<D> {
    /// The binary of topology `D` on fresh data, with `env` added.
    pub async fn start_fresh(env: &[(&str, &str)]) -> Service<D> {
        Service::launch(D::fresh().await, D::bus_names(), env).await
    }

    /// The binary on `db` and `names` (its topology's settings,
    /// `Topology::service_env`), with `env` added (and winning over the
    /// defaults), answering `/health`.
    pub async fn launch(db: D, names: BusNames, env: &[(&str, &str)]) -> Service<D> {
        let address = format!("127.0.0.1:{}", free_port());
        let (stdout, stderr) = (
            tempfile::NamedTempFile::new().unwrap(),
            tempfile::NamedTempFile::new().unwrap(),
        );
        let child = configured(&[])
            .envs(db.service_env(&names))
            .envs([
                ("BIND", address.as_str()),
                ("RUST_LOG", "warn"),
                // As the in-process apps: limits off unless a test sets one.
                ("RATE_LIMIT_COMMANDS_PER_MINUTE", "0"),
                ("RATE_LIMIT_SIGNUPS_PER_HOUR", "0"),
                ("RATE_LIMIT_LOGINS_PER_MINUTE", "0"),
            ])
            .envs(env.iter().copied())
            .stdout(stdout.reopen().unwrap())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .expect("the service's binary starts");
        let service = Service {
            child: Some(child),
            address,
            client: reqwest::Client::new(),
            stdout,
            stderr,
            db,
            names,
        };
        until_ok(&service.url("/health")).await;
        service
    }
}

impl<D> Service<D> {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// `(status, JSON body)` of one request; an empty body is `Null`, a body
    /// that is not JSON fails the test.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.client.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the request is sent");
        let status = response.status();
        let text = response.text().await.unwrap();
        if text.is_empty() {
            return (status, Value::Null);
        }
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path} answered {status} with no JSON ({e}): {text}"));
        (status, body)
    }

    /// POST `/api/v1{path}` that must answer 201; the created resource.
    pub async fn created(&self, path: &str, token: &str, body: Value) -> Value {
        let (status, created) = self
            .call(
                Method::POST,
                &format!("/api/v1{path}"),
                Some(token),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "POST {path}: {created}");
        created
    }

    /// A conversation with `assistant` (its JSON).
    pub async fn conversation(&self, token: &str, assistant: &Value) -> Value {
        self.created(
            "/conversations",
            token,
            json!({ "assistant_id": assistant["id"] }),
        )
        .await
    }

    /// GET `/api/v1{path}` that must answer 200, after the command named by
    /// `consistency` (an `X-Consistency-Token`) if given; its JSON body.
    pub async fn read(&self, path: &str, token: &str, consistency: Option<&str>) -> Value {
        let response = http::get(&self.client, &self.url(""), path, token, consistency)
            .send()
            .await
            .expect("the request is sent");
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
    }

    /// Register `email` and return an access token.
    pub async fn signed_up(&self, email: &str) -> String {
        let credentials = json!({ "email": email, "password": "correct horse battery" });
        let mut user = credentials.clone();
        user["display_name"] = json!("Test");
        let (status, body) = self
            .call(Method::POST, "/api/v1/users", None, Some(user))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, token) = self
            .call(Method::POST, "/api/v1/auth/token", None, Some(credentials))
            .await;
        assert_eq!(status, StatusCode::OK, "{token}");
        token["access_token"].as_str().unwrap().to_owned()
    }

    /// This process's `/metrics`: its own counts alone.
    pub async fn metrics(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap()
    }

    /// SIGTERM, then wait for the process to exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.sigterm();
        self.exited().await
    }

    /// SIGTERM: the graceful shutdown starts.
    pub fn sigterm(&self) {
        signal(
            self.child.as_ref().expect("the service is running"),
            "-TERM",
        );
    }

    /// Wait for the process to exit (off the runtime, so that what the test
    /// runs on it keeps going meanwhile).
    pub async fn exited(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the service is running");
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap()
    }

    /// What it printed to stdout (its log lines) so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.stdout.path()).unwrap()
    }
}

impl<D> Drop for Service<D> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        print_tail_if_failing("the service (stdout)", self.stdout.path());
        print_tail_if_failing("the service (stderr)", self.stderr.path());
    }
}

/// The binary with exactly `env` (and `PATH`), run from a scratch directory so
/// a `.env` in the checkout cannot configure it.
pub fn configured(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(binary());
    command
        .current_dir(std::env::temp_dir())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    command
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {}", child.id());
}

/// Wait until a starting server answers `url` with 200.
pub async fn until_ok(url: &str) {
    let client = reqwest::Client::new();
    eventually(&format!("{url} answers 200"), async || {
        let response = client.get(url).send().await.map_err(|e| e.to_string())?;
        match response.status() {
            StatusCode::OK => Ok(()),
            status => Err(status.to_string()),
        }
    })
    .await;
}

/// When the test is failing, the last lines of a server's log go to its output.
pub fn print_tail_if_failing(what: &str, log: &Path) {
    if std::thread::panicking() {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        eprintln!("--- last lines of {what} ---");
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
    }
}
