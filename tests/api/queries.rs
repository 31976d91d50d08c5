//! The read side through the API: commands → relay → JetStream → projections →
//! queries, with read-your-writes on X-Consistency-Token.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    helpers::{EventLog, TestApp, consumers, problem},
    support::http::consistency,
};

// Without the replier (the reply must still be queued when it is read), and
// as an administrator, so that the projections' status can be read at the end.
crate::on_both!(
    a_command_is_visible_to_the_next_query_that_carries_its_token,
    without_replier ["--admin-emails", "reader@example.com"]
);
async fn a_command_is_visible_to_the_next_query_that_carries_its_token<D: EventLog>(
    app: TestApp<D>,
) {
    let token = app.signed_up("reader@example.com").await;
    let assistant = app.assistant(&token, "Mika").await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let id = conversation["id"].as_str().unwrap();
    let posted = app
        .post(
            &format!("/conversations/{id}/messages"),
            &token,
            json!({ "content": "Book a table for two at 7pm" }),
        )
        .await;
    let at = consistency(&posted).unwrap();
    let posted: Value = posted.json().await.unwrap();

    // The messages, in order, right after the post.
    let messages = app
        .get(&format!("/conversations/{id}/messages"), &token, Some(&at))
        .await;
    assert_eq!(messages.status(), StatusCode::OK);
    let messages: Value = messages.json().await.unwrap();
    assert_eq!(messages["object"], "list");
    let data = messages["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["id"], posted["message"]["id"]);
    assert_eq!(data[0]["role"], "user");
    assert_eq!(data[0]["content"], "Book a table for two at 7pm");
    assert_eq!(data[1]["id"], posted["reply"]["id"]);
    assert_eq!(data[1]["status"], "queued");
    assert_eq!(messages["has_more"], false);

    // The assistant with its activity, listed and alone (through the cache, twice).
    let list: Value = app
        .get("/assistants", &token, Some(&at))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"][0]["id"], assistant["id"]);
    assert_eq!(list["data"][0]["conversation_count"], 1);
    assert_eq!(list["data"][0]["message_count"], 2);
    let path = format!("/assistants/{}", assistant["id"].as_str().unwrap());
    let one = app.get(&path, &token, Some(&at)).await;
    assert_eq!(one.status(), StatusCode::OK);
    assert_eq!(one.headers()["etag"], "\"1\"");
    let one: Value = one.json().await.unwrap();
    assert_eq!(one, list["data"][0]);
    // On the servers, the cache is Redis, where the test can look (the
    // embedded service's is in its memory: the local cache's test below).
    if D::SERVERS {
        let id = assistant["id"].as_str().unwrap();
        redis_cache_serves_the_next_read(&app, &token, &path, &one, id).await;
    }

    // The conversation, filtered lists, and usage (no reply yet: zero).
    let conversation: Value = app
        .get(&format!("/conversations/{id}"), &token, Some(&at))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(conversation["message_count"], 2);
    assert_eq!(conversation["usage"]["total_tokens"], 0);
    let filtered: Value = app
        .get(
            &format!(
                "/conversations?assistant_id={}&status=active",
                assistant["id"].as_str().unwrap()
            ),
            &token,
            Some(&at),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(filtered["data"].as_array().unwrap().len(), 1);
    let archived: Value = app
        .get("/conversations?status=archived", &token, Some(&at))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(archived["data"].as_array().unwrap().len(), 0);
    let usage: Value = app
        .get("/stats/usage?group_by=model", &token, Some(&at))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(usage["object"], "usage");
    assert_eq!(usage["total"]["messages"], 0);

    // A change shows through the cache at once with its token.
    let renamed = app
        .send(
            Method::PATCH,
            &format!("/api/v1{path}"),
            Some(&token),
            Some(json!({ "name": "Mika II" })),
        )
        .await;
    let at = consistency(&renamed).unwrap();
    let after: Value = app
        .get(&path, &token, Some(&at))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(after["name"], "Mika II");
    assert_eq!(after["version"], 2);

    // Projections report no lag once caught up: every checkpoint at the head.
    app.caught_up().await;
    let status: Value = app
        .get("/admin/projections", &token, None)
        .await
        .json()
        .await
        .unwrap();
    let head = status["head"].as_str().expect("a head");
    let mut names = Vec::new();
    for consumer in status["data"].as_array().unwrap() {
        let name = consumer["name"].as_str().unwrap();
        assert_eq!(consumer["checkpoint"], head, "{name}: {status}");
        assert_eq!(consumer["lag_events"], 0, "{name}: {status}");
        assert_eq!(consumer["lag_seconds"], 0.0, "{name}: {status}");
        names.push(name);
    }
    names.sort_unstable();
    let mut expected = consumers::<D>();
    expected.sort_unstable();
    assert_eq!(names, expected);
    // The projections and, on the servers, the relay.
    assert!(names.contains(&"assistants") && names.contains(&"cache"));
    assert_eq!(names.contains(&"relay"), D::SERVERS);
}

/// The read filled the Redis cache with what it answered (`one`), and the next
/// read is answered from it.
async fn redis_cache_serves_the_next_read<D: EventLog>(
    app: &TestApp<D>,
    token: &str,
    path: &str,
    one: &Value,
    assistant: &str,
) {
    let key = format!("{}:assistant:{}", app.names.redis_prefix, assistant);
    let mut redis = redis::Client::open(app.names.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let filled: Option<String> = redis::cmd("HGET")
        .arg(&key)
        .arg("json")
        .query_async(&mut redis)
        .await
        .unwrap();
    let filled: Value = serde_json::from_str(&filled.expect("the read filled the cache")).unwrap();
    assert_eq!(&filled, one);
    // The next read is answered from it: a marked copy comes back. (A
    // read without a token uses the cache once `cache` is where `assistants` is.)
    app.caught_up().await;
    let mut marked = filled.clone();
    marked["name"] = json!("served from the cache");
    let () = redis::cmd("HSET")
        .arg(&key)
        .arg("json")
        .arg(marked.to_string())
        .query_async(&mut redis)
        .await
        .unwrap();
    let cached: Value = app.get(path, token, None).await.json().await.unwrap();
    assert_eq!(
        cached, marked,
        "the second read did not go through the cache"
    );
}

crate::on_both!(queries_are_scoped_to_their_owner);
async fn queries_are_scoped_to_their_owner<D: EventLog>(app: TestApp<D>) {
    let alice = app.signed_up("alice@example.com").await;
    let mallory = app.signed_up("mallory@example.com").await;
    let assistant = app.assistant(&alice, "Private").await;
    let response = app
        .post(
            "/conversations",
            &alice,
            json!({ "assistant_id": assistant["id"] }),
        )
        .await;
    let at = consistency(&response).unwrap();
    let conversation: Value = response.json().await.unwrap();
    let (a, c) = (
        assistant["id"].as_str().unwrap(),
        conversation["id"].as_str().unwrap(),
    );
    // Alice sees it (so the read side has it); Mallory gets 404s and empty lists.
    assert_eq!(
        app.get(&format!("/conversations/{c}"), &alice, Some(&at))
            .await
            .status(),
        StatusCode::OK
    );
    for path in [
        format!("/assistants/{a}"),
        format!("/conversations/{c}"),
        format!("/conversations/{c}/messages"),
    ] {
        problem(
            app.get(&path, &mallory, Some(&at)).await,
            StatusCode::NOT_FOUND,
        )
        .await;
    }
    for path in ["/assistants", "/conversations"] {
        let list: Value = app
            .get(path, &mallory, Some(&at))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(list["data"], json!([]), "{path}");
    }
}

crate::on_both!(pages_stay_stable_while_new_rows_arrive);
async fn pages_stay_stable_while_new_rows_arrive<D: EventLog>(app: TestApp<D>) {
    let token = app.signed_up("pager@example.com").await;
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(app.assistant(&token, &format!("A{i}")).await["id"].clone());
    }
    let last = app
        .post("/assistants", &token, json!({ "name": "A7" }))
        .await;
    let mut at = consistency(&last).unwrap();
    created.push(last.json::<Value>().await.unwrap()["id"].clone());

    // Newest first, three at a time, while more are created between pages.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        pages += 1;
        let path = match &after {
            Some(a) => format!("/assistants?limit=3&after={a}"),
            None => "/assistants?limit=3".to_owned(),
        };
        let page: Value = app
            .get(&path, &token, Some(&at))
            .await
            .json()
            .await
            .unwrap();
        seen.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["id"].clone()),
        );
        let newer = app
            .post("/assistants", &token, json!({ "name": "late" }))
            .await;
        at = consistency(&newer).unwrap();
        if page["has_more"] == false {
            break;
        }
        after = Some(page["last_id"].as_str().unwrap().to_owned());
    }
    created.reverse();
    assert_eq!(
        seen, created,
        "every original once, newest first, none of the late ones"
    );

    // And back: `before` a page's first id is the page before it, in the
    // list's order (the second page's first id gives the first page back)...
    let page = async |query: String| -> Value {
        app.get(&format!("/assistants?{query}"), &token, Some(&at))
            .await
            .json()
            .await
            .unwrap()
    };
    let ids = |page: &Value| -> Vec<Value> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].clone())
            .collect()
    };
    let back = page(format!("limit=3&before={}", created[3].as_str().unwrap())).await;
    assert_eq!(ids(&back), created[..3], "{back}");
    assert_eq!(
        back["has_more"], true,
        "the late ones are before it: {back}"
    );
    // ...and before the newest original are only the late ones, newest first.
    let late = page(format!("limit=100&before={}", created[0].as_str().unwrap())).await;
    let late_names: Vec<&Value> = late["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["name"])
        .collect();
    assert_eq!(late_names, vec![&json!("late"); pages], "{late}");
    assert_eq!(late["has_more"], false);

    // asc order reverses.
    let asc: Value = app
        .get("/assistants?order=asc&limit=2", &token, Some(&at))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(asc["data"][0]["id"], created[created.len() - 1]);
    let bad = app.get("/assistants?limit=0", &token, None).await;
    problem(bad, StatusCode::UNPROCESSABLE_ENTITY).await;
}

