use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::problem;

crate::on_both!(create_update_archive_restore_delete);
async fn create_update_archive_restore_delete<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    let token = app.signed_up("owner@example.com").await;

    let response = app
        .post(
            "/assistants",
            &token,
            json!({ "name": "Mika", "role": "scheduler", "instructions": "Be brief.",
                    "temperature": 0.3, "metadata": { "team": "ops" } }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["etag"], "\"1\"");
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["object"], "assistant");
    assert_eq!(created["status"], "active");
    assert_eq!(created["model"], "gemini-2.5-flash");
    assert_eq!(created["metadata"]["team"], "ops");

    // PATCH with the right If-Match moves to version 2.
    let path = format!("/api/v1/assistants/{id}");
    let response = app
        .client
        .patch(app.url(&path))
        .bearer_auth(&token)
        .header("if-match", "\"1\"")
        .json(&json!({ "name": "Mika II", "temperature": 1.1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["etag"], "\"2\"");
    let updated: Value = response.json().await.unwrap();
    assert_eq!(updated["name"], "Mika II");
    assert_eq!(updated["role"], "scheduler");

    // A stale If-Match is refused and changes nothing.
    let stale = app
        .client
        .patch(app.url(&path))
        .bearer_auth(&token)
        .header("if-match", "\"1\"")
        .json(&json!({ "name": "Lost update" }))
        .send()
        .await
        .unwrap();
    let body = problem(stale, StatusCode::PRECONDITION_FAILED).await;
    assert_eq!(body["current_version"], 2);

    for (action, status) in [("archive", "archived"), ("restore", "active")] {
        let response = app
            .post(&format!("/assistants/{id}/{action}"), &token, json!({}))
            .await;
        assert_eq!(response.status(), StatusCode::OK, "{action}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], status);
    }

    let deleted = app.send(Method::DELETE, &path, Some(&token), None).await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert!(deleted.headers().contains_key("x-consistency-token"));
    let after = app
        .send(
            Method::PATCH,
            &path,
            Some(&token),
            Some(json!({ "name": "Ghost" })),
        )
        .await;
    problem(after, StatusCode::NOT_FOUND).await;

    let types: Vec<String> = app.events().await.into_iter().map(|e| e.2).collect();
    assert_eq!(
        types,
        [
            "UserRegistered",
            "AssistantCreated",
            "AssistantUpdated",
            "AssistantArchived",
            "AssistantRestored",
            "AssistantDeleted"
        ]
    );
}

crate::on_both!(another_users_assistant_is_404);
async fn another_users_assistant_is_404<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    let alice = app.signed_up("alice@example.com").await;
    let mallory = app.signed_up("mallory@example.com").await;
    let assistant = app.assistant(&alice, "Private").await;
    let id = assistant["id"].as_str().unwrap();
    let path = format!("/api/v1/assistants/{id}");
    let before = app.event_count().await;

    let patch = app
        .send(
            Method::PATCH,
            &path,
            Some(&mallory),
            Some(json!({ "name": "Mine" })),
        )
        .await;
    problem(patch, StatusCode::NOT_FOUND).await;
    let archive = app
        .post(&format!("/assistants/{id}/archive"), &mallory, json!({}))
        .await;
    problem(archive, StatusCode::NOT_FOUND).await;
    let delete = app.send(Method::DELETE, &path, Some(&mallory), None).await;
    problem(delete, StatusCode::NOT_FOUND).await;
    let start = app
        .post("/conversations", &mallory, json!({ "assistant_id": id }))
        .await;
    problem(start, StatusCode::NOT_FOUND).await;
    assert_eq!(app.event_count().await, before);
}

crate::on_both!(concurrent_patches_without_if_match_all_land);
async fn concurrent_patches_without_if_match_all_land<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    let token = app.signed_up("busy@example.com").await;
    let id = app.assistant(&token, "Busy").await["id"].clone();
    let path = format!("/api/v1/assistants/{}", id.as_str().unwrap());
    let patches = (0..8).map(|i| {
        app.send(
            Method::PATCH,
            &path,
            Some(&token),
            Some(json!({ "metadata": { "n": i.to_string() } })),
        )
    });
    for response in futures::future::join_all(patches).await {
        assert_eq!(response.status(), StatusCode::OK);
    }
    // Each patch was re-decided after losing a race rather than failing.
    let versions: Vec<i64> = app
        .events()
        .await
        .into_iter()
        .filter(|e| e.0 == "assistant")
        .map(|e| e.1)
        .collect();
    assert_eq!(versions, (1..=9).collect::<Vec<i64>>());
}
