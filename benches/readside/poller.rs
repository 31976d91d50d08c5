//! Part 1's pollers: each polls the conversations of the messages it was told
//! of (their 202s) until a listing shows them; when a message was first seen.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde_json::Value;
use tokio::{sync::mpsc, time::sleep_until};
use uuid::Uuid;

use crate::{
    api::Api,
    support::{http, progress::Position},
};

/// A message whose 202 arrived and which is not yet seen in a listing.
pub struct Pending {
    pub conversation: Uuid,
    pub message_id: Uuid,
    pub acked_at: Instant,
    /// The command's X-Consistency-Token: the position of its last event.
    pub position: Option<Position>,
}

/// A measured command: when its 202 came, when a listing first showed it.
pub struct Seen {
    pub acked_at: Instant,
    pub visible_at: Instant,
    pub position: Option<Position>,
}

#[derive(Default)]
pub struct PollOutcome {
    pub seen: Vec<Seen>,
    pub unresolved: usize,
    pub polls: usize,
    pub errors: usize,
    pub latencies: Vec<Duration>,
}

/// How long a poller keeps looking for a message after the last send.
const GIVE_UP: Duration = Duration::from_secs(15);

/// Poll the conversations of what is pending, every `interval`, until each
/// message is listed. `free` (a probe slot) is set whenever nothing is pending.
pub async fn poller(
    api: Api,
    mut inbox: mpsc::UnboundedReceiver<Pending>,
    interval: Duration,
    free: Option<Arc<AtomicBool>>,
) -> PollOutcome {
    let mut out = PollOutcome::default();
    let mut pending: Vec<Pending> = Vec::new();
    let mut closed_at: Option<Instant> = None;
    loop {
        if pending.is_empty() {
            if let Some(free) = &free {
                free.store(true, Ordering::Release);
            }
            if closed_at.is_some() {
                break;
            }
            match inbox.recv().await {
                Some(p) => pending.push(p),
                None => break,
            }
        }
        loop {
            match inbox.try_recv() {
                Ok(p) => pending.push(p),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed_at.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }
        if closed_at.is_some_and(|at| at.elapsed() > GIVE_UP) {
            out.unresolved += pending.len();
            break;
        }
        // Everything pending was acked before this instant: each GET is sent after.
        let started = Instant::now();
        let mut conversations: Vec<Uuid> = pending.iter().map(|p| p.conversation).collect();
        conversations.sort_unstable();
        conversations.dedup();
        for conversation in conversations {
            let sent = Instant::now();
            let listed = list_messages(&api, conversation).await;
            let done = Instant::now();
            out.polls += 1;
            match listed {
                Ok(ids) => {
                    out.latencies.push(done - sent);
                    pending.retain(|p| {
                        let seen = p.conversation == conversation && ids.contains(&p.message_id);
                        if seen {
                            out.seen.push(Seen {
                                acked_at: p.acked_at,
                                visible_at: done,
                                position: p.position,
                            });
                        }
                        !seen
                    });
                }
                Err(_) => out.errors += 1,
            }
        }
        sleep_until((started + interval).into()).await;
    }
    out
}

/// The ids on the newest page of a conversation's messages (no consistency token).
async fn list_messages(api: &Api, conversation: Uuid) -> Result<HashSet<Uuid>> {
    let path = format!("/conversations/{conversation}/messages?order=desc&limit=10");
    let response = http::get(&api.client, &api.base, &path, &api.token, None)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("GET messages answered {}", response.status());
    }
    let body: Value = response.json().await?;
    Ok(body["data"]
        .as_array()
        .map(|data| {
            data.iter()
                .filter_map(|m| m["id"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default())
}