crate::on_both!(
    the_local_cache_serves_reads_and_is_invalidated_by_the_projection,
    without_replier ["--cache-backend", "local"]
);
/// The same read-your-writes through the in-process cache (the hidden
/// `--cache-backend local` switch): a read fills it, an update's invalidation
/// reaches it (a stale copy would be served once every consumer has caught
/// up), and nothing is written to Redis. (The embedded service's cache is
/// this one.)
async fn the_local_cache_serves_reads_and_is_invalidated_by_the_projection<D: EventLog>(
    app: TestApp<D>,
) {
    let token = app.signed_up("local@example.com").await;
    let assistant = app.assistant(&token, "Mika").await;
    let path = format!("/assistants/{}", assistant["id"].as_str().unwrap());

    // Filled by the first read, then served from it.
    app.caught_up().await;
    let first = app.get_ok(&path, &token, None).await;
    assert_eq!(first["name"], "Mika");
    assert_eq!(app.get_ok(&path, &token, None).await, first);

    let updated = app
        .client
        .patch(app.url(&format!("/api/v1{path}")))
        .bearer_auth(&token)
        .header("if-match", "\"1\"")
        .json(&json!({ "name": "Mika II" }))
        .send()
        .await
        .unwrap();
    assert_eq!(updated.status(), StatusCode::OK);
    let at = consistency(&updated).unwrap();
    let read = app.get_ok(&path, &token, Some(&at)).await;
    assert_eq!(read["name"], "Mika II", "read-your-writes");
    // With every consumer past the update, a read without a token goes to the
    // cache: it must hold the new copy or none.
    app.caught_up().await;
    for _ in 0..2 {
        let read = app.get_ok(&path, &token, None).await;
        assert_eq!(read["name"], "Mika II", "a stale copy was served");
    }

    if !D::SERVERS {
        return; // no Redis to look in
    }
    let mut redis = redis::Client::open(app.names.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", app.names.redis_prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(keys.is_empty(), "the local cache wrote to Redis: {keys:?}");
}
