//! Commit coalescing, as every event store backend does it: what is shared
//! between `postgres` and `sqlite`, so the two cannot drift apart.
//!
//! Appends are queued as [`Job`]s. A flusher takes whatever is queued when its
//! previous commit finishes and hands the commands to its backend's
//! [`BatchWriter`], which appends them in one transaction. [`append_batch`] is
//! the loop around it: a command that lost a claim (a reservation, an
//! idempotency key) is answered and the others are tried again without it; an
//! unexpected database error makes every command of the batch try alone, so one
//! bad command cannot fail the others. Each caller learns only its own outcome.
//!
//! Which commands win their claims is decided here too ([`reservation_claims`],
//! [`idempotency_claims`], [`key_changes`]); the backends only run the SQL.
//! [`append_riding_out_failures`] is the one retry policy for appends whose
//! connection failed under them.

use std::{collections::HashSet, sync::Arc};

use tokio::sync::oneshot;
use uuid::Uuid;

use super::{
    AppendError, AppendRequest, Appended, IdempotencyRecord, Reservation, StoreError, UserKeyChange,
};

/// Tuning of the coalescer.
#[derive(Debug, Clone, Copy)]
pub struct CoalescingConfig {
    /// Most commands in one transaction.
    pub max_batch: usize,
    /// Transactions in flight at once (the SQLite store has one writer and
    /// ignores it).
    pub flushers: usize,
}

impl Default for CoalescingConfig {
    fn default() -> Self {
        Self {
            max_batch: 256,
            flushers: 2,
        }
    }
}

/// One queued append and where its outcome goes.
pub(super) struct Job {
    pub request: Arc<AppendRequest>,
    pub reply: oneshot::Sender<Result<Appended, AppendError>>,
}

/// Answer every job of a batch with its own outcome.
pub(super) fn answer(jobs: Vec<Job>, outcomes: Vec<Result<Appended, AppendError>>) {
    for (job, outcome) in jobs.into_iter().zip(outcomes) {
        // The caller may have gone (request cancelled); its events are durable anyway.
        let _ = job.reply.send(outcome);
    }
}

/// Commands that lost a claim, by batch index, with their error.
pub(super) type Losers = Vec<(usize, AppendError)>;

/// The outcome of one transaction over a batch.
pub(super) enum Attempt {
    /// Committed; one outcome per command (winners and version conflicts).
    Committed(Vec<Result<Appended, AppendError>>),
    /// Rolled back: these commands (by index) lost a claim. Retry the others.
    ClaimsLost(Vec<(usize, AppendError)>),
}

/// A backend's append of several commands in one transaction.
#[async_trait::async_trait]
pub(super) trait BatchWriter: Send {
    /// Append `batch` in one transaction: every command whose stream is at its
    /// expected version goes in, the others are version conflicts; if a
    /// command whose events went in lost a claim, roll back and say which.
    async fn try_append(&mut self, batch: &[&AppendRequest]) -> Result<Attempt, sqlx::Error>;
}

