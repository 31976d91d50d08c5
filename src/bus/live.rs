//! Live updates for the conversation streams (SSE): how a stream hears that
//! its conversation changed, and where a reply's text travels while it is
//! written (`message.delta`).
//!
//! - **With NATS** ([`Live::Nats`]): core subscriptions on the conversation's
//!   event subject (the relay publishes every event there) and on its live
//!   subject (the replier publishes deltas there), in any process.
//! - **In process** ([`Live::InProcess`], no NATS): a commit wakes every stream,
//!   which reads what it has not sent from the event store. The wake-up is a
//!   hint, never the events themselves: a stream always reads the store, so a
//!   missed or doubled wake-up costs a poll's delay, never an event. Deltas go
//!   through [`Deltas`], a hub of this process: the API and the replier must
//!   share the process (they do in the embedded default). A delta is best
//!   effort on either path; the stored completion that follows repairs a lost one.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ai_secretary_contract::subjects;
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

#[derive(Clone)]
pub enum Live {
    Nats {
        client: async_nats::Client,
        subject_prefix: String,
    },
    InProcess {
        /// Changes on every commit (the store's own signal, or LISTEN on Postgres).
        commits: watch::Receiver<()>,
        deltas: Deltas,
    },
}

impl Live {
    /// Publish one piece of a reply's text to its conversation's streams.
    pub async fn publish_delta(&self, conversation: Uuid, update: String) {
        match self {
            Live::Nats {
                client,
                subject_prefix,
            } => {
                let subject = subjects::live(subject_prefix, conversation);
                // Best effort: a missed delta is repaired by the stored completion.
                let _ = client.publish(subject, update.into()).await;
            }
            Live::InProcess { deltas, .. } => deltas.publish(conversation, update),
        }
    }

    /// Return once the server has routed every delta published so far, so
    /// that they reach the streams before anything published after this
    /// (the reply's ending, which the relay publishes on a connection of its
    /// own). Nothing to do in process. False if the server did not say so
    /// within [`BARRIER_TIMEOUT`] (the deltas are best effort; the ending is
    /// appended anyway).
    ///
    /// `Client::flush` ends once the deltas are in the socket, not once the
    /// server has read them: a server that read them later than the relay's
    /// publish of the ending sent the ending first (seen in a CI run: a reply
    /// streamed with no `message.delta` before its `message.completed`). The
    /// server handles a connection's messages in order and answers a request
    /// to a subject nobody listens on at once ("no responders"), so that
    /// answer comes after the deltas were routed.
    pub async fn flush(&self) -> bool {
        let Live::Nats { client, .. } = self else {
            return true;
        };
        let barrier = client.request(client.new_inbox(), Default::default());
        match tokio::time::timeout(BARRIER_TIMEOUT, barrier).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => e.kind() == async_nats::client::RequestErrorKind::NoResponders,
            Err(_) => false,
        }
    }
}

/// Longest the replier waits for the server to confirm a reply's deltas
/// before it appends the reply's ending: far beyond the round trip (well
/// under a millisecond here) and short beside a reply's own time.
const BARRIER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Most deltas a slow stream may fall behind before it misses some (it then
/// still gets the completed reply).
const DELTA_BACKLOG: usize = 256;

/// The in-process hub of reply deltas, one channel per conversation that has a
/// stream open. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Deltas {
    channels: Arc<Mutex<HashMap<Uuid, broadcast::Sender<String>>>>,
}

impl Deltas {
    /// Receive the deltas of `conversation` from now on.
    pub fn subscribe(&self, conversation: Uuid) -> broadcast::Receiver<String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        // Channels whose streams have all closed go now: the map holds only
        // conversations someone is watching.
        channels.retain(|_, sender| sender.receiver_count() > 0);
        channels
            .entry(conversation)
            .or_insert_with(|| broadcast::channel(DELTA_BACKLOG).0)
            .subscribe()
    }

    /// Send a delta to the streams of `conversation` (none: it is dropped).
    pub fn publish(&self, conversation: Uuid, update: String) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = channels.get(&conversation)
            && sender.send(update).is_err()
        {
            channels.remove(&conversation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_reaches_the_streams_of_its_conversation_only_and_closed_ones_are_forgotten() {
        let hub = Deltas::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut watching_a = hub.subscribe(a);
        let mut watching_b = hub.subscribe(b);
        hub.publish(a, "one".into());
        hub.publish(Uuid::now_v7(), "nobody".into());
        assert_eq!(watching_a.try_recv().unwrap(), "one");
        assert!(watching_b.try_recv().is_err());
        drop(watching_a);
        hub.publish(a, "two".into());
        let channels = hub.channels.lock().unwrap();
        assert!(!channels.contains_key(&a), "a channel nobody reads is kept");
        assert!(channels.contains_key(&b));
    }
}
