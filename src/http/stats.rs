//! Usage statistics: completed replies and tokens over a range of UTC days.

use ai_secretary_projections::read::{self, GroupBy};
use axum::{Json, Router, extract::State, routing::get};
use chrono::{Days, NaiveDate, Utc};
use serde_json::{Value, json};

use super::{
    AppState,
    error::ApiError,
    extract::AuthUser,
    read::{ConsistencyToken, RawQuery},
};

/// Longest range one request may ask for.
const MAX_DAYS: i64 = 366;
/// The days a request may name: nothing was used before the Unix epoch, and
/// four-digit years keep every date arithmetic (and Postgres) in range.
const FIRST_DAY: NaiveDate = NaiveDate::from_ymd_opt(1970, 1, 1).expect("a valid date");
const LAST_DAY: NaiveDate = NaiveDate::from_ymd_opt(9999, 12, 31).expect("a valid date");

pub fn router() -> Router<AppState> {
    Router::new().route("/stats/usage", get(usage))
}

/// `?from=YYYY-MM-DD&to=YYYY-MM-DD&group_by=day|assistant|model`; both days
/// included; by default the last 30 days by day.
async fn usage(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    token: ConsistencyToken,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let day = |name: &str| -> Result<Option<NaiveDate>, ApiError> {
        raw.get(name)
            .map(|v| {
                v.parse::<NaiveDate>()
                    .ok()
                    .filter(|d| (FIRST_DAY..=LAST_DAY).contains(d))
                    .ok_or_else(|| {
                        ApiError::invalid_field(
                            &format!("/{name}"),
                            format!(
                                "must be a date like 2026-05-31, from {FIRST_DAY} to {LAST_DAY}"
                            ),
                        )
                    })
            })
            .transpose()
    };
    let to = day("to")?.unwrap_or_else(|| Utc::now().date_naive());
    let from = match day("from")? {
        Some(from) => from,
        None => to
            .checked_sub_days(Days::new(29))
            .unwrap_or(FIRST_DAY)
            .max(FIRST_DAY),
    };
    if from > to {
        return Err(ApiError::invalid_field("/from", "must not be after `to`"));
    }
    if (to - from).num_days() > MAX_DAYS {
        return Err(ApiError::invalid_field(
            "/from",
            format!("the range may span at most {MAX_DAYS} days"),
        ));
    }
    let (group_by, name) = match raw.get("group_by").map(String::as_str) {
        None | Some("day") => (GroupBy::Day, "day"),
        Some("assistant") => (GroupBy::Assistant, "assistant"),
        Some("model") => (GroupBy::Model, "model"),
        Some(_) => {
            return Err(ApiError::invalid_field(
                "/group_by",
                "must be day, assistant or model",
            ));
        }
    };
    state.read.catch_up(&token, &["usage_daily"]).await?;
    let rows = state
        .read
        .query(|pool| read::usage_of(pool, user, from, to, group_by))
        .await?;
    let total = rows.iter().fold([0i64; 4], |t, r| {
        [
            t[0] + r.messages,
            t[1] + r.prompt_tokens,
            t[2] + r.completion_tokens,
            t[3] + r.total_tokens,
        ]
    });
    Ok(Json(json!({
        "object": "usage",
        "from": from,
        "to": to,
        "group_by": name,
        "data": rows,
        "total": {
            "messages": total[0],
            "prompt_tokens": total[1],
            "completion_tokens": total[2],
            "total_tokens": total[3],
        },
    })))
}
