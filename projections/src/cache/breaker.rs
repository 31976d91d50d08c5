//! A circuit breaker for the queries' Redis calls: when Redis fails or stalls,
//! queries stop asking it for a while and read Postgres instead, so a frozen
//! Redis costs one timeout per window rather than one per request.
//!
//! Closed: every call goes through. A failure opens it for [`OPEN_FOR`]; while
//! open, no call goes through. When the window has passed, exactly one call is
//! let through as a probe (half-open) and everyone else still skips Redis; the
//! probe's success closes the breaker, its failure opens it again.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// How long Redis is left alone after a failure.
pub const OPEN_FOR: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    /// Failing: no calls until the instant, then one probe.
    Open {
        until: Instant,
    },
    /// The probe is in flight: no other calls.
    HalfOpen,
}

impl State {
    /// The `cache_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::HalfOpen => 1.0,
            State::Open { .. } => 2.0,
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: Mutex::new(State::Closed),
        }
    }
}

impl Breaker {
    /// May this call go to Redis? A `true` in the half-open state makes the
    /// caller the probe: it must report its outcome with `succeeded`/`failed`.
    pub fn allow(&self) -> bool {
        let mut state = self.lock();
        match *state {
            State::Closed => true,
            State::Open { until } if Instant::now() >= until => {
                self.set(&mut state, State::HalfOpen);
                true
            }
            State::Open { .. } | State::HalfOpen => false,
        }
    }

    pub fn succeeded(&self) {
        let mut state = self.lock();
        if *state != State::Closed {
            self.set(&mut state, State::Closed);
        }
    }

    pub fn failed(&self) {
        let mut state = self.lock();
        self.set(
            &mut state,
            State::Open {
                until: Instant::now() + OPEN_FOR,
            },
        );
    }

    #[cfg(test)]
    fn state(&self) -> State {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plain value: a panic elsewhere cannot leave it half-set.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, state: &mut State, to: State) {
        *state = to;
        metrics::gauge!("cache_breaker_state").set(to.gauge());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_opens_it_and_one_probe_goes_through_after_the_window() {
        let breaker = Breaker::default();
        assert!(breaker.allow());
        breaker.failed();
        assert!(!breaker.allow(), "open: nobody goes to Redis");
        // Pretend the window has passed.
        *breaker.lock() = State::Open {
            until: Instant::now(),
        };
        assert!(breaker.allow(), "the first caller after the window probes");
        assert_eq!(breaker.state(), State::HalfOpen);
        assert!(
            !breaker.allow(),
            "while the probe is out, the others skip Redis"
        );
        breaker.failed();
        assert!(matches!(breaker.state(), State::Open { .. }));
        *breaker.lock() = State::Open {
            until: Instant::now(),
        };
        assert!(breaker.allow());
        breaker.succeeded();
        assert_eq!(breaker.state(), State::Closed);
        assert!(breaker.allow() && breaker.allow(), "closed: everyone goes");
    }
}
