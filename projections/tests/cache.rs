//! The cache's rules, on both backends: every test runs against Redis (the
//! server at 127.0.0.1:6379, under a key prefix of its own, dropped at the end)
//! and against the in-process cache.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use ai_secretary_contract::Position;
use ai_secretary_projections::cache::{Cache, CachedJson, Invalidations, Kind};
use serde_json::json;
use uuid::Uuid;

const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A fresh id (the crate has no uuid generator of its own), distinct across
/// test processes run at the same time as well.
fn id() -> Uuid {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let process = u128::from(std::process::id()) << 64;
    Uuid::from_u128(process | u128::from(NEXT.fetch_add(1, Ordering::Relaxed)))
}

fn at(gp: i64) -> Position {
    Position {
        transaction_id: gp,
        global_position: gp,
    }
}

/// One key's invalidation: a batch of one.
fn one(kind: Kind, id: Uuid, gp: i64) -> Invalidations {
    let mut batch = Invalidations::default();
    batch.stamp(kind, id, at(gp));
    batch
}

/// A value that says which position it was read at.
fn value(gp: i64) -> CachedJson {
    CachedJson::of(&json!({ "at": gp }))
}

/// Drops the test's Redis keys when the test ends, passed or not.
struct Prefix(String);

impl Drop for Prefix {
    fn drop(&mut self) {
        let Ok(mut redis) = redis::Client::open(REDIS_URL).and_then(|c| c.get_connection()) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.0))
            .query(&mut redis)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(keys).query(&mut redis);
        }
    }
}