/// Append several commands, in as few transactions as their claims allow.
pub(super) async fn append_batch<W: BatchWriter + ?Sized>(
    writer: &mut W,
    requests: &[&AppendRequest],
) -> Vec<Result<Appended, AppendError>> {
    let mut outcomes: Vec<Option<Result<Appended, AppendError>>> =
        requests.iter().map(|_| None).collect();
    for (i, r) in requests.iter().enumerate() {
        if r.events.is_empty() {
            outcomes[i] = Some(Err(AppendError::Empty));
        }
    }
    loop {
        let pending: Vec<usize> = (0..requests.len())
            .filter(|&i| outcomes[i].is_none())
            .collect();
        if pending.is_empty() {
            break;
        }
        let batch: Vec<&AppendRequest> = pending.iter().map(|&i| requests[i]).collect();
        match writer.try_append(&batch).await {
            Ok(Attempt::Committed(results)) => {
                for (&i, result) in pending.iter().zip(results) {
                    outcomes[i] = Some(result);
                }
            }
            Ok(Attempt::ClaimsLost(losers)) => {
                for (k, error) in losers {
                    outcomes[pending[k]] = Some(Err(error));
                }
            }
            // An unexpected database error: let every command meet it alone, so one
            // bad command cannot fail the others.
            Err(e) if pending.len() > 1 => {
                tracing::warn!(error = %e, commands = pending.len(), "batch append failed; retrying commands one by one");
                for &i in &pending {
                    outcomes[i] = Some(match writer.try_append(&[requests[i]]).await {
                        Ok(Attempt::Committed(mut r)) => r.remove(0),
                        Ok(Attempt::ClaimsLost(mut l)) => Err(l.remove(0).1),
                        Err(e) => Err(StoreError::from(e).into()),
                    });
                }
            }
            Err(e) => outcomes[pending[0]] = Some(Err(StoreError::from(e).into())),
        }
    }
    // One counter update per event type, not per event: this is the hot path.
    let mut appended: std::collections::HashMap<&str, u64> = Default::default();
    for (request, _) in requests
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| matches!(o, Some(Ok(_))))
    {
        for event in &request.events {
            *appended.entry(event.event_type.as_str()).or_default() += 1;
        }
    }
    for (event_type, count) in appended {
        metrics::counter!("events_appended_total", "event_type" => event_type.to_owned())
            .increment(count);
    }
    metrics::histogram!("append_batch_size").record(requests.len() as f64);
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Err(AppendError::Empty)))
        .collect()
}

/// Each command's outcome from where its events went: `None` (its stream was
/// not at the expected version) is a version conflict.
pub(super) fn outcomes(
    batch: &[&AppendRequest],
    appended: Vec<Option<Appended>>,
) -> Vec<Result<Appended, AppendError>> {
    batch
        .iter()
        .zip(appended)
        .map(|(r, a)| {
            a.ok_or(AppendError::VersionConflict {
                stream_id: r.stream_id,
                expected: r.expected_version,
            })
        })
        .collect()
}

/// The reservations to claim: those of commands whose events went in, by batch
/// index, with the stream that claims them.
pub(super) fn reservation_claims<'a>(
    batch: &[&'a AppendRequest],
    appended: &[Option<Appended>],
) -> Vec<(usize, &'a Reservation, Uuid)> {
    batch
        .iter()
        .enumerate()
        .filter(|(i, _)| appended[*i].is_some())
        .filter_map(|(i, r)| r.reservation.as_ref().map(|res| (i, res, r.stream_id)))
        .collect()
}

/// The claims that were not won: `won` holds the streams the database gave
/// their value to.
pub(super) fn reservation_losers(
    wanted: Vec<(usize, &Reservation, Uuid)>,
    won: &[Uuid],
) -> Vec<(usize, AppendError)> {
    wanted
        .into_iter()
        .filter(|(_, _, stream)| !won.contains(stream))
        .map(|(i, res, _)| (i, AppendError::ReservationTaken { scope: res.scope }))
        .collect()
}

/// The idempotency records to write, with the position of their command's last
/// event, by batch index; and the commands that already lost theirs because an
/// earlier command of the same batch has the same key (the first comes first:
/// the database could not tell two inserts of one key apart).
pub(super) fn idempotency_claims(
    batch: &[&AppendRequest],
    appended: &[Option<Appended>],
) -> (Vec<(usize, IdempotencyRecord)>, Losers) {
    let wanted = batch.iter().enumerate().filter_map(|(i, r)| {
        let a = appended[i]?;
        let mut record = r.idempotency.clone()?;
        record.response.position = Some(a.position);
        Some((i, record))
    });
    let mut seen = HashSet::new();
    let (unique, losers): (Vec<_>, Vec<_>) =
        wanted.partition(|(_, r)| seen.insert((r.owner_id, r.key.clone())));
    (
        unique,
        losers
            .into_iter()
            .map(|(i, _)| (i, AppendError::IdempotencyKeyTaken))
            .collect(),
    )
}

