//! Hostile input: control characters in every string field, absurd dates, and
//! the rate limits. Each gets a clear 4xx problem+json, and changes nothing.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{EventLog, TestApp, problem};

/// `(method, path, body with a NUL at the field, pointer)` for every string
/// field of every command, the anonymous ones included.
fn nul_bodies(assistant: &str, conversation: &str) -> Vec<(Method, String, Value, &'static str)> {
    let nul = "a\u{0}b";
    let post = Method::POST;
    vec![
        (
            post.clone(),
            "/users".into(),
            json!({"email": nul, "password": "correct horse battery", "display_name": "X"}),
            "/email",
        ),
        (
            post.clone(),
            "/users".into(),
            json!({"email": "x@example.com", "password": nul, "display_name": "X"}),
            "/password",
        ),
        (
            post.clone(),
            "/users".into(),
            json!({"email": "x@example.com", "password": "correct horse battery", "display_name": nul}),
            "/display_name",
        ),
        (
            post.clone(),
            "/auth/token".into(),
            json!({"email": nul, "password": "correct horse battery"}),
            "/email",
        ),
        (
            post.clone(),
            "/auth/token".into(),
            json!({"email": "x@example.com", "password": nul}),
            "/password",
        ),
        (
            post.clone(),
            "/assistants".into(),
            json!({"name": nul}),
            "/name",
        ),
        (
            post.clone(),
            "/assistants".into(),
            json!({"name": "A", "role": nul}),
            "/role",
        ),
        (
            post.clone(),
            "/assistants".into(),
            json!({"name": "A", "instructions": nul}),
            "/instructions",
        ),
        (
            post.clone(),
            "/assistants".into(),
            json!({"name": "A", "model": nul}),
            "/model",
        ),
        (
            post.clone(),
            "/assistants".into(),
            json!({"name": "A", "metadata": {"k": nul}}),
            "/metadata/k",
        ),
        (
            post.clone(),
            "/assistants".into(),
            json!({"name": "A", "metadata": {nul: "v"}}),
            "/metadata/a\u{0}b",
        ),
        (
            Method::PATCH,
            format!("/assistants/{assistant}"),
            json!({"name": nul}),
            "/name",
        ),
        (
            Method::PATCH,
            format!("/assistants/{assistant}"),
            json!({"instructions": "\u{7}bell"}),
            "/instructions",
        ),
        (
            post.clone(),
            "/conversations".into(),
            json!({"assistant_id": assistant, "title": nul}),
            "/title",
        ),
        (
            Method::PATCH,
            format!("/conversations/{conversation}"),
            json!({"title": nul}),
            "/title",
        ),
        (
            post.clone(),
            format!("/conversations/{conversation}/messages"),
            json!({"content": nul}),
            "/content",
        ),
        (
            post,
            format!("/conversations/{conversation}/messages"),
            json!({"content": "escape \u{1b}[2J"}),
            "/content",
        ),
    ]
}

crate::on_both!(a_control_character_in_any_string_field_is_422_and_changes_nothing, without_replier []);
async fn a_control_character_in_any_string_field_is_422_and_changes_nothing<
    D: crate::helpers::EventLog,
