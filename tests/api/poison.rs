//! Poison: what a projection cannot read goes to `dead_letters` with its
//! reason, is counted, and the projection goes on with the next event.

use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::{
    process::Service,
    progress::{caught_up, event_count},
    support::{progress::consumers, promql},
};

/// Two kinds of poison, then a good event: every projection parks both and
/// applies the good one.
/// - In the store (so the relay publishes it): an `AssistantCreated` whose
///   payload does not decode (`name` is a number), as a buggy or foreign writer
///   could have appended it. It is parked with its event id and position.
/// - On the bus only: a message on the events subject that is not an event
///   envelope at all. It is parked without an id; nothing in the store is missed.
///
/// The service is the binary, so `projection_dead_letters_total` is its own.
// Server-only: poison on the bus (NATS) as well as in the store.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn a_poison_event_is_parked_and_counted_and_the_projection_goes_on() {
    let service = Service::start().await;
    let token = service.signed_up("poisoned@example.com").await;
    let assistant = service
        .created("/assistants", &token, json!({ "name": "Before" }))
        .await;
    let pool = &service.db.pool;
    caught_up(pool, &consumers()).await;

    let names = &service.names;
    let jetstream = async_nats::jetstream::new(async_nats::connect(&names.nats_url).await.unwrap());
    jetstream
        .publish(
            format!("{}.assistant.{}", names.subject_prefix, Uuid::new_v4()),
            "this is not an event".into(),
        )
        .await
        .unwrap()
        .await
        .expect("JetStream stored the message");
    let poison = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO events (event_id, stream_id, stream_type, version, event_type, data, metadata)
         VALUES ($1, $2, 'assistant', 1, 'AssistantCreated', $3, '{}')",
    )
    .bind(poison)
    .bind(Uuid::now_v7())
    .bind(json!({ "owner_id": Uuid::now_v7(), "name": 5, "created_at": "2026-12-01T10:00:00Z" }))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("SELECT pg_notify('ai_secretary_events', '')")
        .execute(pool)
        .await
        .unwrap();

    // The next event after both: a rename, read back with its token.
    let id = assistant["id"].as_str().unwrap();
    let renamed = service
        .client
        .patch(service.url(&format!("/api/v1/assistants/{id}")))
        .bearer_auth(&token)
        .json(&json!({ "name": "After" }))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), StatusCode::OK);
    let at = crate::support::http::consistency(&renamed).unwrap();
    let read = service
        .read(&format!("/assistants/{id}"), &token, Some(&at))
        .await;
    assert_eq!(
        read["name"], "After",
        "the projection did not go on: {read}"
    );

    let checkpoints = caught_up(pool, &consumers()).await;
    let events = event_count(pool).await;
    let parked: Vec<(String, Option<Uuid>, String)> = sqlx::query_as(
        "SELECT projection, event_id, reason FROM dead_letters ORDER BY projection, id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let metrics = service.metrics().await;
    for name in ai_secretary::startup::projection_names() {
        let mine: Vec<_> = parked.iter().filter(|(p, ..)| *p == name).collect();
        assert_eq!(mine.len(), 2, "{name}: {parked:?}");
        assert!(
            mine.iter()
                .any(|(_, id, reason)| *id == Some(poison) && reason.contains("AssistantCreated")),
            "{name}: the store's poison is not parked with its id and reason: {mine:?}"
        );
        assert!(
            mine.iter()
                .any(|(_, id, reason)| id.is_none() && reason.contains("not an event envelope")),
            "{name}: the bus's poison is not parked: {mine:?}"
        );
        // Parked events count as passed: every event of the store, once.
        assert_eq!(checkpoints[&name].events, events, "{name}");
        let counted = promql::sample(
            &metrics,
            "projection_dead_letters_total",
            &[("projection", &name)],
        );
        assert_eq!(counted, Some(2.0), "{name}: dead letters counted");
    }
}
