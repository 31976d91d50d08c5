//! `spawn_app()`: the service built as `main` builds it, bound to port 0, with a
//! database of its own; and the few calls every test makes.

use ai_secretary::{
    cli::Cli,
    startup::{Application, Roles},
};
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::support::{AsDb, BusNames, TestDb, http, service::command_line};

/// The service of a test: it runs on a runtime and thread of its own, as a
/// process would, so that it can be stopped the way a process stops whatever
/// the test's own runtime is doing. Dropped, it shuts down gracefully (the
/// path SIGTERM takes: requests finish, roles stop, the store closes), and a
/// shutdown that fails or takes longer than [`SHUTDOWN_LIMIT`] fails the test;
/// `crash` stops it abruptly instead.
pub struct TestApp<D = TestDb> {
    pub address: String,
    pub client: reqwest::Client,
    /// Its database: a Postgres one of its own, or an embedded one.
    pub db: D,
    /// This test's names on NATS and Redis; the stream and keys go when it drops.
    pub names: BusNames,
    server: Option<Server>,
}

struct Server {
    /// Cancelled: the graceful shutdown starts (`Application::run_until`'s signal).
    shutdown: CancellationToken,
    /// Cancelled: everything stops where it is, like a killed process.
    crash: CancellationToken,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

/// Longest a graceful shutdown may take at the end of a test.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(10);

/// The service, all in one process (API, relay, projections), on its own database,
/// JetStream stream, subject prefix and Redis key prefix.
/// The `ENCRYPTION_KEY` the test services run with (the development default).
pub fn master_key() -> ai_secretary::crypto::MasterKey {
    ai_secretary::crypto::MasterKey::from_hex(ai_secretary::config::DEV_ENCRYPTION_KEY)
        .expect("the development key is 64 hex characters")
}

/// Users' keys in the store on `db`, as the test services unwrap them: what
/// commands seal with and rebuilds open with.
pub fn keyring(db: &impl AsDb) -> std::sync::Arc<ai_secretary::store::sealed::Keyring> {
    ai_secretary::recovery::opener(master_key(), &db.db())
}

/// A user registered through `commands` (so they have a data key to seal
/// with), and a command context that acts as them.
pub async fn registered(
    commands: &ai_secretary::app::Commands,
) -> (uuid::Uuid, ai_secretary::app::CommandContext) {
    let user = uuid::Uuid::now_v7();
    let registration = ai_secretary::app::users::Registration {
        user_id: user,
        email: format!("{user}@example.com"),
        display_name: "Owner".into(),
        password: "correct horse battery".into(),
        at: chrono::Utc::now(),
    };
    commands
        .register(registration, &Default::default(), None)
        .await
        .expect("the user registers");
    let context = ai_secretary::app::CommandContext {
        user_id: Some(user),
        ..Default::default()
    };
    (user, context)
}

/// In `extra`: run without NATS (no `--nats-url`): the workers and the replier
/// tail the store, and live updates stay in the process.
pub const WITHOUT_NATS: &str = "(without NATS)";

fn non_empty<'a>(value: &'a str, otherwise: &'a str) -> &'a str {
    if value.is_empty() { otherwise } else { value }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// `spawn_app` with extra command-line options (e.g. a private server's URL).
pub async fn spawn_app_with(extra: &[&str]) -> TestApp {
    spawn_app_on(TestDb::new().await, BusNames::new(), extra, Roles::all()).await
}

/// `spawn_app_with` minus the replier: replies stay `queued`, for tests of the read
/// side that must not see answers (and their cache invalidations) arrive under them.
pub async fn spawn_app_without_replier(extra: &[&str]) -> TestApp {
    spawn_app_on(
        TestDb::new().await,
        BusNames::new(),
        extra,
        without_replier(),
    )
    .await
}

/// Every role but the replier.
pub fn without_replier() -> Roles {
    Roles {
        replier: false,
        ..Roles::all()
    }
}

/// The service with the given roles on an existing database and bus names, so a
/// test can stop one instance and start another on the same data.
pub async fn spawn_app_on(db: TestDb, names: BusNames, extra: &[&str], roles: Roles) -> TestApp {
    let mut args = vec![
        "--database-url",
        &db.url,
        "--database-max-connections",
        "12",
        "--nats-stream",
        &names.stream,
        "--nats-subject-prefix",
        &names.subject_prefix,
        "--redis-key-prefix",
        &names.redis_prefix,
    ];
    // The server topology: the shared NATS and Redis unless the test names its
    // own (a private server, or an address where nothing listens).
    let (nats_url, redis_url) = (
        non_empty(&names.nats_url, "nats://127.0.0.1:4222"),
        non_empty(&names.redis_url, "redis://127.0.0.1:6379"),
    );
    if !extra.contains(&"--nats-url") && !extra.contains(&WITHOUT_NATS) {
        args.extend(["--nats-url", nats_url]);
    }
    if !extra.contains(&"--redis-url") {
        args.extend(["--redis-url", redis_url]);
    }
    args.extend(extra.iter().filter(|a| **a != WITHOUT_NATS));
    launch(configured(&args), db, names, roles).await
}

/// The embedded service (SQLite in a temporary `DATA_DIR`, no NATS, no Redis),
/// as `cargo run` starts it on a machine without servers.
pub async fn spawn_embedded(extra: &[&str]) -> TestApp<Embedded> {
    spawn_embedded_on(Embedded::new(), extra, Roles::all()).await
}

/// The embedded service on an existing data directory.
pub async fn spawn_embedded_on(db: Embedded, extra: &[&str], roles: Roles) -> TestApp<Embedded> {
    let dir = db.dir.path().to_string_lossy().into_owned();
    let mut args = vec!["--data-dir", &dir];
    args.extend_from_slice(extra);
    launch(configured(&args), db, BusNames::detached(), roles).await
}

/// An embedded service's data directory, removed when the test ends.
pub struct Embedded {
    pub dir: tempfile::TempDir,
    /// The test's own handle on the file, opened on first use.
    read_side: tokio::sync::OnceCell<ai_secretary_projections::Db>,
}

impl Embedded {
    pub fn new() -> Embedded {
        Embedded {
            dir: tempfile::tempdir().expect("a temporary directory"),
            read_side: tokio::sync::OnceCell::new(),
        }
    }

    /// The SQLite file the service keeps everything in.
    pub fn file(&self) -> std::path::PathBuf {
        self.dir
            .path()
            .join(ai_secretary::config::EMBEDDED_DATABASE_FILE)
    }

    /// A pool of the test's own on that file, for reads beside the service.
    pub async fn pool(&self) -> sqlx::SqlitePool {
        ai_secretary::store::sqlite::connect(&self.file().to_string_lossy(), 1)
            .await
            .expect("the embedded database opens")
    }
}

impl Embedded {
    /// Wait until every projection's checkpoint is at the last event of the
    /// store (read beside the service, on a pool of the test's own).
    pub async fn caught_up(&self) {
        self.caught_up_with(&ai_secretary_projections::NAMES).await;
    }

    /// [`caught_up`](Embedded::caught_up) for the projections `names` only.
    pub async fn caught_up_with(&self, names: &[&str]) {
        let pool = self.pool().await;
        let db = ai_secretary_projections::Db::Sqlite(ai_secretary_projections::SqliteDb::new(
            pool.clone(),
        ));
        crate::progress::caught_up(&db, names).await;
        pool.close().await;
    }

    /// `verify` of every projection, from this process on a pool of its own:
    /// the report, and whether the read models equal the fold of the store.
    pub async fn verify(&self) -> (String, bool) {
        // Verify holds a connection while the keyring reads users' keys on another.
        let pool = ai_secretary::store::sqlite::connect(&self.file().to_string_lossy(), 4)
            .await
            .expect("the embedded database opens");
        let db = ai_secretary_projections::Db::Sqlite(ai_secretary_projections::SqliteDb::new(
            pool.clone(),
        ));
        let verified = ai_secretary::recovery::verify_report(&db, &master_key(), &[])
            .await
            .expect("verify runs");
        pool.close().await;
        verified
    }
}

/// The binary (`ai-secretary`) on the embedded directory `dir`, as an operator
/// runs it beside the service: nothing of the test's environment but `PATH`,
/// with `DATA_DIR`, `RUST_LOG=warn` and `env` added.
pub fn embedded_binary(dir: &std::path::Path, env: &[(&str, &str)]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ai-secretary"));
    command
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATA_DIR", dir)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null());
    command
}

/// A child process whose output is collected as it comes (by a thread per
/// pipe, so neither fills), waited for without blocking the test's runtime,
/// and killed if it outlives its limit or the test.
pub struct Running {
    child: std::process::Child,
    output: std::sync::Arc<std::sync::Mutex<(String, String)>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// How a [`Running`] process ended: its exit code (None if killed by a
/// signal), and what it wrote.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Both streams, for assertions and failure messages.
    pub fn printed(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Running {
    pub fn start(command: &mut std::process::Command) -> Running {
        use std::io::Read;
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let output = std::sync::Arc::new(std::sync::Mutex::new((String::new(), String::new())));
        let mut readers = vec![];
        let pipes: [(Box<dyn Read + Send>, bool); 2] = [
            (Box::new(child.stdout.take().unwrap()), true),
            (Box::new(child.stderr.take().unwrap()), false),
        ];
        for (mut pipe, is_stdout) in pipes {
            let output = output.clone();
            readers.push(std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buffer[..n]);
                    let mut output = output.lock().unwrap();
                    if is_stdout {
                        output.0.push_str(&text);
                    } else {
                        output.1.push_str(&text);
                    }
                }
            }));
        }
        Running {
            child,
            output,
            readers,
        }
    }

