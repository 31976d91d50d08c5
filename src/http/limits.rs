//! Abuse limits: token buckets per user for commands, and per client IP for
//! sign-ups and logins. A request over a limit answers 429 problem+json with
//! `Retry-After` (whole seconds until the bucket has a token again), changes
//! nothing, and counts in `rate_limited_total{limit}`.
//!
//! The buckets live in this process (governor's keyed limiters): with N API
//! replicas behind a load balancer a client gets up to N times the rate, which
//! is what a per-replica limit means; nginx's `limit_req` is the outer layer
//! that sees all of them. Buckets of keys not seen for a while are dropped by
//! [`Limits::forget_idle`], so memory follows the active clients, not all of them.

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    sync::Arc,
    time::Duration,
};

use axum::{
    extract::{ConnectInfo, MatchedPath, Request, State},
    http::{HeaderMap, Method},
    middleware::Next,
    response::Response,
};
use governor::{
    DefaultKeyedRateLimiter, Quota,
    clock::{Clock, DefaultClock},
};
use ipnet::IpNet;
use uuid::Uuid;

use super::{AppState, error::ApiError, extract::bearer_user};

/// The limits this API enforces (each `None` when turned off).
#[derive(Clone, Default)]
pub struct Limits {
    commands: Option<Arc<DefaultKeyedRateLimiter<Uuid>>>,
    signups: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    logins: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    trusted_proxies: Arc<[IpNet]>,
}

/// The settings, as `Config` has them.
#[derive(Debug, Clone, Default)]
pub struct LimitSettings {
    pub commands_per_minute: u32,
    pub signups_per_hour: u32,
    pub logins_per_minute: u32,
    pub trusted_proxies: Vec<IpNet>,
}

impl Limits {
    pub fn new(settings: &LimitSettings) -> Limits {
        let per_minute = |n| NonZeroU32::new(n).map(|n| Quota::per_minute(n).allow_burst(n));
        // Sign-ups refill slowly; a tenth of the hourly allowance may come at once.
        let per_hour = |n: u32| {
            NonZeroU32::new(n).map(|n| {
                Quota::per_hour(n)
                    .allow_burst(NonZeroU32::new(n.get() / 10).unwrap_or(NonZeroU32::MIN))
            })
        };
        Limits {
            commands: per_minute(settings.commands_per_minute)
                .map(|q| Arc::new(DefaultKeyedRateLimiter::keyed(q))),
            signups: per_hour(settings.signups_per_hour)
                .map(|q| Arc::new(DefaultKeyedRateLimiter::keyed(q))),
            logins: per_minute(settings.logins_per_minute)
                .map(|q| Arc::new(DefaultKeyedRateLimiter::keyed(q))),
            trusted_proxies: settings.trusted_proxies.clone().into(),
        }
    }

    /// Drop the buckets that are full again (their clients went quiet): a full
    /// bucket and no bucket behave the same.
    pub fn forget_idle(&self) {
        if let Some(l) = &self.commands {
            l.retain_recent();
            l.shrink_to_fit();
        }
        for l in [&self.signups, &self.logins].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Who the client is: `X-Real-IP` if the peer is a trusted proxy (nginx
    /// sets it from the connection it accepted), the peer's address otherwise.
    fn client_ip(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer?;
        if self.trusted_proxies.iter().any(|net| net.contains(&peer))
            && let Some(real) = headers
                .get("x-real-ip")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
        {
            return Some(real);
        }
        Some(peer)
    }
}

/// One token from `limiter`'s bucket for `key`, or 429 with the wait.
fn take<K: std::hash::Hash + Eq + Clone>(
    limiter: &DefaultKeyedRateLimiter<K>,
    key: &K,
    limit: &'static str,
) -> Result<(), ApiError> {
    limiter.check_key(key).map_err(|not_until| {
        metrics::counter!("rate_limited_total", "limit" => limit).increment(1);
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        ApiError::TooManyRequests {
            detail: format!("too many {limit}; try again later"),
            retry_after: wait,
        }
    })
}

/// Middleware on every `/api/v1` route, before anything reads the body:
/// `POST /users` takes a token from the client IP's sign-up bucket, `POST
/// /auth/token` from its login bucket, and every other command (POST, PATCH,
/// PUT, DELETE) from the caller's bucket. A command without a valid bearer
/// token passes on to get its 401 from the handler: the limit is per user,
/// and it is nobody yet.
pub async fn enforce(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match state.limits.check(&state, &request) {
        Ok(()) => next.run(request).await,
        Err(refused) => axum::response::IntoResponse::into_response(refused),
    }
}

impl Limits {
    fn check(&self, state: &AppState, request: &Request) -> Result<(), ApiError> {
        let method = request.method();
        if !matches!(
            *method,
            Method::POST | Method::PATCH | Method::PUT | Method::DELETE
        ) {
            return Ok(());
        }
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or("", MatchedPath::as_str);
        let by_client = |limiter: &DefaultKeyedRateLimiter<IpAddr>, limit| {
            let peer = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip());
            match self.client_ip(peer, request.headers()) {
                Some(client) => take(limiter, &client, limit),
                None => Ok(()),
            }
        };
        match (method, route) {
            (&Method::POST, "/api/v1/users") => self
                .signups
                .as_deref()
                .map_or(Ok(()), |l| by_client(l, "sign-ups")),
            (&Method::POST, "/api/v1/auth/token") => self
                .logins
                .as_deref()
                .map_or(Ok(()), |l| by_client(l, "logins")),
            _ => match (
                &self.commands,
                bearer_user(request.headers(), &state.tokens),
            ) {
                (Some(limiter), Some(user)) => take(limiter, &user, "commands"),
                _ => Ok(()),
            },
        }
    }
}

/// How often idle buckets are dropped.
pub const FORGET_EVERY: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_real_ip_counts_only_from_a_trusted_proxy() {
        let limits = Limits::new(&LimitSettings {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        });
        let mut headers = HeaderMap::new();
        headers.insert("x-real-ip", "203.0.113.7".parse().unwrap());
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            limits.client_ip(Some(proxy), &headers),
            Some("203.0.113.7".parse().unwrap())
        );
        assert_eq!(limits.client_ip(Some(stranger), &headers), Some(stranger));
        headers.insert("x-real-ip", "not an address".parse().unwrap());
        assert_eq!(limits.client_ip(Some(proxy), &headers), Some(proxy));
    }

    #[test]
    fn a_bucket_refuses_once_empty_and_says_how_long_to_wait() {
        let limits = Limits::new(&LimitSettings {
            commands_per_minute: 3,
            ..Default::default()
        });
        let limiter = limits.commands.as_ref().unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        for _ in 0..3 {
            take(limiter, &a, "commands").unwrap();
        }
        let Err(ApiError::TooManyRequests { retry_after, .. }) = take(limiter, &a, "commands")
        else {
            panic!("the fourth command in a minute went through");
        };
        // One token every 20 s at 3 a minute.
        assert!(retry_after > Duration::from_secs(15) && retry_after <= Duration::from_secs(20));
        take(limiter, &b, "commands").expect("another user has a bucket of their own");
        assert!(
            Limits::new(&LimitSettings::default()).commands.is_none(),
            "0 is off"
        );
    }
}
