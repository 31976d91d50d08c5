//! Single-active roles (the relay, each projection worker) as fenced leases.
//!
//! Taking the lease: a Postgres advisory lock held on a connection of its own
//! (a standby waits on it), then the role's checkpoint row's `epoch` bumped on
//! that same connection. Holding it: a watcher asks, every [`CHECK_EVERY`],
//! whether that connection is alive and the epoch is still ours; the moment
//! either fails, [`Lease::lost`] fires and the role stops consuming. Using it:
//! every checkpoint write is a compare-and-set on the epoch (`checkpoint::save`),
//! so even a write already under way when the lease was lost fails at commit.
//! The watcher makes a deposed owner stop quickly; the fence makes it harmless
//! in the meantime.
//!
//! On SQLite (the embedded default) there are no advisory locks. The lease is
//! an exclusive OS file lock (`flock`) on a file beside the database,
//! `<database file>.lease-<name>`: it excludes every other holder, whether a
//! task of this process (each takes its own open file description) or another
//! process on the same `DATA_DIR` (an operator's second process), and the OS
//! drops it when its holder dies. Then the epoch is bumped and watched as on
//! Postgres, and every write is fenced the same way.

use std::{
    fs::{File, TryLockError},
    path::PathBuf,
    time::Duration,
};

use chrono::Utc;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use crate::{
    checkpoint,
    db::{Db, SqliteDb},
};

/// How often the holder checks that its lease is still its own, and how often
/// a standby on SQLite tries the lock file again. A takeover can only begin
/// once the old lock is gone; this bounds how long the old owner keeps reading
/// after that (its writes are fenced regardless), and on SQLite how long a
/// free lease waits for its standby.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A held lease. Dropping it releases the lock: it closes the lock connection
/// (Postgres) or the lock file (SQLite).
pub struct Lease {
    /// The checkpoint row it fences; also the `role` label of its metrics.
    pub name: String,
    /// This holder's epoch: every checkpoint write must find the row at it.
    pub epoch: i64,
    lost: CancellationToken,
    _watcher: AbortOnDropHandle<()>,
}

/// Start the role's lease series at zero, so a standby (or an owner never
/// deposed) shows 0 rather than no data.
pub fn zero_metrics(name: &str) {
    for counter in ["leader_changes_total", "fenced_writes_total"] {
        metrics::counter!(counter, "role" => name.to_owned()).increment(0);
    }
}

impl Lease {
    /// Wait for the lease of checkpoint `name` (advisory lock `lock_key` on
    /// Postgres, the lock file of `name` on SQLite), take it over, and watch
    /// it. `None` if `shutdown` came first.
    pub async fn acquire(
        db: &Db,
        lock_key: &str,
        name: &str,
        shutdown: &CancellationToken,
    ) -> Result<Option<Lease>, sqlx::Error> {
        match db {
            Db::Postgres(pool) => acquire_postgres(pool, lock_key, name, shutdown).await,
            Db::Sqlite(db) => acquire_sqlite(db, name, shutdown).await,
        }
    }

    fn held(
        name: &str,
        epoch: i64,
        lost: CancellationToken,
        watcher: tokio::task::JoinHandle<()>,
    ) -> Lease {
        metrics::counter!("leader_changes_total", "role" => name.to_owned()).increment(1);
        tracing::info!(role = name, epoch, "took over the lease: active");
        Lease {
            name: name.to_owned(),
            epoch,
            lost,
            _watcher: AbortOnDropHandle::new(watcher),
        }
    }

    /// Fires when the lease is lost (or on shutdown): stop consuming.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// The fence of a write that starts from `from` under this lease.
    pub fn fence(&self, from: crate::Position) -> checkpoint::Fence {
        checkpoint::Fence {
            epoch: self.epoch,
            from,
        }
    }

    /// Count and log a write refused by the fence, and give the lease up.
    pub fn fenced(&self) {
        metrics::counter!("fenced_writes_total", "role" => self.name.clone()).increment(1);
        tracing::warn!(
            role = %self.name,
            epoch = self.epoch,
            "checkpoint write refused: another owner took over; stopping"
        );
        self.lost.cancel();
    }
}

/// Who holds a lease, for operators: host and process id.
fn holder() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!("{host}/{}", std::process::id())
}

