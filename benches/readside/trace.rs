//! Part 1's tracing: when each event showed up on NATS and when the `messages`
//! projection committed the batch holding it, to split a measured command's
//! freshness into stages.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use sqlx::{PgPool, postgres::PgListener};
use tokio::task::JoinHandle;

use crate::{
    CHECKPOINT_CHANNEL, Settings, ms, parse_position, poller::Seen, service::Names,
    support::progress::Position,
};

/// When each event showed up on NATS, and when the `messages` projection
/// committed each batch: the stages of a command's way to the query API.
#[derive(Default)]
pub struct Trace {
    published: HashMap<Position, Instant>,
    /// `messages` checkpoint commits in arrival order.
    projected: Vec<(Instant, Position)>,
}

impl Trace {
    pub fn clear(&mut self) {
        self.published.clear();
        self.projected.clear();
    }

    /// Per measured command: 202 → published, published → projected, projected
    /// → listed (signed ms, each sorted); none if nothing could be traced.
    pub fn stages(&self, seen: &[Seen]) -> Option<([Vec<f64>; 3], usize)> {
        let signed = |from: Instant, to: Instant| {
            if to >= from {
                ms(to - from)
            } else {
                -ms(from - to)
            }
        };
        let mut stages: [Vec<f64>; 3] = Default::default();
        for s in seen {
            let Some(position) = s.position else { continue };
            let Some(&published) = self.published.get(&position) else {
                continue;
            };
            let Some(&(projected, _)) = self.projected.iter().find(|(_, p)| *p >= position) else {
                continue;
            };
            stages[0].push(signed(s.acked_at, published));
            stages[1].push(signed(published, projected));
            stages[2].push(signed(projected, s.visible_at));
        }
        let traced = stages[0].len();
        for stage in &mut stages {
            stage.sort_by(f64::total_cmp);
        }
        (traced > 0).then_some((stages, traced))
    }
}

/// Background listeners filling a [`Trace`]: a core NATS subscription to the
/// event subjects and a LISTEN on the checkpoint channel.
pub struct Tracer {
    pub trace: Arc<Mutex<Trace>>,
    _tasks: Vec<AbortOnDrop>,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Tracer {
    pub async fn start(settings: &Settings, names: &Names, pool: &PgPool) -> Result<Tracer> {
        #[derive(serde::Deserialize)]
        struct Envelope {
            transaction_id: i64,
            global_position: i64,
        }
        let trace = Arc::new(Mutex::new(Trace::default()));
        let nats = async_nats::connect(&settings.nats_url)
            .await
            .context("connecting to NATS to trace")?;
        let mut events = nats
            .subscribe(format!("{}.>", names.subject_prefix))
            .await
            .context("subscribing to the event subjects")?;
        let published = trace.clone();
        let on_nats = tokio::spawn(async move {
            let _client = nats;
            while let Some(message) = events.next().await {
                let at = Instant::now();
                if let Ok(e) = serde_json::from_slice::<Envelope>(&message.payload)
                    && let Ok(mut t) = published.lock()
                {
                    t.published
                        .insert((e.transaction_id, e.global_position), at);
                }
            }
        });
        let mut listener = PgListener::connect_with(pool)
            .await
            .context("listening for checkpoints")?;
        listener.listen(CHECKPOINT_CHANNEL).await?;
        let projected = trace.clone();
        let on_commit = tokio::spawn(async move {
            while let Ok(note) = listener.recv().await {
                let at = Instant::now();
                if let Some(("messages", position)) = note.payload().split_once(' ')
                    && let Some(position) = parse_position(position)
                    && let Ok(mut t) = projected.lock()
                {
                    t.projected.push((at, position));
                }
            }
        });
        Ok(Tracer {
            trace,
            _tasks: vec![AbortOnDrop(on_nats), AbortOnDrop(on_commit)],
        })
    }
}
