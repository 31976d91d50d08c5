//! Bad input gets a clear 4xx problem and changes nothing.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::problem;

crate::on_both!(malformed_json_is_400);
async fn malformed_json_is_400<D: crate::helpers::EventLog>(app: crate::helpers::TestApp<D>) {
    let token = app.signed_up("x@example.com").await;
    let response = app
        .client
        .post(app.url("/api/v1/assistants"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::BAD_REQUEST).await;
    assert_eq!(app.event_count().await, 1);
}

crate::on_both!(wrong_content_type_is_415);
async fn wrong_content_type_is_415<D: crate::helpers::EventLog>(app: crate::helpers::TestApp<D>) {
    let token = app.signed_up("x@example.com").await;
    let response = app
        .client
        .post(app.url("/api/v1/assistants"))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body("{\"name\": \"Mika\"}")
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    assert_eq!(app.event_count().await, 1);
}

crate::on_both!(a_body_over_one_mebibyte_is_413);
async fn a_body_over_one_mebibyte_is_413<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    let token = app.signed_up("x@example.com").await;
    let huge = "x".repeat(1024 * 1024 + 1);
    let response = app
        .post(
            "/assistants",
            &token,
            json!({ "name": "Big", "instructions": huge }),
        )
        .await;
    problem(response, StatusCode::PAYLOAD_TOO_LARGE).await;
    // Also when the body is keyed (it is buffered for the fingerprint first).
    let response = app
        .client
        .post(app.url("/api/v1/assistants"))
        .bearer_auth(&token)
        .header("idempotency-key", "big-1")
        .json(&json!({ "name": "Big", "instructions": "x".repeat(1024 * 1024 + 1) }))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(app.event_count().await, 1);
}

crate::on_both!(invalid_fields_are_422_with_pointers);
async fn invalid_fields_are_422_with_pointers<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    let token = app.signed_up("x@example.com").await;
    let cases = [
        (json!({ "name": "" }), "/name"),
        (json!({ "name": "x".repeat(101) }), "/name"),
        (
            json!({ "name": "Mika", "temperature": 2.5 }),
            "/temperature",
        ),
        (
            json!({ "name": "Mika", "temperature": "hot" }),
            "/temperature",
        ),
        (
            json!({ "name": "Mika", "instructions": "i".repeat(20_001) }),
            "/instructions",
        ),
        (json!({ "name": "Mika", "shoe_size": 9 }), "/shoe_size"),
        (
            json!({ "name": "Mika", "metadata": (0..17).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>() }),
            "/metadata",
        ),
    ];
    for (body, pointer) in cases {
        let response = app.post("/assistants", &token, body.clone()).await;
        let problem = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(problem["errors"][0]["pointer"], pointer, "{body}");
        assert!(problem["errors"][0]["detail"].is_string());
    }
    let assistant = app.assistant(&token, "Mika").await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let messages = format!(
        "/conversations/{}/messages",
        conversation["id"].as_str().unwrap()
    );
    for content in [String::new(), "  ".into(), "x".repeat(32_001)] {
        let response = app
            .post(&messages, &token, json!({ "content": content }))
            .await;
        let body = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(body["errors"][0]["pointer"], "/content");
    }
    // user, assistant, conversation: nothing from the refused requests.
    assert_eq!(app.event_count().await, 3);
}

crate::on_both!(unknown_routes_ids_and_methods);
async fn unknown_routes_ids_and_methods<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    let token = app.signed_up("x@example.com").await;
    problem(
        app.send(Method::GET, "/api/v1/nothing-here", Some(&token), None)
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        app.send(
            Method::PATCH,
            "/api/v1/assistants/not-a-uuid",
            Some(&token),
            Some(json!({ "name": "x" })),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        app.send(Method::PUT, "/api/v1/assistants", Some(&token), None)
            .await,
        StatusCode::METHOD_NOT_ALLOWED,
    )
    .await;
    let unreadable_if_match = app
        .client
        .patch(app.url(&format!("/api/v1/assistants/{}", uuid::Uuid::now_v7())))
        .bearer_auth(&token)
        .header("if-match", "banana")
        .json(&json!({ "name": "x" }))
        .send()
        .await
        .unwrap();
    problem(unreadable_if_match, StatusCode::BAD_REQUEST).await;
}