/// Both backends with `ttl`, named for the assertion messages.
fn backends(ttl: Duration) -> (Prefix, Vec<(&'static str, Cache)>) {
    let prefix = Prefix(format!("test_cache_{}", id().simple()));
    // Long enough for the first call's connection; Redis is local and well.
    let query_timeout = Duration::from_secs(2);
    let caches = vec![
        (
            "redis",
            Cache::new(REDIS_URL, &prefix.0, ttl, query_timeout),
        ),
        ("local", Cache::local(ttl)),
    ];
    (prefix, caches)
}

const HOUR: Duration = Duration::from_secs(3600);

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn a_value_is_served_to_its_owner_only() {
    let (_prefix, caches) = backends(HOUR);
    for (name, cache) in caches {
        let (owner, stranger, id) = (id(), id(), id());
        assert_eq!(cache.get(Kind::Assistant, id, owner).await, None, "{name}");
        cache
            .fill(Kind::Assistant, id, owner, at(5), &value(5))
            .await;
        assert_eq!(
            cache.get(Kind::Assistant, id, owner).await,
            Some(value(5)),
            "{name}"
        );
        assert_eq!(
            cache.get(Kind::Assistant, id, stranger).await,
            None,
            "{name}"
        );
        assert_eq!(
            cache.get(Kind::Conversation, id, owner).await,
            None,
            "{name}: another kind is another key"
        );
        assert!(cache.ping().await, "{name}");
    }
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn an_invalidation_drops_the_value_and_refuses_older_fills() {
    let (_prefix, caches) = backends(HOUR);
    for (name, cache) in caches {
        let (owner, id) = (id(), id());
        let get = async || cache.get(Kind::Conversation, id, owner).await;
        let fill = async |gp| {
            cache
                .fill(Kind::Conversation, id, owner, at(gp), &value(gp))
                .await
        };
        let invalidate = async |gp| {
            cache
                .invalidate(&one(Kind::Conversation, id, gp))
                .await
                .unwrap()
        };
        fill(5).await;
        invalidate(7).await;
        assert_eq!(get().await, None, "{name}: a tombstone");
        fill(6).await;
        assert_eq!(get().await, None, "{name}: a row read before the event");
        fill(7).await;
        assert_eq!(get().await, Some(value(7)), "{name}: the event's own row");
        invalidate(7).await;
        invalidate(3).await;
        assert_eq!(
            get().await,
            Some(value(7)),
            "{name}: an event the value is current as of changes nothing"
        );
        invalidate(9).await;
        invalidate(8).await;
        fill(8).await;
        assert_eq!(get().await, None, "{name}: the stamp stayed at 9");
        fill(10).await;
        assert_eq!(get().await, Some(value(10)), "{name}");
    }
}

/// A batch touching keys many times leaves each stamped at its last
/// position: a fill read at any earlier one is refused, the last one's kept.
/// (Stamped at the first, or with the last invalidation lost, a fill read
/// before the batch's end would be served.) Long enough to take Redis more
/// than one pipeline.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn a_batch_leaves_each_key_stamped_at_its_last_position() {
    let (_prefix, caches) = backends(HOUR);
    for (name, cache) in caches {
        let (owner, busy, once) = (id(), id(), id());
        for key in [busy, once] {
            cache
                .fill(Kind::Conversation, key, owner, at(1), &value(1))
                .await;
        }
        let mut batch = Invalidations::default();
        let many: Vec<Uuid> = (0..5_000).map(|_| id()).collect();
        for gp in 2..=300 {
            batch.stamp(Kind::Conversation, busy, at(gp));
            if gp == 150 {
                batch.stamp(Kind::Conversation, once, at(gp));
                for key in &many {
                    batch.stamp(Kind::Assistant, *key, at(gp));
                }
            }
        }
        cache.invalidate(&batch).await.unwrap();
        for key in [many[0], many[4_999]] {
            cache
                .fill(Kind::Assistant, key, owner, at(149), &value(149))
                .await;
            assert_eq!(cache.get(Kind::Assistant, key, owner).await, None, "{name}");
        }
        for (key, last) in [(busy, 300), (once, 150)] {
            let get = async || cache.get(Kind::Conversation, key, owner).await;
            assert_eq!(get().await, None, "{name}: a tombstone");
            for gp in [2, last - 1] {
                cache
                    .fill(Kind::Conversation, key, owner, at(gp), &value(gp))
                    .await;
                assert_eq!(get().await, None, "{name}: a row read at {gp} < {last}");
            }
            cache
                .fill(Kind::Conversation, key, owner, at(last), &value(last))
                .await;
            assert_eq!(get().await, Some(value(last)), "{name}: stamped at {last}");
        }
    }
}

/// A write of a batch that Redis refuses fails the whole batch, though Redis
/// ran the others: the projection then retries all of it, and nothing is
/// checkpointed past an invalidation that did not happen.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn a_write_refused_in_the_middle_fails_the_batch() {
    let (prefix, caches) = backends(HOUR);
    let (_, cache) = caches.into_iter().find(|(n, _)| *n == "redis").unwrap();
    let (owner, before, refused, after) = (id(), id(), id(), id());
    // Not a hash: `INVALIDATE`'s `HGET` on it is an error.
    let refused_key = format!("{}:conversation:{refused}", prefix.0);
    let mut redis = redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("SET")
        .arg(&refused_key)
        .arg("not a hash")
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut batch = Invalidations::default();
    for (gp, key) in [(1, before), (2, refused), (3, after)] {
        batch.stamp(Kind::Conversation, key, at(gp));
    }
    assert!(cache.invalidate(&batch).await.is_err());

    // Once the key can be written, the retried batch goes through.
    let () = redis::cmd("DEL")
        .arg(&refused_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    cache.invalidate(&batch).await.unwrap();
    for (gp, key) in [(1, before), (2, refused), (3, after)] {
        cache
            .fill(Kind::Conversation, key, owner, at(gp - 1), &value(gp - 1))
            .await;
        assert_eq!(cache.get(Kind::Conversation, key, owner).await, None);
        cache
            .fill(Kind::Conversation, key, owner, at(gp), &value(gp))
            .await;
        assert_eq!(
            cache.get(Kind::Conversation, key, owner).await,
            Some(value(gp))
        );
    }
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn forgetting_an_owner_drops_their_keys_and_refuses_their_fills_for_a_ttl() {
    let ttl = Duration::from_secs(2);
    let (_prefix, caches) = backends(ttl);
    for (name, cache) in caches {
        let (forgotten, other) = (id(), id());
        let theirs = [
            (Kind::User, forgotten),
            (Kind::Assistant, id()),
            (Kind::Conversation, id()),
        ];
        let (kept_kind, kept) = (Kind::Assistant, id());
        for (kind, id) in theirs {
            cache.fill(kind, id, forgotten, at(1), &value(1)).await;
            assert!(cache.get(kind, id, forgotten).await.is_some(), "{name}");
        }
        cache.fill(kept_kind, kept, other, at(1), &value(1)).await;

        let mut forget = Invalidations::default();
        forget.forget_owner(forgotten);
        cache.invalidate(&forget).await.unwrap();
        for (kind, id) in theirs {
            assert_eq!(cache.get(kind, id, forgotten).await, None, "{name}");
            cache.fill(kind, id, forgotten, at(2), &value(2)).await;
            assert_eq!(
                cache.get(kind, id, forgotten).await,
                None,
                "{name}: a fill during the mark's TTL"
            );
        }
        assert_eq!(
            cache.get(kept_kind, kept, other).await,
            Some(value(1)),
            "{name}: another owner's value stays"
        );

        tokio::time::sleep(ttl + Duration::from_millis(500)).await;
        let (kind, id) = theirs[1];
        cache.fill(kind, id, forgotten, at(3), &value(3)).await;
        assert_eq!(
            cache.get(kind, id, forgotten).await,
            Some(value(3)),
            "{name}: the mark lasts one TTL"
        );
    }
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn values_and_stamps_expire_after_the_ttl() {
    let ttl = Duration::from_secs(1);
    let (_prefix, caches) = backends(ttl);
    for (name, cache) in caches {
        let (owner, filled, stamped) = (id(), id(), id());
        cache
            .fill(Kind::User, filled, owner, at(1), &value(1))
            .await;
        cache
            .invalidate(&one(Kind::User, stamped, 10))
            .await
            .unwrap();
        assert!(
            cache.get(Kind::User, filled, owner).await.is_some(),
            "{name}"
        );
        tokio::time::sleep(ttl + Duration::from_millis(500)).await;
        assert_eq!(
            cache.get(Kind::User, filled, owner).await,
            None,
            "{name}: expired"
        );
        cache
            .fill(Kind::User, stamped, owner, at(5), &value(5))
            .await;
        assert_eq!(
            cache.get(Kind::User, stamped, owner).await,
            Some(value(5)),
            "{name}: the tombstone lived one TTL"
        );
    }
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn forget_all_drops_every_value() {
    let (_prefix, caches) = backends(HOUR);
    for (name, cache) in caches {
        let owner = id();
        let ids = [id(), id(), id()];
        for id in ids {
            cache
                .fill(Kind::Assistant, id, owner, at(1), &value(1))
                .await;
        }
        assert!(cache.forget_all().await.unwrap() >= 3, "{name}");
        for id in ids {
            assert_eq!(cache.get(Kind::Assistant, id, owner).await, None, "{name}");
            cache
                .fill(Kind::Assistant, id, owner, at(1), &value(1))
                .await;
            assert!(
                cache.get(Kind::Assistant, id, owner).await.is_some(),
                "{name}: filled again by queries"
            );
        }
    }
}

#[tokio::test]
async fn an_unreachable_redis_is_not_available_and_the_local_cache_always_is() {
    let unreachable = Cache::new(
        "redis://127.0.0.1:1",
        "unused",
        HOUR,
        Duration::from_millis(200),
    );
    assert!(!unreachable.ping().await);
    assert!(
        unreachable
            .invalidate(&one(Kind::User, id(), 1))
            .await
            .is_err(),
        "an invalidation that did not happen fails"
    );
    assert!(Cache::local(HOUR).ping().await);
}

/// Many tasks invalidate and fill the same few keys at random positions while
/// others read: once an invalidation at q has returned, no read may see a value
/// read before q, and at the end each value is at least as new as every stamp.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_invalidations_and_fills_never_leave_an_older_value() {
    const KEYS: usize = 3;
    const TASKS_PER_KEY: usize = 8;
    const ROUNDS: usize = 40;
    let (_prefix, caches) = backends(HOUR);
    for (name, cache) in caches {
        let owner = id();
        let ids: Vec<Uuid> = (0..KEYS).map(|_| id()).collect();
        // Per key: the newest invalidation that has returned.
        let invalidated: Arc<Vec<AtomicI64>> =
            Arc::new((0..KEYS).map(|_| AtomicI64::new(0)).collect());
        let mut tasks = tokio::task::JoinSet::new();
        for (k, &key) in ids.iter().enumerate() {
            for t in 0..TASKS_PER_KEY {
                let (cache, invalidated) = (cache.clone(), invalidated.clone());
                // xorshift, seeded per task: positions 1..=1000 in any order.
                let mut seed =
                    ((k * TASKS_PER_KEY + t) as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let mut next = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 1000) as i64 + 1
                };
                tasks.spawn(async move {
                    for _ in 0..ROUNDS {
                        let gp = next();
                        match t % 3 {
                            0 => {
                                cache
                                    .invalidate(&one(Kind::Conversation, key, gp))
                                    .await
                                    .unwrap();
                                invalidated[k].fetch_max(gp, Ordering::SeqCst);
                            }
                            1 => {
                                cache
                                    .fill(Kind::Conversation, key, owner, at(gp), &value(gp))
                                    .await
                            }
                            _ => {
                                let floor = invalidated[k].load(Ordering::SeqCst);
                                if let Some(seen) = cache.get(Kind::Conversation, key, owner).await
                                {
                                    let seen = seen.to_value()["at"].as_i64().unwrap();
                                    assert!(
                                        seen >= floor,
                                        "read {seen} after an invalidation at {floor} returned"
                                    );
                                }
                            }
                        }
                        tokio::task::yield_now().await;
                    }
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let mut values = 0;
        for (k, &key) in ids.iter().enumerate() {
            let newest = invalidated[k].load(Ordering::SeqCst);
            assert!(newest > 0, "{name}: the race invalidated key {k}");
            if let Some(v) = cache.get(Kind::Conversation, key, owner).await {
                values += 1;
                assert!(
                    v.to_value()["at"].as_i64().unwrap() >= newest,
                    "{name}: key {k}"
                );
            }
            // Whatever is left, a fill older than the newest stamp is refused.
            cache
                .fill(
                    Kind::Conversation,
                    key,
                    owner,
                    at(newest - 1),
                    &value(newest - 1),
                )
                .await;
            if let Some(v) = cache.get(Kind::Conversation, key, owner).await {
                assert!(
                    v.to_value()["at"].as_i64().unwrap() >= newest,
                    "{name}: key {k}"
                );
            }
        }
        // Not an assertion on the race's outcome, which is random: a record
        // that the fills were not all refused.
        eprintln!("{name}: {values} of {KEYS} keys hold a value after the race");
    }
}

/// One writer moves the keys in commit order, as the `cache` projection
/// does: each position stamps one key and fills it, then the checkpoint moves
/// there. Readers ask for a key current through the checkpoint they saw: no
/// answer, from Redis or from a process's own copy (`near`), may be older than
/// that key's last change at or before it. The writer pauses now and then, so
/// that readers answer from their copies as well as race the pushes.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_is_older_than_the_checkpoint_its_query_saw() {
    const KEYS: i64 = 4;
    const POSITIONS: i64 = 600;
    const READERS: usize = 6;
    let (_prefix, caches) = backends(HOUR);
    for (name, cache) in caches {
        let owner = id();
        let ids: Arc<Vec<Uuid>> = Arc::new((0..KEYS).map(|_| id()).collect());
        // The key position `gp` changes, and its last change at or before `gp`.
        let key_of = |gp: i64| (gp % KEYS) as usize;
        let last_change = |key: usize, gp: i64| gp - (gp - key as i64).rem_euclid(KEYS);
        let checkpoint = Arc::new(AtomicI64::new(0));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = tokio::task::JoinSet::new();
        for r in 0..READERS {
            let (cache, ids, checkpoint, done) =
                (cache.clone(), ids.clone(), checkpoint.clone(), done.clone());
            readers.spawn(async move {
                let (mut reads, mut answered) = (0u64, 0u64);
                let mut key = r % KEYS as usize;
                while !done.load(Ordering::SeqCst) {
                    key = (key + 1) % KEYS as usize;
                    let seen = checkpoint.load(Ordering::SeqCst);
                    let answer = cache
                        .get_current(Kind::Conversation, ids[key], owner, at(seen), at(seen))
                        .await;
                    reads += 1;
                    if let Some(answer) = answer {
                        answered += 1;
                        let floor = last_change(key, seen);
                        let got = answer.to_value()["at"].as_i64().unwrap();
                        assert!(
                            got >= floor,
                            "key {key}: read {got} through checkpoint {seen}, changed at {floor}"
                        );
                    }
                    // An answer from memory never waits, so without this the
                    // readers would keep the writer off both worker threads.
                    tokio::task::yield_now().await;
                }
                (reads, answered)
            });
        }
        for gp in 1..=POSITIONS {
            let key = ids[key_of(gp)];
            cache
                .invalidate(&one(Kind::Conversation, key, gp))
                .await
                .unwrap();
            cache
                .fill(Kind::Conversation, key, owner, at(gp), &value(gp))
                .await;
            checkpoint.store(gp, Ordering::SeqCst);
            if gp % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        done.store(true, Ordering::SeqCst);
        let (mut reads, mut answered) = (0, 0);
        while let Some(counts) = readers.join_next().await {
            let (r, a) = counts.unwrap_or_else(|e| panic!("{name}: {e}"));
            reads += r;
            answered += a;
        }
        assert!(answered > 0, "{name}: {reads} reads, none answered");
        eprintln!("{name}: {answered} of {reads} reads answered");
    }
}
