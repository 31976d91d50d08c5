//! The HTTP edges docs/decisions.md promises: the forms of `If-Match`, the 409
//! after the last lost race, Idempotency-Key's format, the correlation id a
//! client may not choose, a handler's panic, and CORS.

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use reqwest::{Method, StatusCode, header::HeaderValue};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{EventLog, TestApp, problem, spawn_app};

async fn patch<D>(
    app: &TestApp<D>,
    token: &str,
    id: &str,
    if_match: Option<&str>,
) -> reqwest::Response {
    let mut request = app
        .client
        .patch(app.url(&format!("/api/v1/assistants/{id}")))
        .bearer_auth(token)
        .json(&json!({ "name": format!("renamed {}", Uuid::new_v4()) }));
    if let Some(value) = if_match {
        request = request.header("if-match", value);
    }
    request.send().await.unwrap()
}

crate::on_both!(if_match_takes_a_quoted_or_bare_version_or_a_star);
/// `If-Match` takes the ETag as issued (`"2"`), a bare number (`2`), or `*`
/// (any version); anything else, a weak ETag included, is 400.
async fn if_match_takes_a_quoted_or_bare_version_or_a_star<D: EventLog>(app: TestApp<D>) {
    let token = app.signed_up("if-match@example.com").await;
    let id = app.assistant(&token, "Versioned").await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let bare = patch(&app, &token, &id, Some("1")).await;
    assert_eq!(bare.status(), StatusCode::OK);
    assert_eq!(bare.headers()["etag"], "\"2\"");
    // The same bare number again is stale now.
    let stale = problem(
        patch(&app, &token, &id, Some("1")).await,
        StatusCode::PRECONDITION_FAILED,
    )
    .await;
    assert_eq!(stale["current_version"], 2);
    let quoted = patch(&app, &token, &id, Some("\"2\"")).await;
    assert_eq!(quoted.headers()["etag"], "\"3\"");
    // `*`: whatever the version is.
    let any = patch(&app, &token, &id, Some("*")).await;
    assert_eq!(any.status(), StatusCode::OK);
    assert_eq!(any.headers()["etag"], "\"4\"");
    for unreadable in ["W/\"4\"", "-1", "4, 5", ""] {
        problem(
            patch(&app, &token, &id, Some(unreadable)).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
    // user, created, and three renames.
    assert_eq!(app.event_count().await, 5);
}

/// Without If-Match a command that loses a race is decided again on the new
/// state, 10 times, then answered 409; its first decision, on the state this
/// process cached, does not count (a cache behind the store is not a race
/// lost), so the store sees 11 attempts. Every attempt here loses to a racer: a
/// trigger that, just before the command's event is inserted, inserts another
/// event at the same version in the same statement, so the unique key refuses
/// the command's, as it would a concurrent writer's (the statement fails, and
/// the racer's row with it). A sequence (not rolled back) counts the attempts.
// Server-only: the racer is a plpgsql trigger, the count a Postgres sequence
// (a SQLite trigger's writes roll back with the failed statement: nothing
// could count the attempts there).
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn a_command_that_loses_every_race_is_409_after_ten_attempts() {
    let app = spawn_app().await;
    let token = app.signed_up("racer@example.com").await;
    let id = app.assistant(&token, "Contended").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for sql in [
        "CREATE SEQUENCE race_attempts".to_owned(),
        format!(
            "CREATE FUNCTION race() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.stream_id = '{id}'::uuid AND NEW.event_type <> 'Racer' THEN
                     PERFORM nextval('race_attempts');
                     INSERT INTO events (event_id, stream_id, stream_type, version, event_type, data)
                     VALUES (gen_random_uuid(), NEW.stream_id, NEW.stream_type, NEW.version, 'Racer', '{{}}');
                 END IF;
                 RETURN NEW;
             END $$"
        ),
        "CREATE TRIGGER race BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION race()".into(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&app.db.pool)
            .await
            .unwrap();
    }
    let events = app.event_count().await;

    let lost = problem(patch(&app, &token, &id, None).await, StatusCode::CONFLICT).await;
    assert!(
        lost["detail"].as_str().unwrap().contains("concurrent"),
        "{lost}"
    );
    let attempts: i64 = sqlx::query_scalar("SELECT last_value FROM race_attempts")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(attempts, 11, "attempts before the 409");
    assert_eq!(
        app.event_count().await,
        events,
        "a lost race appends nothing"
    );

    // With the racer gone, the same request goes through at once.
    sqlx::query("DROP TRIGGER race ON events")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let won = patch(&app, &token, &id, None).await;
    assert_eq!(won.status(), StatusCode::OK);
    assert_eq!(won.headers()["etag"], "\"2\"");
}

crate::on_both!(idempotency_keys_are_one_to_255_visible_ascii_characters);
/// An Idempotency-Key is 1 to 255 visible ASCII characters; any other is 400,
/// and the request is not run.
async fn idempotency_keys_are_one_to_255_visible_ascii_characters<D: EventLog>(app: TestApp<D>) {
    let token = app.signed_up("keys@example.com").await;
    let post = async |key: HeaderValue| {
        app.client
            .post(app.url("/api/v1/assistants"))
            .bearer_auth(&token)
            .header("idempotency-key", key)
            .json(&json!({ "name": "Keyed" }))
            .send()
            .await
            .unwrap()
    };
    let events = app.event_count().await;
    for refused in [
        HeaderValue::from_static(""),
        HeaderValue::from_str(&"k".repeat(256)).unwrap(),
        HeaderValue::from_static("with space"),
        HeaderValue::from_bytes("clé".as_bytes()).unwrap(),
    ] {
        let body = problem(post(refused.clone()).await, StatusCode::BAD_REQUEST).await;
        assert!(
            body["detail"].as_str().unwrap().contains("Idempotency-Key"),
            "{refused:?}: {body}"
        );
    }
    assert_eq!(
        app.event_count().await,
        events,
        "a refused key ran its request"
    );
    let longest = HeaderValue::from_str(&"k".repeat(255)).unwrap();
    assert_eq!(post(longest.clone()).await.status(), StatusCode::CREATED);
    let replayed = post(longest).await;
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(app.event_count().await, events + 1);
}

/// The correlation id of a command's events, by its stream.
async fn correlation_of<D: EventLog>(app: &TestApp<D>, stream: &str) -> String {
    let stream: Uuid = stream.parse().unwrap();
    crate::on_db!(app.read_side().await, |pool| sqlx::query_scalar(
        "SELECT metadata ->> 'correlation_id' FROM events WHERE stream_id = $1"
    )
    .bind(stream)
    .fetch_one(pool)
    .await
    .unwrap())
}

crate::on_both!(an_unusable_request_id_is_replaced_not_echoed);
/// A client's `X-Request-Id` of 1 to 128 visible ASCII characters is the
/// request's correlation id: echoed, and in its events. Any other is replaced
/// by a generated one, which is echoed and in the events instead.
async fn an_unusable_request_id_is_replaced_not_echoed<D: EventLog>(app: TestApp<D>) {
    let token = app.signed_up("correlated@example.com").await;
    let create = async |request_id: &str| {
        let response = app
            .client
            .post(app.url("/api/v1/assistants"))
            .bearer_auth(&token)
            .header("x-request-id", request_id)
            .json(&json!({ "name": "Correlated" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let echoed = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let id = response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        (echoed, correlation_of(&app, &id).await)
    };

    let longest = "r".repeat(128);
    assert_eq!(create(&longest).await, (longest.clone(), longest));

    for unusable in ["r".repeat(129), "two words".to_owned()] {
        let (echoed, recorded) = create(&unusable).await;
        assert_ne!(echoed, unusable, "an unusable id was echoed");
        assert!(
            Uuid::parse_str(&echoed).is_ok(),
            "not a generated id: {echoed}"
        );
        assert_eq!(
            recorded, echoed,
            "the events carry another id than the reply"
        );
    }
}

/// A `MakeWriter` into a buffer the test reads.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// A handler that panics answers 500 problem+json with a generic detail, and
/// the cause is logged with the request's correlation id; the 500 is counted.
/// The route is the test's own, behind exactly the layers of the API
/// (`http::edge`): no route of the service panics on purpose. (No service,
/// no database: it runs on every `cargo test`.)
#[tokio::test]
async fn a_handler_panic_is_a_logged_500_without_detail() {
    ai_secretary::telemetry::metrics(); // the recorder, before the request is counted
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(logs.clone())
        .with_max_level(tracing::Level::INFO)
        .finish();
    // This test's thread (the runtime is single-threaded, so the server too).
    let _logging = tracing::subscriber::set_default(subscriber);
    async fn panics() -> &'static str {
        panic!("the cause only operators may read")
    }
    let routes = axum::Router::new().route("/boom", axum::routing::get(panics));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, ai_secretary::http::edge(routes, &[]))
            .await
            .unwrap()
    });

    let response = reqwest::Client::new()
        .get(format!("http://{address}/boom"))
        .header("x-request-id", "the-panicking-request")
        .send()
        .await
        .unwrap();
    server.abort();
    assert_eq!(response.headers()["x-request-id"], "the-panicking-request");
    let body = problem(response, StatusCode::INTERNAL_SERVER_ERROR).await;
    assert!(
        !body.to_string().contains("the cause"),
        "the panic's cause reached the client: {body}"
    );
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = logged
        .lines()
        .find(|l| l.contains("handler panicked: the cause only operators may read"))
        .unwrap_or_else(|| panic!("the panic is not logged:\n{logged}"));
    assert!(line.contains("the-panicking-request"), "{line}");
    assert!(line.contains(r#""level":"ERROR""#), "{line}");
    let metrics = ai_secretary::telemetry::render();
    let counted = crate::support::promql::sample(
        &metrics,
        "http_requests_total",
        &[("path", "/boom"), ("status", "500")],
    );
    assert_eq!(counted, Some(1.0), "the 500 is not counted");
}

crate::on_both!(
    cors_answers_the_allowed_origins_only,
    with ["--cors-origins", "https://app.example.com, https://admin.example.com"]
);
/// `CORS_ORIGINS` (comma-separated, spaces allowed): an allowed origin's
/// preflight and request get the CORS headers, another origin is not allowed.
async fn cors_answers_the_allowed_origins_only<D>(app: TestApp<D>) {
    let token = app.signed_up("cors@example.com").await;
    let preflight = async |origin: &str| {
        app.client
            .request(Method::OPTIONS, app.url("/api/v1/assistants"))
            .header("origin", origin)
            .header("access-control-request-method", "PATCH")
            .header(
                "access-control-request-headers",
                "authorization,content-type,if-match,idempotency-key,x-consistency-token",
            )
            .send()
            .await
            .unwrap()
    };
    let request = async |origin: &str| {
        let response = app
            .client
            .get(app.url("/api/v1/assistants"))
            .bearer_auth(&token)
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response
    };
    let header = |response: &reqwest::Response, name: &str| -> Option<String> {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_ascii_lowercase())
    };

    for origin in ["https://app.example.com", "https://admin.example.com"] {
        let allowed = preflight(origin).await;
        assert!(allowed.status().is_success(), "{}", allowed.status());
        assert_eq!(
            header(&allowed, "access-control-allow-origin").as_deref(),
            Some(origin)
        );
        let methods = header(&allowed, "access-control-allow-methods").unwrap_or_default();
        assert!(methods.contains("patch"), "{methods}");
        let headers = header(&allowed, "access-control-allow-headers").unwrap_or_default();
        for name in [
            "authorization",
            "if-match",
            "idempotency-key",
            "x-consistency-token",
        ] {
            assert!(headers.contains(name), "{name} not allowed: {headers}");
        }
        let actual = request(origin).await;
        assert_eq!(
            header(&actual, "access-control-allow-origin").as_deref(),
            Some(origin)
        );
        let exposed = header(&actual, "access-control-expose-headers").unwrap_or_default();
        for name in ["etag", "location", "x-consistency-token", "x-request-id"] {
            assert!(exposed.contains(name), "{name} not exposed: {exposed}");
        }
        assert!(
            header(&actual, "vary").is_some_and(|v| v.contains("origin")),
            "caches must key the answer by origin"
        );
    }

    // Another origin is not allowed: no Allow-Origin, so the browser refuses the
    // answer. (tower-http sends the lists of allowed methods and headers and of
    // exposed headers whatever the origin; they grant nothing without it.)
    for response in [
        preflight("https://evil.example.com").await,
        request("https://evil.example.com").await,
    ] {
        for name in [
            "access-control-allow-origin",
            "access-control-allow-credentials",
        ] {
            assert!(
                response.headers().get(name).is_none(),
                "another origin got {name}: {:?}",
                response.headers()
            );
        }
    }
}