    /// Whether it has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("the child can be waited for")
            .is_none()
    }

    /// Everything it wrote so far, both streams.
    pub fn printed_so_far(&self) -> String {
        let output = self.output.lock().unwrap();
        format!("{}{}", output.0, output.1)
    }

    /// Wait (polling, so the runtime keeps running) for it to exit; killed
    /// and the test failed if it takes longer than `limit`.
    pub async fn finish(mut self, limit: Duration) -> Finished {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("the child can be waited for") {
                break status;
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the child ran longer than {limit:?}; it printed: {}",
                    self.printed_so_far()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for reader in std::mem::take(&mut self.readers) {
            let _ = reader.join();
        }
        let (stdout, stderr) = std::mem::take(&mut *self.output.lock().unwrap());
        Finished {
            code: status.code(),
            stdout,
            stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run `command` to its end (see [`Running`]), at most `limit`.
pub async fn run(command: &mut std::process::Command, limit: Duration) -> Finished {
    Running::start(command).finish(limit).await
}

/// The configuration of a test's service: `options` on the kit's command line.
fn configured(options: &[&str]) -> Cli {
    command_line(options).expect("test configuration parses")
}

/// Build the service configured by `cli` on a runtime and thread of its own,
/// and wait until it listens.
async fn launch<D>(cli: Cli, db: D, names: BusNames, roles: Roles) -> TestApp<D> {
    let (shutdown, crash) = (CancellationToken::new(), CancellationToken::new());
    let (built, address) = tokio::sync::oneshot::channel();
    let thread = {
        let (shutdown, crash) = (shutdown.clone(), crash.clone());
        std::thread::spawn(move || {
            // As `#[tokio::main]` on this two-core machine.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let served = runtime.block_on(async move {
                let app = match Application::build(&cli.config, roles).await {
                    Ok(app) => app,
                    Err(e) => {
                        let _ = built.send(Err(format!("{e:#}")));
                        return Ok(());
                    }
                };
                let _ = built.send(Ok(app
                    .local_addr()
                    .map_or_else(String::new, |a| format!("http://{a}"))));
                tokio::select! {
                    served = app.run_until(async move { shutdown.cancelled().await }) => served,
                    // Dropping `run_until` drops (aborts) every role mid-step.
                    () = crash.cancelled() => Ok(()),
                }
            });
            // Whatever is left (a crash's) is dropped where it stands.
            runtime.shutdown_background();
            served
        })
    };
    let address = address
        .await
        .expect("the service's thread reports its start")
        .unwrap_or_else(|e| panic!("the application builds: {e}"));
    TestApp {
        address,
        client: reqwest::Client::new(),
        db,
        names,
        server: Some(Server {
            shutdown,
            crash,
            thread,
        }),
    }
}

impl<D> TestApp<D> {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// A JSON request with an optional bearer token.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Response {
        let mut request = self.client.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("the request is sent")
    }

    /// [`get`](TestApp::get) that must answer 200; its JSON body.
    pub async fn get_ok(&self, path: &str, token: &str, consistency: Option<&str>) -> Value {
        let response = self.get(path, token, consistency).await;
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// GET `/api/v1{path}` with a bearer token and, if given, an
    /// `X-Consistency-Token` (the read then waits for the command it names).
    pub async fn get(&self, path: &str, token: &str, consistency: Option<&str>) -> Response {
        http::get(&self.client, &self.address, path, token, consistency)
            .send()
            .await
            .expect("the request is sent")
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Response {
        self.send(
            Method::POST,
            &format!("/api/v1{path}"),
            Some(token),
            Some(body),
        )
        .await
    }

    /// Register a user and return their access token.
    pub async fn signed_up(&self, email: &str) -> String {
        let response = self
            .send(
                Method::POST,
                "/api/v1/users",
                None,
                Some(json!({ "email": email, "password": "correct horse battery", "display_name": "Test" })),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        self.signed_in(email, "correct horse battery").await
    }

    /// Sign in; the access token.
    pub async fn signed_in(&self, email: &str, password: &str) -> String {
        let response = self
            .send(
                Method::POST,
                "/api/v1/auth/token",
                None,
                Some(json!({ "email": email, "password": password })),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        let token: Value = response.json().await.unwrap();
        token["access_token"].as_str().unwrap().to_owned()
    }

    pub async fn assistant(&self, token: &str, name: &str) -> Value {
        let response = self
            .post("/assistants", token, json!({ "name": name }))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }

    pub async fn conversation(&self, token: &str, assistant_id: &Value) -> Value {
        let response = self
            .post(
                "/conversations",
                token,
                json!({ "assistant_id": assistant_id }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }
}

/// A user with two assistants ("Mika", "Ren"), three conversations (two
/// with Mika) and three messages in each, the third conversation renamed: the
/// user's token, the assistants' ids and the conversations' ids.
pub async fn some_history<D>(app: &TestApp<D>, email: &str) -> (String, Vec<String>, Vec<String>) {
    let token = app.signed_up(email).await;
    let mut assistants = vec![];
    let mut conversations = vec![];
    for name in ["Mika", "Ren"] {
        assistants.push(
            app.assistant(&token, name).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    for (i, assistant) in [&assistants[0], &assistants[0], &assistants[1]]
        .into_iter()
        .enumerate()
    {
        let conversation = app.conversation(&token, &json!(assistant)).await;
        let id = conversation["id"].as_str().unwrap().to_owned();
        for n in 0..3 {
            let posted = app
                .post(
                    &format!("/conversations/{id}/messages"),
                    &token,
                    json!({ "content": format!("message {n} in {i}") }),
                )
                .await;
            assert_eq!(posted.status(), StatusCode::ACCEPTED);
        }
        conversations.push(id);
    }
    let renamed = app
        .send(
            Method::PATCH,
            &format!("/api/v1/conversations/{}", conversations[2]),
            Some(&token),
            Some(json!({ "title": "renamed" })),
        )
        .await;
    assert_eq!(renamed.status(), StatusCode::OK);
    (token, assistants, conversations)
}

/// What a test reads of the database beside the service, whichever it is.
pub trait EventLog {
    /// The server topology (Postgres, NATS, Redis) rather than the embedded one.
    const SERVERS: bool;

    /// The database, as the read side and the operations tools take it.
    fn read_side(&self) -> impl std::future::Future<Output = ai_secretary_projections::Db>;

    /// Every row of `table` as text, sorted: its JSON on Postgres; on SQLite
    /// every value's bytes read as UTF-8 (so text inside a BLOB shows too).
    fn rows(&self, table: &str) -> impl std::future::Future<Output = Vec<String>>;

    /// What a dump of the database (or only of `table`) shows: every row,
    /// every value as text. Not empty: an empty dump proves nothing.
    fn dump(&self, table: Option<&str>) -> impl std::future::Future<Output = String>;

    /// `(stream_type, version, event_type)` of every event, in commit order.
    fn events(&self) -> impl std::future::Future<Output = Vec<(String, i64, String)>> {
        async {
            let db = self.read_side().await;
            crate::on_db!(db, |pool| sqlx::query_as(
                "SELECT stream_type, version, event_type FROM events
                 ORDER BY transaction_id, global_position"
            )
            .fetch_all(pool)
            .await
            .unwrap())
        }
    }

    fn event_count(&self) -> impl std::future::Future<Output = i64> {
        async { crate::progress::event_count(&self.read_side().await).await }
    }
}

impl EventLog for TestDb {
    const SERVERS: bool = true;

    async fn read_side(&self) -> ai_secretary_projections::Db {
        self.pool.db()
    }

    async fn rows(&self, table: &str) -> Vec<String> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT row_to_json(t)::text FROM {table} t ORDER BY 1"
        )))
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// `pg_dump --data-only`.
    async fn dump(&self, table: Option<&str>) -> String {
        let mut command = std::process::Command::new("pg_dump");
        command.args(["--data-only", "--dbname", &self.url]);
        if let Some(table) = table {
            command.args(["--table", table]);
        }
        let output = command
            .output()
            .expect("pg_dump runs (PostgreSQL's client programs)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let dump = String::from_utf8(output.stdout).unwrap();
        assert!(
            dump.contains("COPY public."),
            "an empty dump proves nothing: {dump}"
        );
        dump
    }
}

impl EventLog for Embedded {
    const SERVERS: bool = false;

    /// On a pool of 4, as `ai-secretary replay` and `verify` open it (a
    /// rebuild reads users' keys while it holds its write transaction);
    /// opened once, and shared by every call (tests poll it).
    async fn read_side(&self) -> ai_secretary_projections::Db {
        self.read_side
            .get_or_init(async || {
                let file = self.file();
                let pool = ai_secretary::store::sqlite::connect(&file.to_string_lossy(), 4)
                    .await
                    .expect("the embedded database opens");
                ai_secretary_projections::Db::Sqlite(ai_secretary_projections::SqliteDb::new(pool))
            })
            .await
            .clone()
    }

    /// Each value through `hex()` and back: a BLOB's bytes as they are (a
    /// text inside one would show), a number as its digits.
    async fn rows(&self, table: &str) -> Vec<String> {
        let pool = self.pool().await;
        let columns: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info($1) ORDER BY cid")
                .bind(table)
                .fetch_all(&pool)
                .await
                .unwrap();
        assert!(!columns.is_empty(), "no table {table}");
        let hexes = columns
            .iter()
            .map(|c| format!("hex(\"{c}\")"))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {hexes} FROM \"{table}\""
        )))
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        let mut rows: Vec<String> = rows
            .iter()
            .map(|row| {
                use sqlx::Row;
                let values: Vec<String> = (0..columns.len())
                    .map(|i| {
                        let hex: String = row.get(i);
                        String::from_utf8_lossy(&hex::decode(hex).unwrap()).into_owned()
                    })
                    .collect();
                format!("{{{}}}", values.join(", "))
            })
            .collect();
        rows.sort();
        rows
    }

    /// Every row of every table (but SQLite's own and the migrations').
    async fn dump(&self, table: Option<&str>) -> String {
        let tables: Vec<String> = match table {
            Some(table) => vec![table.to_owned()],
            None => {
                let pool = self.pool().await;
                let tables = sqlx::query_scalar(
                    "SELECT name FROM sqlite_schema WHERE type = 'table'
                     AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations' ORDER BY name",
                )
                .fetch_all(&pool)
                .await
                .unwrap();
                pool.close().await;
                tables
            }
        };
        let mut dump = String::new();
        for table in tables {
            for row in self.rows(&table).await {
                dump.push_str(&format!("{table} {row}\n"));
            }
        }
        assert!(!dump.is_empty(), "an empty dump proves nothing");
        dump
    }
}

/// The service of one topology, started, stopped and started again on the
/// same data.
pub trait Topology: EventLog + Sized {
    /// A fresh database of this topology, with no service on it.
    fn fresh() -> impl std::future::Future<Output = Self>;

    /// Fresh names on NATS and Redis for a service of this topology (none
    /// for the embedded one).
    fn bus_names() -> BusNames;

    /// The environment that points the service's binary at this data (and
    /// on the servers at `names`).
    fn service_env(&self, names: &BusNames) -> Vec<(&'static str, String)>;

    /// A fresh service of this topology with `extra` options and `roles`.
    fn spawn(extra: &[&str], roles: Roles) -> impl std::future::Future<Output = TestApp<Self>>;

    /// Stop `app` gracefully; its data (and bus names) for [`start`](Topology::start).
    fn stop(app: TestApp<Self>) -> (Self, BusNames);

    /// Stop `app` abruptly, like a crash (nothing flushed, acked or closed).
    fn crash(app: TestApp<Self>) -> (Self, BusNames);

    /// A service on the data `stop` handed back.
    fn start(
        self,
        names: BusNames,
        extra: &[&str],
        roles: Roles,
    ) -> impl std::future::Future<Output = TestApp<Self>>;

    /// The options that point a second process (`ai-secretary verify`,
    /// `replay`) at `app`'s data: its database, and on the servers its cache.
    fn cli_args(app: &TestApp<Self>) -> Vec<String>;
}

impl Topology for TestDb {
    async fn fresh() -> TestDb {
        TestDb::new().await
    }

    fn bus_names() -> BusNames {
        BusNames::new()
    }

    fn service_env(&self, names: &BusNames) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", self.url.clone()),
            ("NATS_URL", names.nats_url.clone()),
            ("REDIS_URL", names.redis_url.clone()),
            ("NATS_STREAM", names.stream.clone()),
            ("NATS_SUBJECT_PREFIX", names.subject_prefix.clone()),
            ("REDIS_KEY_PREFIX", names.redis_prefix.clone()),
        ]
    }

    async fn spawn(extra: &[&str], roles: Roles) -> TestApp<TestDb> {
        spawn_app_on(TestDb::new().await, BusNames::new(), extra, roles).await
    }

    fn stop(app: TestApp<TestDb>) -> (TestDb, BusNames) {
        app.stop()
    }

    fn crash(app: TestApp<TestDb>) -> (TestDb, BusNames) {
        app.crash()
    }

    async fn start(self, names: BusNames, extra: &[&str], roles: Roles) -> TestApp<TestDb> {
        spawn_app_on(self, names, extra, roles).await
    }

    fn cli_args(app: &TestApp<TestDb>) -> Vec<String> {
        [
            "--database-url",
            &app.db.url,
            "--redis-url",
            &app.names.redis_url,
            "--redis-key-prefix",
            &app.names.redis_prefix,
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

impl Topology for Embedded {
    async fn fresh() -> Embedded {
        Embedded::new()
    }

    fn bus_names() -> BusNames {
        BusNames::detached()
    }

    fn service_env(&self, _: &BusNames) -> Vec<(&'static str, String)> {
        vec![("DATA_DIR", self.dir.path().to_string_lossy().into_owned())]
    }

    async fn spawn(extra: &[&str], roles: Roles) -> TestApp<Embedded> {
        spawn_embedded_on(Embedded::new(), extra, roles).await
    }

    fn stop(app: TestApp<Embedded>) -> (Embedded, BusNames) {
        (app.stop_embedded(), BusNames::detached())
    }

    fn crash(mut app: TestApp<Embedded>) -> (Embedded, BusNames) {
        app.crash_server();
        let data = std::mem::replace(&mut app.db, Embedded::new());
        (data, BusNames::detached())
    }

    async fn start(self, _: BusNames, extra: &[&str], roles: Roles) -> TestApp<Embedded> {
        spawn_embedded_on(self, extra, roles).await
    }

    fn cli_args(app: &TestApp<Embedded>) -> Vec<String> {
        vec![
            "--data-dir".to_owned(),
            app.db.dir.path().to_string_lossy().into_owned(),
        ]
    }
}

/// Every consumer of the log the service of topology `D` runs: the
/// projections, and on the servers the relay.
pub fn consumers<D: EventLog>() -> Vec<String> {
    if D::SERVERS {
        crate::support::progress::consumers()
    } else {
        ai_secretary::startup::projection_names()
    }
}

impl<D: EventLog> TestApp<D> {
    /// `(stream_type, version, event_type)` of every event, in commit order.
    pub async fn events(&self) -> Vec<(String, i64, String)> {
        self.db.events().await
    }

    pub async fn event_count(&self) -> i64 {
        self.db.event_count().await
    }

    /// The database, as the read side and the operations tools take it.
    pub async fn read_side(&self) -> ai_secretary_projections::Db {
        self.db.read_side().await
    }

    /// Wait until every consumer the service runs has reached the head of the log.
    pub async fn caught_up(
        &self,
    ) -> std::collections::BTreeMap<String, crate::support::progress::Checkpoint> {
        crate::progress::caught_up(&self.read_side().await, &consumers::<D>()).await
    }
}

impl<D> TestApp<D> {
    /// Stop this instance abruptly (like a crash: nothing is flushed or acked).
    fn crash_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.crash.cancel();
            if server.thread.join().is_err() {
                panic!("the service's thread panicked");
            }
        }
    }
}

impl TestApp {
    /// Stop this instance abruptly (like a crash: nothing is flushed or acked) and
    /// hand back its database and bus names for the next instance.
    pub fn crash(mut self) -> (TestDb, BusNames) {
        self.crash_server();
        let db = std::mem::replace(&mut self.db, TestDb::detached());
        let names = std::mem::replace(&mut self.names, BusNames::detached());
        (db, names)
    }
}

impl TestApp {
    /// Shut the service down gracefully, as SIGTERM would, and hand back its
    /// database and bus names for the next instance.
    pub fn stop(mut self) -> (TestDb, BusNames) {
        self.shut_down();
        let db = std::mem::replace(&mut self.db, TestDb::detached());
        let names = std::mem::replace(&mut self.names, BusNames::detached());
        (db, names)
    }
}

impl TestApp<Embedded> {
    /// Stop gracefully and hand back the data directory for the next instance.
    pub fn stop_embedded(mut self) -> Embedded {
        self.shut_down();
        std::mem::replace(&mut self.db, Embedded::new())
    }
}

impl<D> TestApp<D> {
    /// The graceful shutdown, failing the test if it fails or hangs (unless
    /// the test is failing already).
    fn shut_down(&mut self) {
        let Some(server) = self.server.take() else {
            return;
        };
        server.shutdown.cancel();
        let started = Instant::now();
        while !server.thread.is_finished() && started.elapsed() < SHUTDOWN_LIMIT {
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = started.elapsed();
        if !server.thread.is_finished() {
            server.crash.cancel();
        }
        let stopped = server.thread.join();
        if std::thread::panicking() {
            return;
        }
        match stopped {
            Ok(Ok(())) if took < SHUTDOWN_LIMIT => {}
            Ok(Ok(())) => panic!("the graceful shutdown took longer than {SHUTDOWN_LIMIT:?}"),
            Ok(Err(e)) => panic!("the graceful shutdown failed: {e:#}"),
            Err(_) => panic!("the service's thread panicked"),
        }
    }
}

/// Shut the service down gracefully when the test ends, as SIGTERM would.
impl<D> Drop for TestApp<D> {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Assert a problem+json answer and return its body.
pub async fn problem(response: Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status, "wrong status");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    body
}

/// How long `eventually` waits for the read side (or anything else) to get there.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Try `attempt` until it succeeds, for at most `DEADLINE`; then fail with the
/// last thing it saw.
pub async fn eventually<T>(what: &str, attempt: impl AsyncFnMut() -> Result<T, String>) -> T {
    eventually_every(Duration::from_millis(50), what, attempt).await
}

/// `eventually`, trying every `interval`.
pub async fn eventually_every<T>(
    interval: Duration,
    what: &str,
    attempt: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    eventually_within(DEADLINE, interval, what, attempt).await
}

/// `eventually` with a deadline of its own: for work whose size the test sets
/// (a backlog of replies after a load), not the read side's usual delay.
pub async fn eventually_within<T>(
    deadline: Duration,
    interval: Duration,
    what: &str,
    mut attempt: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(last) if start.elapsed() > deadline => {
                panic!("{what}: not within {deadline:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(interval).await,
        }
    }
}

/// One test, both topologies: `<name>::servers` (Postgres, NATS and Redis;
/// ignored unless built with `AI_SECRETARY_TEST_SERVERS=1`) and
/// `<name>::embedded` (SQLite, no server), each calling `async fn
/// <name><D>(app: TestApp<D>)` with a fresh service:
///
/// - `on_both!(name)`: every role;
/// - `on_both!(name, with [args…])`: every role, extra options;
/// - `on_both!(name, without_replier [args…])`: no replier (replies stay queued);
/// - `on_both!(name, spawns)`: `async fn <name><D: Topology>()` starts its
///   own service(s) (`D::spawn`), e.g. with options it makes up first.
#[macro_export]
macro_rules! on_both {
    ($name:ident) => {
        $crate::on_both!($name, with []);
    };
    ($name:ident, with [$($arg:expr),* $(,)?]) => {
        mod $name {
            #[cfg_attr(not(test_servers), ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1")]
            #[tokio::test]
            async fn servers() {
                super::$name($crate::helpers::spawn_app_with(&[$($arg),*]).await).await
            }
            #[tokio::test]
            async fn embedded() {
                super::$name($crate::helpers::spawn_embedded(&[$($arg),*]).await).await
            }
        }
    };
    ($name:ident, spawns) => {
        mod $name {
            #[cfg_attr(not(test_servers), ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1")]
            #[tokio::test]
            async fn servers() {
                super::$name::<$crate::support::TestDb>().await
            }
            #[tokio::test]
            async fn embedded() {
                super::$name::<$crate::helpers::Embedded>().await
            }
        }
    };
    ($name:ident, without_replier [$($arg:expr),* $(,)?]) => {
        mod $name {
            #[cfg_attr(not(test_servers), ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1")]
            #[tokio::test]
            async fn servers() {
                super::$name($crate::helpers::spawn_app_without_replier(&[$($arg),*]).await).await
            }
            #[tokio::test]
            async fn embedded() {
                super::$name(
                    $crate::helpers::spawn_embedded_on(
                        $crate::helpers::Embedded::new(),
                        &[$($arg),*],
                        $crate::helpers::without_replier(),
                    )
                    .await,
                )
                .await
            }
        }
    };
}

/// The read side's database handle over a test's Postgres pool.
pub fn pg(pool: &sqlx::PgPool) -> ai_secretary_projections::Db {
    ai_secretary_projections::Db::Postgres(pool.clone())
}