async fn acquire_postgres(
    pool: &PgPool,
    lock_key: &str,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Lease>, sqlx::Error> {
    // Named, so operators (and tests) can tell lease connections apart.
    let options = pool
        .connect_options()
        .as_ref()
        .clone()
        .application_name(&format!("ai-secretary lease {name}"));
    let mut conn = PgConnection::connect_with(&options).await?;
    tokio::select! {
        locked = sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
            .bind(lock_key)
            .execute(&mut conn) => { locked?; }
        () = shutdown.cancelled() => return Ok(None),
    }
    checkpoint::postgres::ensure(&mut conn, name).await?;
    // Waits for a batch the previous owner still has in flight (it holds the
    // row lock until it commits), then deposes it.
    let epoch: i64 = sqlx::query_scalar(
        "UPDATE checkpoints SET epoch = epoch + 1, owner = $2, owner_since = now()
         WHERE name = $1 RETURNING epoch",
    )
    .bind(name)
    .bind(holder())
    .fetch_one(&mut conn)
    .await?;
    let lost = shutdown.child_token();
    let watcher = tokio::spawn(watch_postgres(conn, name.to_owned(), epoch, lost.clone()));
    Ok(Some(Lease::held(name, epoch, lost, watcher)))
}

/// Check the lock connection and the epoch until either fails, then fire `lost`.
async fn watch_postgres(mut conn: PgConnection, name: String, epoch: i64, lost: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHECK_EVERY) => {}
            () = lost.cancelled() => break,
        }
        let current = tokio::time::timeout(
            CHECK_EVERY,
            sqlx::query_scalar::<_, i64>("SELECT epoch FROM checkpoints WHERE name = $1")
                .bind(&name)
                .fetch_one(&mut conn),
        )
        .await;
        let reason = match current {
            Ok(Ok(current)) if current == epoch => continue,
            Ok(Ok(current)) => format!("epoch {current} took over"),
            Ok(Err(e)) => format!("lock connection failed: {e}"),
            Err(_) => "lock connection did not answer".to_owned(),
        };
        tracing::warn!(role = %name, epoch, reason, "lost the lease; stopping");
        lost.cancel();
        break;
    }
    // Closing the connection releases the advisory lock for the next owner.
    let _ = conn.close().await;
}

/// The lock file of lease `name` on the SQLite database of `db`: beside the
/// database file, so every process that opens that file finds the same one.
pub fn lock_file(db: &SqliteDb, name: &str) -> Result<PathBuf, sqlx::Error> {
    // The name becomes part of a file name: only the characters of the
    // service's own role names, so it can never point elsewhere.
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(sqlx::Error::Configuration(
            format!("lease name {name:?} is not usable in a file name").into(),
        ));
    }
    let database = db.pool.connect_options().get_filename().to_owned();
    // An in-memory database has no file, and no second process could share it.
    if database.as_os_str().is_empty() || database.as_os_str() == ":memory:" {
        return Err(sqlx::Error::Configuration(
            "a lease on SQLite needs a database file (not an in-memory database)".into(),
        ));
    }
    let mut path = database.into_os_string();
    path.push(format!(".lease-{name}"));
    Ok(PathBuf::from(path))
}

async fn acquire_sqlite(
    db: &SqliteDb,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Lease>, sqlx::Error> {
    let path = lock_file(db, name)?;
    // Opening (creating) the file never blocks; the file's content is never
    // used, only its lock. It is left in place after use: deleting it could
    // split holders between the old file and a new one at the same path.
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    // `try_lock` and a pause rather than a blocking `lock` on a thread of its
    // own: a blocked thread could not be called off at shutdown.
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(e.into()),
        }
        tokio::select! {
            () = tokio::time::sleep(CHECK_EVERY) => {}
            () = shutdown.cancelled() => return Ok(None),
        }
    }
    checkpoint::sqlite::ensure(&db.pool, name).await?;
    // One statement, so one short write transaction of its own (it waits its
    // turn for the write lock, behind a batch in flight). SQLite has no clock
    // in the schema: `owner_since` is bound from Rust, as µs since 1970 UTC.
    let epoch: i64 = sqlx::query_scalar(
        "UPDATE checkpoints SET epoch = epoch + 1, owner = $2, owner_since = $3
         WHERE name = $1 RETURNING epoch",
    )
    .bind(name)
    .bind(holder())
    .bind(Utc::now().timestamp_micros())
    .fetch_one(&db.pool)
    .await?;
    let lost = shutdown.child_token();
    let watcher = tokio::spawn(watch_sqlite(
        file,
        db.clone(),
        name.to_owned(),
        epoch,
        lost.clone(),
    ));
    Ok(Some(Lease::held(name, epoch, lost, watcher)))
}

/// Check the epoch until another holder bumps it, then fire `lost`. The lock
/// file is held by this task: it is closed (and the lock released) when the
/// task ends or is aborted with its `Lease`.
///
/// Unlike Postgres, a failed read says nothing about the lock: the file lock
/// is still held (only this process's end releases it). It is logged and read
/// again; the fence still guards every write.
async fn watch_sqlite(lock: File, db: SqliteDb, name: String, epoch: i64, lost: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHECK_EVERY) => {}
            () = lost.cancelled() => break,
        }
        let current = tokio::time::timeout(
            CHECK_EVERY,
            sqlx::query_scalar::<_, i64>("SELECT epoch FROM checkpoints WHERE name = $1")
                .bind(&name)
                .fetch_one(&db.pool),
        )
        .await;
        match current {
            Ok(Ok(current)) if current == epoch => {}
            Ok(Ok(current)) => {
                tracing::warn!(role = %name, epoch, reason = format!("epoch {current} took over"),
                    "lost the lease; stopping");
                lost.cancel();
                break;
            }
            Ok(Err(e)) => {
                tracing::warn!(role = %name, epoch, error = %e, "could not read the lease's epoch; trying again")
            }
            Err(_) => {
                tracing::warn!(role = %name, epoch, "reading the lease's epoch timed out; trying again")
            }
        }
    }
    drop(lock);
}
