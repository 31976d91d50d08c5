use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{EventLog, TestApp, problem};

crate::on_both!(start_rename_post_and_archive, without_replier []);
async fn start_rename_post_and_archive<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    // Without the replier: its events would interleave with the ones checked here.
    let token = app.signed_up("talker@example.com").await;
    let assistant = app.assistant(&token, "Mika").await;

    let response = app
        .post(
            "/conversations",
            &token,
            json!({ "assistant_id": assistant["id"], "title": "Trip to Osaka" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let conversation: Value = response.json().await.unwrap();
    let id = conversation["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/api/v1/conversations/{id}"));
    assert_eq!(conversation["title"], "Trip to Osaka");
    assert_eq!(conversation["assistant_id"], assistant["id"]);
    assert_eq!(conversation["message_count"], 0);

    let renamed: Value = app
        .send(
            Method::PATCH,
            &location,
            Some(&token),
            Some(json!({ "title": "Osaka, May" })),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(renamed["title"], "Osaka, May");

    let response = app
        .post(
            &format!("/conversations/{id}/messages"),
            &token,
            json!({ "content": "Book a hotel near Umeda for May 3" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert!(response.headers().contains_key("x-consistency-token"));
    let posted: Value = response.json().await.unwrap();
    assert_eq!(posted["message"]["role"], "user");
    assert_eq!(posted["message"]["status"], "completed");
    assert_eq!(posted["reply"]["status"], "queued");
    assert_eq!(posted["reply"]["reply_to"], posted["message"]["id"]);

    let archived = app
        .post(&format!("/conversations/{id}/archive"), &token, json!({}))
        .await;
    assert_eq!(archived.status(), StatusCode::OK);
    let refused = app
        .post(
            &format!("/conversations/{id}/messages"),
            &token,
            json!({ "content": "one more thing" }),
        )
        .await;
    problem(refused, StatusCode::CONFLICT).await;

    let conversation_events: Vec<(i64, String)> = app
        .events()
        .await
        .into_iter()
        .filter(|e| e.0 == "conversation")
        .map(|e| (e.1, e.2))
        .collect();
    let expected = [
        "ConversationStarted",
        "ConversationRenamed",
        "MessagePosted",
        "ReplyRequested",
        "ConversationArchived",
    ];
    assert_eq!(
        conversation_events,
        expected
            .iter()
            .enumerate()
            .map(|(i, t)| (i as i64 + 1, t.to_string()))
            .collect::<Vec<_>>()
    );
}

crate::on_both!(no_conversation_with_an_archived_or_unknown_assistant);
async fn no_conversation_with_an_archived_or_unknown_assistant<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    let token = app.signed_up("picky@example.com").await;
    let assistant = app.assistant(&token, "Resting").await;
    let id = assistant["id"].as_str().unwrap();
    app.post(&format!("/assistants/{id}/archive"), &token, json!({}))
        .await;
    let archived = app
        .post("/conversations", &token, json!({ "assistant_id": id }))
        .await;
    problem(archived, StatusCode::CONFLICT).await;
    let unknown = app
        .post(
            "/conversations",
            &token,
            json!({ "assistant_id": uuid::Uuid::now_v7() }),
        )
        .await;
    problem(unknown, StatusCode::NOT_FOUND).await;
    let missing = app.post("/conversations", &token, json!({})).await;
    let body = problem(missing, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(body["errors"][0]["pointer"], "/assistant_id");
}

crate::on_both!(another_users_conversation_is_404);
async fn another_users_conversation_is_404<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    let alice = app.signed_up("alice@example.com").await;
    let mallory = app.signed_up("mallory@example.com").await;
    let assistant = app.assistant(&alice, "Mika").await;
    let conversation = app.conversation(&alice, &assistant["id"]).await;
    let id = conversation["id"].as_str().unwrap();
    let before = app.event_count().await;
    let post = app
        .post(
            &format!("/conversations/{id}/messages"),
            &mallory,
            json!({ "content": "hi" }),
        )
        .await;
    problem(post, StatusCode::NOT_FOUND).await;
    let rename = app
        .send(
            Method::PATCH,
            &format!("/api/v1/conversations/{id}"),
            Some(&mallory),
            Some(json!({ "title": "mine" })),
        )
        .await;
    problem(rename, StatusCode::NOT_FOUND).await;
    assert_eq!(app.event_count().await, before);
}

crate::on_both!(the_correlation_id_reaches_the_events);
async fn the_correlation_id_reaches_the_events<D: EventLog>(app: TestApp<D>) {
    let token = app.signed_up("traced@example.com").await;
    let assistant = app.assistant(&token, "Mika").await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let response = app
        .client
        .post(app.url(&format!(
            "/api/v1/conversations/{}/messages",
            conversation["id"].as_str().unwrap()
        )))
        .bearer_auth(&token)
        .header("x-request-id", "trace-me-42")
        .json(&json!({ "content": "hello" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    let metadata: Vec<String> = crate::on_db!(app.read_side().await, |pool| sqlx::query_scalar(
        "SELECT CAST(metadata AS TEXT) FROM events
         WHERE event_type IN ('MessagePosted', 'ReplyRequested')",
    )
    .fetch_all(pool)
    .await
    .unwrap());
    assert_eq!(metadata.len(), 2);
    for m in metadata {
        let m: Value = serde_json::from_str(&m).unwrap();
        assert_eq!(m["correlation_id"], "trace-me-42");
        assert!(m["user_id"].is_string());
    }
}