/// The records whose keys the database did not give them (`won` holds the
/// keys it inserted).
pub(super) fn idempotency_losers(
    unique: Vec<(usize, IdempotencyRecord)>,
    won: &[(Uuid, String)],
) -> Vec<(usize, AppendError)> {
    unique
        .into_iter()
        .filter(|(_, r)| !won.contains(&(r.owner_id, r.key.clone())))
        .map(|(i, _)| (i, AppendError::IdempotencyKeyTaken))
        .collect()
}

/// The user key changes of commands whose events went in: a key exists exactly
/// when its UserRegistered has committed and its UserForgotten has not.
pub(super) fn key_changes<'a>(
    batch: &[&'a AppendRequest],
    appended: &'a [Option<Appended>],
) -> impl Iterator<Item = &'a UserKeyChange> {
    batch
        .iter()
        .zip(appended)
        .filter(|(_, a)| a.is_some())
        .filter_map(|(r, _)| r.user_key.as_ref())
}

/// Attempts at one command's append when the database fails under it with a
/// transient error (`StoreError::is_transient`). Each attempt may take another
/// connection, and every idle connection of a Postgres pool may have been cut
/// at once (a restart, `pg_terminate_backend`); SQLite's writer may meet a lock
/// held past its busy timeout. A few attempts are worth it; past them the
/// caller answers 503.
const APPEND_ATTEMPTS: u32 = 5;

/// What [`append_riding_out_failures`] needs of a store.
#[async_trait::async_trait]
pub(super) trait Appender: Sync {
    /// One attempt at the append.
    async fn append_once(&self, request: Arc<AppendRequest>) -> Result<Appended, AppendError>;

    /// Where the command's events are, if they were committed (a command's
    /// events go in all or none, so one found means all).
    async fn find_appended(&self, request: &AppendRequest) -> Result<Option<Appended>, StoreError>;
}

/// Append, riding out failed connections and busy databases without ever
/// appending twice.
///
/// When an attempt fails on a transient error, the commit may or may not have
/// happened before the connection went. The next attempt first looks for the
/// command's own events by id: found, the append succeeded and that is the
/// answer; absent, nothing of it committed and it is appended again. A lookup
/// that fails too is asked again before anything is re-appended. A re-append
/// that meets a version conflict looks once more, in case the first attempt's
/// commit landed late.
pub(super) async fn append_riding_out_failures<A: Appender + ?Sized>(
    store: &A,
    request: AppendRequest,
) -> Result<Appended, AppendError> {
    let request = Arc::new(request);
    let mut last = None;
    for attempt in 0..APPEND_ATTEMPTS {
        if attempt > 0 {
            match store.find_appended(&request).await {
                Ok(Some(appended)) => return Ok(appended),
                Ok(None) => {}
                Err(e) if e.is_transient() => {
                    last = Some(e);
                    backoff(attempt).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        match store.append_once(request.clone()).await {
            Err(AppendError::Database(e)) if e.is_transient() => {
                tracing::warn!(attempt, error = %e, "append interrupted; checking whether it committed");
                last = Some(e);
                backoff(attempt).await;
            }
            Err(conflict @ AppendError::VersionConflict { .. }) if attempt > 0 => {
                return match store.find_appended(&request).await {
                    Ok(Some(appended)) => Ok(appended),
                    _ => Err(conflict),
                };
            }
            outcome => return outcome,
        }
    }
    Err(AppendError::Database(last.unwrap_or(StoreError::Closed)))
}

/// A short pause between attempts that grows with them (10, 20, 40… ms).
async fn backoff(attempt: u32) {
    tokio::time::sleep(std::time::Duration::from_millis(10 << attempt.min(6))).await;
}
