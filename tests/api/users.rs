use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{EventLog, TestApp, problem};

crate::on_both!(register_log_in_and_read_the_profile);
async fn register_log_in_and_read_the_profile<D: EventLog>(app: TestApp<D>) {
    let response = app
        .send(
            Method::POST,
            "/api/v1/users",
            None,
            Some(json!({ "email": " Ada@Example.com ", "password": "correct horse", "display_name": "Ada" })),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["etag"], "\"1\"");
    assert!(response.headers().contains_key("x-consistency-token"));
    let user: Value = response.json().await.unwrap();
    assert_eq!(user["object"], "user");
    assert_eq!(user["email"], "ada@example.com");
    assert!(user.get("password_hash").is_none());

    let token: Value = app
        .send(
            Method::POST,
            "/api/v1/auth/token",
            None,
            Some(json!({ "email": "ADA@example.com", "password": "correct horse" })),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["expires_in"], 3600);
    let access = token["access_token"].as_str().unwrap();

    let me: Value = app
        .send(Method::GET, "/api/v1/users/me", Some(access), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["id"], user["id"]);
    assert_eq!(me["display_name"], "Ada");

    // The password is stored as an argon2id hash, never as given, and the hash
    // (with the email and name) sealed under the user's key (tests/api/forget.rs).
    let db = app.read_side().await;
    let (event_id, data): (uuid::Uuid, String) = crate::on_db!(db, |pool| sqlx::query_as(
        "SELECT event_id, CAST(data AS TEXT) FROM events WHERE event_type = 'UserRegistered'"
    )
    .fetch_one(pool)
    .await
    .unwrap());
    let data: Value = serde_json::from_str(&data).unwrap();
    for field in ["password_hash", "email", "display_name"] {
        assert_eq!(data[field]["enc"], "v1", "{field}: {data}");
    }
    let text = data.to_string();
    assert!(
        !text.contains("correct horse") && !text.contains("argon2"),
        "{text}"
    );
    let key = crate::helpers::keyring(&db);
    let mut opened = data.clone();
    key.open(event_id, &mut opened).await.unwrap();
    assert!(
        opened["password_hash"]
            .as_str()
            .unwrap()
            .starts_with("$argon2id$")
    );
}

crate::on_both!(one_account_per_email);
async fn one_account_per_email<D: crate::helpers::EventLog>(app: crate::helpers::TestApp<D>) {
    app.signed_up("dup@example.com").await;
    let response = app
        .send(
            Method::POST,
            "/api/v1/users",
            None,
            Some(json!({ "email": "DUP@example.com", "password": "another password", "display_name": "Dup" })),
        )
        .await;
    problem(response, StatusCode::CONFLICT).await;
    assert_eq!(app.event_count().await, 1);
}

crate::on_both!(wrong_credentials_and_tokens_are_401);
async fn wrong_credentials_and_tokens_are_401<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    app.signed_up("eve@example.com").await;
    for (email, password) in [
        ("eve@example.com", "wrong password"),
        ("nobody@example.com", "correct horse battery"),
    ] {
        let response = app
            .send(
                Method::POST,
                "/api/v1/auth/token",
                None,
                Some(json!({ "email": email, "password": password })),
            )
            .await;
        let body = problem(response, StatusCode::UNAUTHORIZED).await;
        assert_eq!(body["detail"], "the email or password is wrong");
    }
    let no_token = app.send(Method::GET, "/api/v1/users/me", None, None).await;
    assert_eq!(no_token.headers()["www-authenticate"], "Bearer");
    problem(no_token, StatusCode::UNAUTHORIZED).await;
    let forged = app
        .send(Method::GET, "/api/v1/users/me", Some("not.a.jwt"), None)
        .await;
    problem(forged, StatusCode::UNAUTHORIZED).await;
}

crate::on_both!(registration_is_validated);
async fn registration_is_validated<D: crate::helpers::EventLog>(app: crate::helpers::TestApp<D>) {
    let response = app
        .send(
            Method::POST,
            "/api/v1/users",
            None,
            Some(json!({ "email": "nope", "password": "short", "display_name": "" })),
        )
        .await;
    let body = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    let pointers: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    assert_eq!(pointers, ["/email", "/display_name", "/password"]);
    assert_eq!(app.event_count().await, 0);
}
