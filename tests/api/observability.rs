//! `/metrics` as Prometheus sees it: valid exposition (`promtool check metrics`),
//! labelled by matched route, and carrying every name the dashboards and alerts
//! in `monitoring/` query.

use std::{io::Write, process::Stdio, time::Duration};

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{
    helpers::{TestApp, eventually, spawn_app},
    support::{http::consistency, promql},
};

/// What the service must export (histograms by their `_bucket` series).
const REQUIRED: &[&str] = &[
    "http_requests_total",
    "http_request_duration_seconds_bucket",
    "events_appended_total",
    "append_batch_size_bucket",
    "relay_published_total",
    "relay_position",
    "relay_lag_events",
    "relay_lag_seconds",
    "projection_events_total",
    "projection_position",
    "projection_lag_events",
    "projection_lag_seconds",
    "projection_failures_total",
    "projection_dead_letters_total",
    "cache_available",
    "cache_requests_total",
    "llm_request_duration_seconds_bucket",
    "llm_tokens_total",
    "llm_failures_total",
    "replies_total",
    "llm_quota_waits_total",
    "llm_quota_wait_seconds_bucket",
    "llm_replies_in_flight",
    "db_pool_size",
    "db_pool_max",
    "db_pool_connections",
    "db_pool_acquire_seconds_bucket",
];