>(
    app: crate::helpers::TestApp<D>,
) {
    let token = app.signed_up("nul@example.com").await;
    let assistant = app.assistant(&token, "Clean").await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let (a, c) = (
        assistant["id"].as_str().unwrap(),
        conversation["id"].as_str().unwrap(),
    );
    let before = app.event_count().await;
    for (method, path, body, pointer) in nul_bodies(a, c) {
        let response = app
            .send(
                method.clone(),
                &format!("/api/v1{path}"),
                Some(&token),
                Some(body),
            )
            .await;
        let problem = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(
            problem["errors"][0]["pointer"], pointer,
            "{method} {path}: {problem}"
        );
    }
    assert_eq!(app.event_count().await, before, "a refused body appended");
    // Text fields keep tabs and line breaks.
    let response = app
        .post(
            &format!("/conversations/{c}/messages"),
            &token,
            json!({ "content": "line one\r\n\tline two" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

crate::on_both!(absurd_dates_in_the_usage_statistics_are_422, without_replier []);
async fn absurd_dates_in_the_usage_statistics_are_422<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    let token = app.signed_up("dates@example.com").await;
    for query in [
        "to=-262143-01-15",
        "from=-262143-01-15",
        "to=262142-12-31",
        "from=0001-01-01&to=0001-01-02",
        "to=1970-01-01",
        "from=9999-12-31&to=9999-12-31",
        "from=2026-13-01",
        "from=2026-01-01&to=2028-01-01",
        "from=2026-02-01&to=2026-01-01",
    ] {
        let response = app
            .send(
                Method::GET,
                &format!("/api/v1/stats/usage?{query}"),
                Some(&token),
                None,
            )
            .await;
        let status = response.status();
        if query == "to=1970-01-01" || query == "from=9999-12-31&to=9999-12-31" {
            // The edges of the range are answered.
            assert_eq!(status, StatusCode::OK, "{query}");
        } else {
            problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        }
    }
}

/// `POST` as JSON, returning the response.
async fn post_json<D>(
    app: &TestApp<D>,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> reqwest::Response {
    app.send(Method::POST, &format!("/api/v1{path}"), token, Some(body))
        .await
}

/// A 429 problem with a Retry-After of whole seconds in `(low, high]`.
async fn too_many(response: reqwest::Response, low: u64, high: u64) {
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry > low && retry <= high, "Retry-After {retry}");
    problem(response, StatusCode::TOO_MANY_REQUESTS).await;
}

async fn rate_limited<D>(app: &TestApp<D>, limit: &str) -> u64 {
    let metrics = app
        .send(Method::GET, "/metrics", None, None)
        .await
        .text()
        .await
        .unwrap();
    let series = format!("rate_limited_total{{limit=\"{limit}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

crate::on_both!(commands_over_the_per_user_limit_are_429_and_change_nothing, without_replier ["--rate-limit-commands-per-minute", "3"]);
async fn commands_over_the_per_user_limit_are_429_and_change_nothing<
    D: crate::helpers::EventLog,
>(
    app: crate::helpers::TestApp<D>,
) {
    let token = app.signed_up("busy@example.com").await;
    let other = app.signed_up("calm@example.com").await;
    for i in 0..3 {
        let response = post_json(
            &app,
            "/assistants",
            Some(&token),
            json!({"name": format!("A{i}")}),
        )
        .await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let before = app.event_count().await;
    let counted = rate_limited(&app, "commands").await;
    let refused = post_json(&app, "/assistants", Some(&token), json!({"name": "A3"})).await;
    // One token every 20 s at 3 a minute.
    too_many(refused, 15, 20).await;
    assert_eq!(
        app.event_count().await,
        before,
        "a refused command appended"
    );
    assert!(rate_limited(&app, "commands").await > counted);
    // Reads are not commands, and other users have buckets of their own.
    let list = app
        .send(Method::GET, "/api/v1/assistants", Some(&token), None)
        .await;
    assert_eq!(list.status(), StatusCode::OK);
    let response = post_json(&app, "/assistants", Some(&other), json!({"name": "B"})).await;
    assert_eq!(response.status(), StatusCode::CREATED);
}

crate::on_both!(
    sign_ups_and_logins_over_the_per_address_limits_are_429_before_any_work,
    with [
        "--rate-limit-signups-per-hour",
        "10",
        "--rate-limit-logins-per-minute",
        "2",
        "--trusted-proxies",
        "127.0.0.1/32",
    ]
);
async fn sign_ups_and_logins_over_the_per_address_limits_are_429_before_any_work<D: EventLog>(
    app: TestApp<D>,
) {
    let user = |email: &str| json!({"email": email, "password": "correct horse battery", "display_name": "X"});
    // A burst of a tenth of the hour's 10: one sign-up, then one every 6 minutes.
    let first = post_json(&app, "/users", None, user("first@example.com")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let before = app.event_count().await;
    let second = post_json(&app, "/users", None, user("second@example.com")).await;
    too_many(second, 300, 360).await;
    assert_eq!(app.event_count().await, before);
    // Through the trusted proxy, another client has a bucket of its own; a
    // client that is not a proxy cannot claim to be someone else (the peer here
    // is the trusted proxy, so that is shown by the unit test in limits.rs).
    let other = app
        .client
        .post(app.url("/api/v1/users"))
        .header("x-real-ip", "203.0.113.9")
        .json(&user("proxied@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::CREATED);

    // Logins: two a minute from one address, right or wrong, then 429 even
    // for the right password (nothing is checked or hashed).
    let login = |password: &str| json!({"email": "first@example.com", "password": password});
    assert_eq!(
        post_json(&app, "/auth/token", None, login("wrong password!"))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post_json(&app, "/auth/token", None, login("correct horse battery"))
            .await
            .status(),
        StatusCode::OK
    );
    let third = post_json(&app, "/auth/token", None, login("correct horse battery")).await;
    too_many(third, 20, 30).await;
    assert!(rate_limited(&app, "logins").await >= 1);
    assert!(rate_limited(&app, "sign-ups").await >= 1);
}

crate::on_both!(tokens_and_personal_data_are_never_stored_by_caches, without_replier []);
async fn tokens_and_personal_data_are_never_stored_by_caches<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    let signed_up = post_json(
        &app,
        "/users",
        None,
        json!({"email": "private@example.com", "password": "correct horse battery", "display_name": "P"}),
    )
    .await;
    assert_eq!(signed_up.headers()["cache-control"], "no-store");
    let token = post_json(
        &app,
        "/auth/token",
        None,
        json!({"email": "private@example.com", "password": "correct horse battery"}),
    )
    .await;
    assert_eq!(token.headers()["cache-control"], "no-store");
    let token: Value = token.json().await.unwrap();
    let token = token["access_token"].as_str().unwrap();
    for path in ["/users/me", "/assistants", "/conversations", "/stats/usage"] {
        let response = app
            .send(Method::GET, &format!("/api/v1{path}"), Some(token), None)
            .await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(response.headers()["cache-control"], "no-store", "{path}");
    }
    let refused = app.send(Method::GET, "/api/v1/users/me", None, None).await;
    assert_eq!(refused.headers()["cache-control"], "no-store");
}

crate::on_both!(guessable_passwords_are_refused_before_anything_is_hashed_or_appended, without_replier []);
async fn guessable_passwords_are_refused_before_anything_is_hashed_or_appended<
    D: crate::helpers::EventLog,
>(
    app: crate::helpers::TestApp<D>,
) {
    let before = app.event_count().await;
    for password in ["password", "12345678", "qwertyuiop", "ada@example.com"] {
        let response = post_json(
            &app,
            "/users",
            None,
            json!({"email": "ada@example.com", "password": password, "display_name": "Ada"}),
        )
        .await;
        let problem = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(problem["errors"][0]["pointer"], "/password", "{password}");
    }
    // One line only in names and titles.
    let response = post_json(
        &app,
        "/users",
        None,
        json!({"email": "ada@example.com", "password": "correct horse battery", "display_name": "Ada\nLovelace"}),
    )
    .await;
    let problem = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(problem["errors"][0]["pointer"], "/display_name");
    assert_eq!(app.event_count().await, before);
}

crate::on_both!(
    an_account_is_locked_out_after_repeated_failures_for_longer_each_round,
    without_replier ["--login-max-failures", "3", "--login-lockout-seconds", "2"]
);
async fn an_account_is_locked_out_after_repeated_failures_for_longer_each_round<D>(
    app: TestApp<D>,
) {
    app.signed_up("locked@example.com").await;
    let login = async |email: &str, password: &str| {
        post_json(
            &app,
            "/auth/token",
            None,
            json!({"email": email, "password": password}),
        )
        .await
    };
    let fail_three_times = async |email: &str| {
        for _ in 0..3 {
            let wrong = login(email, "wrong one!").await;
            assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
        }
    };
    let right = "correct horse battery";
    fail_three_times("locked@example.com").await;
    // Locked: even the right password is refused, with how long to wait.
    too_many(login("locked@example.com", right).await, 0, 2).await;
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    // The second round locks for twice as long.
    fail_three_times("locked@example.com").await;
    too_many(login("locked@example.com", right).await, 2, 4).await;
    tokio::time::sleep(std::time::Duration::from_millis(4_100)).await;
    assert_eq!(
        login("locked@example.com", right).await.status(),
        StatusCode::OK
    );
    // An email nobody has is locked out the same way: nothing tells them apart.
    fail_three_times("nobody@example.com").await;
    too_many(login("nobody@example.com", "wrong one!").await, 0, 2).await;
    assert!(rate_limited(&app, "login lockout").await >= 3);
}

crate::on_both!(a_token_of_an_account_that_does_not_exist_commands_nothing, without_replier []);
async fn a_token_of_an_account_that_does_not_exist_commands_nothing<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    // A well-signed token (the development key) for an account never registered.
    let tokens = ai_secretary::auth::Tokens::new(
        ai_secretary::config::DEV_JWT_SECRET,
        std::time::Duration::from_secs(60),
    );
    let token = tokens
        .issue(uuid::Uuid::now_v7(), chrono::Utc::now())
        .unwrap();
    let before = app.event_count().await;
    let refused = post_json(&app, "/assistants", Some(&token), json!({"name": "Ghost"})).await;
    problem(refused, StatusCode::UNAUTHORIZED).await;
    assert_eq!(app.event_count().await, before);
}
