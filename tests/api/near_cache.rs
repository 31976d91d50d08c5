//! The Redis cache's copy in each process's memory (`cache::near`), against a
//! `redis-server` of the test's own: frozen to show what is answered without
//! it, and with its clients cut to show that a lost connection loses every
//! copy. The rules under load, on the shared server, are in the projections
//! crate's `tests/cache.rs`.

use std::time::Duration;

use ai_secretary_contract::Position;
use ai_secretary_projections::cache::{Cache, CachedJson, Invalidations, Kind};
use serde_json::json;
use uuid::Uuid;

use crate::{helpers::eventually, servers::PrivateServer};

const HOUR: Duration = Duration::from_secs(3600);

fn at(gp: i64) -> Position {
    Position {
        transaction_id: gp,
        global_position: gp,
    }
}

fn value(gp: i64) -> CachedJson {
    CachedJson::of(&json!({ "at": gp }))
}

/// What the `cache` projection and a query's fill do for `ids` at `gp`: stamp
/// each key, then fill it with the value read at `gp`.
async fn change(writer: &Cache, ids: &[Uuid], owner: Uuid, gp: i64) {
    let mut batch = Invalidations::default();
    for &id in ids {
        batch.stamp(Kind::Assistant, id, at(gp));
    }
    writer.invalidate(&batch).await.unwrap();
    for &id in ids {
        writer
            .fill(Kind::Assistant, id, owner, at(gp), &value(gp))
            .await;
    }
}

/// A query's read that needs the cache current through `gp`, with the
/// `cache` projection's checkpoint seen there.
async fn read(cache: &Cache, id: Uuid, owner: Uuid, gp: i64) -> Option<CachedJson> {
    cache
        .get_current(Kind::Assistant, id, owner, at(gp), at(gp))
        .await
}

/// A Redis of the test's own; the query side's cache on it and another
/// process's (the projection, other API instances); two keys of one owner,
/// both changed at position 1.
struct Setup {
    server: PrivateServer,
    url: String,
    cache: Cache,
    writer: Cache,
    owner: Uuid,
    a: Uuid,
    b: Uuid,
}

impl Setup {
    async fn new() -> Setup {
        let server = PrivateServer::redis().await;
        let url = server.url();
        let cache = Cache::new(&url, "near", HOUR, Duration::from_millis(300));
        let writer = Cache::new(&url, "near", HOUR, Duration::from_secs(2));
        let (owner, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        change(&writer, &[a, b], owner, 1).await;
        Setup {
            server,
            url,
            cache,
            writer,
            owner,
            a,
            b,
        }
    }
}

// Server-only: freezes a Redis server.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_is_answered_from_memory_until_redis_says_it_changed() {
    let Setup {
        server,
        url,
        cache,
        writer,
        owner,
        a,
        b,
    } = Setup::new().await;
    assert_eq!(read(&cache, a, owner, 1).await, Some(value(1)));

    server.freeze();
    // Redis answers nothing, yet what was read is answered, to its owner only.
    assert_eq!(read(&cache, a, owner, 1).await, Some(value(1)));
    assert_eq!(read(&cache, a, Uuid::new_v4(), 1).await, None);
    // What was never read, or is needed through a position the copy is not
    // known to be current through, is Redis's to answer: nothing, frozen.
    assert_eq!(read(&cache, b, owner, 1).await, None);
    assert_eq!(read(&cache, a, owner, 2).await, None);
    server.thaw();

    // Another process changes it: the copy goes, and no read needing the
    // change sees the old one.
    change(&writer, &[a], owner, 2).await;
    eventually("the changed value is read", async || {
        match read(&cache, a, owner, 2).await {
            Some(seen) if seen == value(2) => Ok(()),
            Some(seen) if seen == value(1) => panic!("the old copy was answered"),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    server.freeze();
    assert_eq!(read(&cache, a, owner, 2).await, Some(value(2)));
    server.thaw();

    // A flush drops every copy.
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();
    eventually("the flushed value is gone", async || {
        match read(&cache, a, owner, 2).await {
            None => Ok(()),
            Some(seen) => Err(format!("{seen:?}")),
        }
    })
    .await;
}

// Server-only: cuts a Redis server's clients.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_tracking_connection_loses_every_copy() {
    let Setup {
        server: _server,
        url,
        cache,
        writer,
        owner,
        a,
        b,
    } = Setup::new().await;
    assert_eq!(read(&cache, a, owner, 1).await, Some(value(1)));
    assert_eq!(read(&cache, b, owner, 1).await, Some(value(1)));

    // Cut the query side's tracking connection (the one client with tracking
    // on), then change both keys: their pushes have nowhere to go.
    let mut admin = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .unwrap();
    let tracking: Vec<&str> = clients
        .lines()
        .filter(|line| {
            line.split(' ').any(|field| {
                field
                    .strip_prefix("flags=")
                    .is_some_and(|f| f.contains('t'))
            })
        })
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .collect();
    assert_eq!(tracking.len(), 1, "{clients}");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(tracking[0])
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    change(&writer, &[a, b], owner, 2).await;

    // The next reads connect again and see the change; the copy of `b`, whose
    // push was lost, is not answered even once the new connection is synced.
    eventually("a is read again", async || {
        match read(&cache, a, owner, 2).await {
            Some(seen) if seen == value(2) => Ok(()),
            Some(seen) => panic!("the old copy of a was answered: {seen:?}"),
            None => Err("nothing yet".into()),
        }
    })
    .await;
    assert_eq!(read(&cache, b, owner, 2).await, Some(value(2)));
}
