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

use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use crate::checkpoint;

/// How often the holder checks that its lease is still its own. A takeover can
/// only begin once the old lock connection is gone; this bounds how long the
/// old owner keeps reading after that (its writes are fenced regardless).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A held lease. Dropping it closes the lock connection, which releases the lock.
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
    /// Wait for the lease of checkpoint `name` (advisory lock `lock_key`), take
    /// it over, and watch it. `None` if `shutdown` came first.
    pub async fn acquire(
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
        checkpoint::ensure(&mut conn, name).await?;
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
        metrics::counter!("leader_changes_total", "role" => name.to_owned()).increment(1);
        tracing::info!(role = name, epoch, "took over the lease: active");
        let lost = shutdown.child_token();
        let watcher = tokio::spawn(watch(conn, name.to_owned(), epoch, lost.clone()));
        Ok(Some(Lease {
            name: name.to_owned(),
            epoch,
            lost,
            _watcher: AbortOnDropHandle::new(watcher),
        }))
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

/// Check the lock connection and the epoch until either fails, then fire `lost`.
async fn watch(mut conn: PgConnection, name: String, epoch: i64, lost: CancellationToken) {
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