async fn scrape(app: &TestApp) -> String {
    let response = app.send(Method::GET, "/metrics", None, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.unwrap()
}

/// Register, create an assistant and a conversation, post a message, read the
/// assistant back, and ask for a route that does not exist; then wait until the
/// relay and the projections have applied it and sampled their lag.
async fn drive_a_flow(app: &TestApp) -> String {
    let token = app.signed_up("observed@example.com").await;
    let assistant = app.assistant(&token, "Observed").await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let id = conversation["id"].as_str().unwrap();
    let posted = app
        .post(
            &format!("/conversations/{id}/messages"),
            &token,
            json!({ "content": "a message the metrics must not carry" }),
        )
        .await;
    assert_eq!(posted.status(), StatusCode::ACCEPTED);
    let at = consistency(&posted).unwrap();
    let assistant_id = assistant["id"].as_str().unwrap();
    let read = app
        .get(&format!("/assistants/{assistant_id}"), &token, Some(&at))
        .await;
    assert_eq!(read.status(), StatusCode::OK);
    let missing = app
        .send(Method::GET, "/api/v1/no/such/route", None, None)
        .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    // The samplers run every few seconds; the projections apply asynchronously.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(app).await;
        let names = promql::exposed_names(&text);
        let missing: Vec<_> = REQUIRED.iter().filter(|n| !names.contains(**n)).collect();
        if missing.is_empty() {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never exported {missing:?}; /metrics was:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// Server-only: needs promtool, installed with the servers by .ci/run.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn metrics_pass_promtool_and_are_labelled_by_route() {
    let app = spawn_app().await;
    let text = drive_a_flow(&app).await;

    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package `prometheus`; .ci/run installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Labelled by the route that matched, never by the raw path.
    let requests: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .collect();
    assert!(
        requests
            .iter()
            .any(|l| l.contains(r#"path="/api/v1/assistants/{id}""#)
                && l.contains(r#"method="GET""#)
                && l.contains(r#"status="200""#)),
        "no GET /api/v1/assistants/{{id}} 200 series in {requests:#?}"
    );
    assert!(
        requests
            .iter()
            .any(|l| l.contains(r#"path="unmatched""#) && l.contains(r#"status="404""#)),
        "an unknown route is not labelled unmatched: {requests:#?}"
    );
    assert!(
        !text.contains("/no/such/route"),
        "a raw path leaked into labels"
    );
    assert!(
        text.lines()
            .filter(|l| l.starts_with("events_appended_total"))
            .all(|l| l.starts_with("events_appended_total{event_type=\"")),
        "events_appended_total without its event_type label"
    );
    assert!(!text.contains("a message the metrics must not carry"));
}

/// Every metric a dashboard panel or an alert queries is one the service
/// exports (exporters' `pg_*`/`redis_*`, `up` and recording rules aside).
// Server-only: dashboards and alerts over the servers' exporters.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn dashboards_and_alerts_query_only_exported_metrics() {
    let app = spawn_app().await;
    let names = promql::exposed_names(&drive_a_flow(&app).await);
    let mut queries = promql::alert_exprs();
    for (file, dashboard) in promql::dashboards() {
        for (title, expr) in promql::dashboard_exprs(&dashboard) {
            queries.push((format!("{file}: {title}"), expr));
        }
    }
    assert!(queries.len() >= 10, "too few queries found: {queries:?}");
    let mut unknown = Vec::new();
    for (origin, expr) in &queries {
        let used = promql::metric_names(expr);
        assert!(!used.is_empty(), "{origin}: no metric in {expr:?}");
        for name in used {
            if !promql::not_exported_by_the_service(&name) && !names.contains(&name) {
                unknown.push(format!("{origin}: {name} (in {expr})"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "queried but not exported:\n{}",
        unknown.join("\n")
    );
}

/// A worker process (no API) still answers /health and /metrics on its BIND,
/// for Docker's health check and Prometheus; the API is not there.
// Server-only: a relay-only process (the relay exists only with NATS).
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn a_worker_serves_health_and_metrics_but_not_the_api() {
    use ai_secretary::startup::Roles;

    use crate::{
        helpers::spawn_app_on,
        support::{BusNames, TestDb},
    };
    let relay = spawn_app_on(
        TestDb::new().await,
        BusNames::new(),
        &[],
        Roles::only_relay(),
    )
    .await;
    let health = relay.send(Method::GET, "/health", None, None).await;
    assert_eq!(health.status(), StatusCode::OK);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let names = promql::exposed_names(&scrape(&relay).await);
        if ["relay_lag_events", "relay_lag_seconds", "db_pool_size"]
            .iter()
            .all(|n| names.contains(*n))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no relay gauges: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let api = relay
        .send(Method::GET, "/api/v1/assistants", None, None)
        .await;
    assert_eq!(api.status(), StatusCode::NOT_FOUND);
}

/// A Gemini where nothing listens, so every attempt is refused. A fixed low
/// port, as elsewhere in the tests (`127.0.0.1:9`): a port from `free_port()`
/// is free only until another test binds it, and a fake Gemini there once
/// answered 404 where a refused connection was expected. No test server binds
/// it: they all bind port 0, which the kernel picks from 32768 up.
const NOWHERE: &str = "http://127.0.0.1:9";

crate::on_both!(
    logs_are_json_with_correlation_and_user_and_no_secrets,
    spawns
);
/// The real binary with JSON logs to stdout and to a daily file in LOG_DIR:
/// every line is JSON, the request's lines carry the correlation id and the
/// user id, and no secret, password, token, email or message content appears.
async fn logs_are_json_with_correlation_and_user_and_no_secrets<D: crate::helpers::Topology>() {
    use crate::process::Service;

    let logs = tempfile::tempdir().unwrap();
    let jwt_secret = format!("jwt-secret-{}", uuid::Uuid::new_v4().simple());
    let encryption_key = "5a".repeat(32);
    let gemini_key = format!("gemini-key-{}", uuid::Uuid::new_v4().simple());
    // Gemini on a port where nothing listens: the replier fails, and logs it.
    let mut service = Service::<D>::start_fresh(&[
        ("JWT_SECRET_KEY", &jwt_secret),
        ("ENCRYPTION_KEY", &encryption_key),
        ("LLM_PROVIDER", "gemini"),
        ("GEMINI_API_KEY", &gemini_key),
        ("GEMINI_BASE_URL", NOWHERE),
        ("LLM_MAX_ATTEMPTS", "2"),
        ("LLM_BACKOFF_MS", "10"),
        ("LOG_FORMAT", "json"),
        ("LOG_DIR", logs.path().to_str().unwrap()),
        // Debug for our crates and the HTTP layer: more lines that could leak.
        (
            "RUST_LOG",
            "info,ai_secretary=debug,ai_secretary_projections=debug,tower_http=debug",
        ),
    ])
    .await;
    let base = format!("http://{}", service.address);
    let client = reqwest::Client::new();

    let email = format!("log-{}@example.com", uuid::Uuid::new_v4().simple());
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let content = format!("content-{}", uuid::Uuid::new_v4().simple());
    let correlation = format!("corr-{}", uuid::Uuid::new_v4().simple());
    let user: serde_json::Value = client
        .post(format!("{base}/api/v1/users"))
        .json(&json!({ "email": email, "password": password, "display_name": "Logged" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let user_id = user["id"].as_str().expect("a user id").to_owned();
    let token: serde_json::Value = client
        .post(format!("{base}/api/v1/auth/token"))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_owned();
    let assistant: serde_json::Value = client
        .post(format!("{base}/api/v1/assistants"))
        .bearer_auth(&token)
        .json(&json!({ "name": "Logger", "instructions": "Be brief." }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conversation: serde_json::Value = client
        .post(format!("{base}/api/v1/conversations"))
        .bearer_auth(&token)
        .json(&json!({ "assistant_id": assistant["id"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let posted = client
        .post(format!(
            "{base}/api/v1/conversations/{}/messages",
            conversation["id"].as_str().unwrap()
        ))
        .bearer_auth(&token)
        .header("x-request-id", &correlation)
        .json(&json!({ "content": content }))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), StatusCode::ACCEPTED);
    // The relay, projections and replier handle it (logging at debug too) until
    // the reply has failed against the unreachable Gemini.
    let messages = format!(
        "{base}/api/v1/conversations/{}/messages",
        conversation["id"].as_str().unwrap()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let listed: serde_json::Value = client
            .get(&messages)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if listed["data"][1]["status"] == "failed" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reply did not fail: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGTERM: a graceful stop flushes the file writer.
    let status = service.terminate().await;
    assert!(status.success(), "exit {status:?}");
    let stdout = service.stdout();
    let files: Vec<_> = std::fs::read_dir(logs.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one daily file: {files:?}");
    let name = files[0].file_name().unwrap().to_str().unwrap().to_owned();
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(name, format!("ai-secretary.{today}.log"));
    let file = std::fs::read_to_string(&files[0]).unwrap();

    for (origin, text) in [("stdout", &stdout), ("LOG_DIR file", &file)] {
        assert!(text.lines().count() > 5, "{origin}: too few lines:\n{text}");
        for line in text.lines() {
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
            assert!(parsed.is_ok(), "{origin}: not JSON: {line}");
        }
        // The request's last line (the response) is logged after the bearer
        // token was verified, so it names the caller too.
        let request_line = text
            .lines()
            .find(|l| l.contains(&correlation) && l.contains("finished processing request"))
            .unwrap_or_else(|| {
                panic!("{origin}: no response line with the correlation id:\n{text}")
            });
        assert!(
            request_line.contains(&format!(r#""user_id":"{user_id}""#)),
            "{origin}: the request's line lacks the user id: {request_line}"
        );
        assert!(
            text.lines()
                .any(|l| l.contains("reply failed") && l.contains("transport")),
            "{origin}: the replier's failure is not logged"
        );
        for (what, secret) in [
            ("the password", password.as_str()),
            ("the message content", content.as_str()),
            ("the email", email.as_str()),
            ("the access token", token.as_str()),
            ("JWT_SECRET_KEY", jwt_secret.as_str()),
            ("ENCRYPTION_KEY", encryption_key.as_str()),
            ("GEMINI_API_KEY", gemini_key.as_str()),
        ] {
            assert!(!text.contains(secret), "{origin} contains {what}");
        }
    }
}

/// With NATS unreachable the relay cannot publish: its lag, measured against
/// the store, counts every event and keeps ageing (what RelayLagging needs),
/// and so do the projections' behind it.
// Server-only: relay observability.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn lag_is_measured_against_the_store_so_a_stuck_relay_shows_it() {
    use ai_secretary::sampler::measure;

    let app = crate::helpers::spawn_app_with(&["--nats-url", "nats://127.0.0.1:1"]).await;
    let token = app.signed_up("stuck@example.com").await;
    app.assistant(&token, "Waiting").await;
    let events = app.event_count().await;
    assert!(events >= 2);
    let db = ai_secretary_projections::Db::Postgres(app.db.pool.clone());

    let (lag, first_age) = measure(&db, "relay").await.unwrap();
    assert_eq!(lag, events, "every event is unpublished");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (lag, age) = measure(&db, "relay").await.unwrap();
    assert_eq!(lag, events);
    assert!(
        age >= first_age + 1.0,
        "the lag does not age: {first_age} then {age}"
    );
    let (lag, _) = measure(&db, "assistants").await.unwrap();
    assert_eq!(lag, events, "the projection is behind too");

    // Once the checkpoint is at the head, there is no lag.
    sqlx::query(
        "INSERT INTO checkpoints (name, transaction_id, global_position)
         SELECT 'relay', transaction_id::text::int8, global_position FROM events
         ORDER BY events.transaction_id DESC, events.global_position DESC LIMIT 1
         ON CONFLICT (name) DO UPDATE
         SET transaction_id = excluded.transaction_id, global_position = excluded.global_position",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(measure(&db, "relay").await.unwrap(), (0, 0.0));
}

// The cache is Redis on the servers, the process's own memory embedded.
crate::on_both!(cache_and_llm_counters_move_with_the_traffic, spawns);
/// Counters move with what a user does, exactly, read from the binary's own
/// `/metrics` (the in-process apps share one recorder, so their counts mix):
/// an assistant read through the cache counts one miss (the read that fills
/// it) and then a hit per read; a reply whose model is unreachable counts each
/// failed attempt and one failed reply.
async fn cache_and_llm_counters_move_with_the_traffic<D: crate::helpers::Topology>() {
    use crate::{helpers::consumers, process::Service, progress::caught_up};

    let service = Service::<D>::start_fresh(&[
        ("LLM_PROVIDER", "gemini"),
        ("GEMINI_API_KEY", "a-key"),
        ("GEMINI_BASE_URL", NOWHERE),
        ("LLM_MAX_ATTEMPTS", "2"),
        ("LLM_BACKOFF_MS", "10"),
    ])
    .await;
    let counter = |text: &str, name: &str, label: (&str, &str)| {
        promql::sample(text, name, &[label]).unwrap_or_else(|| panic!("no {name}{label:?}"))
    };
    let token = service.signed_up("counted@example.com").await;
    let assistant = service
        .created("/assistants", &token, json!({ "name": "Counted" }))
        .await;
    // Reads without a token use the cache once `cache` is where `assistants` is.
    caught_up(&service.db.read_side().await, &consumers::<D>()).await;
    let before = service.metrics().await;
    let path = format!("/assistants/{}", assistant["id"].as_str().unwrap());
    for _ in 0..3 {
        service.read(&path, &token, None).await;
    }
    let after = service.metrics().await;
    for (result, moved) in [("miss", 1.0), ("hit", 2.0)] {
        let label = ("result", result);
        assert_eq!(
            counter(&after, "cache_requests_total", label)
                - counter(&before, "cache_requests_total", label),
            moved,
            "cache {result}s"
        );
    }

    let conversation = service.conversation(&token, &assistant).await;
    let messages = format!(
        "/api/v1/conversations/{}/messages",
        conversation["id"].as_str().unwrap()
    );
    let (status, _) = service
        .call(
            Method::POST,
            &messages,
            Some(&token),
            Some(json!({ "content": "Is anyone there?" })),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    eventually("the reply fails", async || {
        let (_, listed) = service
            .call(Method::GET, &messages, Some(&token), None)
            .await;
        match listed["data"][1]["status"].as_str() {
            Some("failed") => Ok(()),
            _ => Err(listed.to_string()),
        }
    })
    .await;
    let after = service.metrics().await;
    assert_eq!(
        counter(&after, "llm_failures_total", ("reason", "transport")),
        2.0,
        "one failure per attempt"
    );
    assert_eq!(
        counter(&after, "llm_failures_total", ("reason", "timeout")),
        0.0
    );
    assert_eq!(counter(&after, "replies_total", ("outcome", "failed")), 1.0);
    assert_eq!(
        counter(&after, "replies_total", ("outcome", "completed")),
        0.0
    );
}

/// `LOG_DIR`: one JSON file per day, named `ai-secretary.<UTC date>.log`, and
/// no more than 30 of them. The binary runs with libfaketime preloaded (Debian
/// package `faketime`; `.ci/run` installs it), its clock set a moment before a
/// midnight, so the day turns while it runs (preloaded into the binary itself
/// rather than through the `faketime` program, which forks: killing it would
/// leave the service running); the directory already holds 35
/// older days' files. At start the oldest are removed to make room for today's,
/// at midnight one more for tomorrow's, and every file left is one of the 30
/// newest days.
// Server-only: the binary on the servers under libfaketime (installed with them).
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn log_files_turn_over_at_midnight_and_30_are_kept() {
    use crate::{
        process::Service,
        support::{BusNames, TestDb},
    };

    let logs = tempfile::tempdir().unwrap();
    let day = |n: i64| {
        (chrono::NaiveDate::from_ymd_opt(2026, 4, 10).unwrap() + chrono::Days::new(n as u64))
            .format("%Y-%m-%d")
            .to_string()
    };
    // The appender removes the files created first: made oldest first, a few
    // milliseconds apart, so their creation times order them.
    for n in 0..35 {
        std::fs::write(
            logs.path().join(format!("ai-secretary.{}.log", day(n))),
            "{}\n",
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(15));
    }
    let libfaketime = std::fs::read_dir("/usr/lib")
        .unwrap()
        .map(|e| e.unwrap().path().join("faketime/libfaketime.so.1"))
        .find(|lib| lib.exists())
        .expect("libfaketime is installed (Debian package `faketime`; .ci/run installs it)");
    let service = Service::start_on(
        TestDb::new().await,
        BusNames::new(),
        &[
            ("LD_PRELOAD", libfaketime.to_str().unwrap()),
            // Starts at that time, then runs at the real pace.
            ("FAKETIME", "@2026-05-20 23:59:58"),
            ("TZ", "UTC"),
            // Timers keep the real clock; only the date the appender reads is faked.
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("LOG_FORMAT", "json"),
            ("LOG_DIR", logs.path().to_str().unwrap()),
            ("RUST_LOG", "info"),
        ],
    )
    .await;
    let files = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(logs.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    // Each request logs a line; after midnight (faked) the next goes to a new file.
    eventually("a line is logged in tomorrow's file", async || {
        let (status, _) = service.call(Method::GET, "/health", None, None).await;
        assert_eq!(status, StatusCode::OK);
        let tomorrow = logs.path().join("ai-secretary.2026-05-21.log");
        match std::fs::read_to_string(&tomorrow) {
            Ok(text) if text.contains("finished processing request") => Ok(()),
            _ => Err(format!("{:?}", files())),
        }
    })
    .await;

    let mut expected: Vec<String> = (7..35)
        .map(|n| format!("ai-secretary.{}.log", day(n)))
        .collect();
    expected.push("ai-secretary.2026-05-20.log".into());
    expected.push("ai-secretary.2026-05-21.log".into());
    assert_eq!(files(), expected, "30 files, the newest days");
    let today = std::fs::read_to_string(logs.path().join("ai-secretary.2026-05-20.log")).unwrap();
    assert!(
        today.contains("listening"),
        "the start is not in the first day's file"
    );
    for name in ["ai-secretary.2026-05-20.log", "ai-secretary.2026-05-21.log"] {
        let text = std::fs::read_to_string(logs.path().join(name)).unwrap();
        for line in text.lines() {
            assert!(
                serde_json::from_str::<serde_json::Value>(line).is_ok(),
                "{name}: not JSON: {line}"
            );
        }
    }
}
