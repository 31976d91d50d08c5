//! Usage statistics: completed replies and tokens over a range of UTC days.

use ai_secretary_projections::read::{self, GroupBy, UsageRow};
use axum::{Json, extract::State};
use chrono::{Days, NaiveDate, Utc};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    AppState,
    error::ApiError,
    extract::AuthUser,
    openapi::ConsistencyParam,
    read::{ConsistencyToken, RawQuery},
};

/// Longest range one request may ask for.
const MAX_DAYS: i64 = 366;
/// The days a request may name: nothing was used before the Unix epoch, and
/// four-digit years keep every date arithmetic (and Postgres) in range.
const FIRST_DAY: NaiveDate = NaiveDate::from_ymd_opt(1970, 1, 1).expect("a valid date");
const LAST_DAY: NaiveDate = NaiveDate::from_ymd_opt(9999, 12, 31).expect("a valid date");

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(usage))
}

/// The range and grouping of `GET /stats/usage`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct UsageQuery {
    /// The first day (UTC), from 1970-01-01; 29 days before `to` by default.
    #[param(value_type = Option<String>, format = Date, example = "2026-11-01")]
    from: Option<NaiveDate>,
    /// The last day (UTC), to 9999-12-31; today by default. At most 366 days after `from`.
    #[param(value_type = Option<String>, format = Date, example = "2026-11-30")]
    to: Option<NaiveDate>,
    /// How rows are grouped: `day` (the default), `assistant` or `model`.
    #[param(value_type = Option<UsageGroup>, inline)]
    group_by: Option<String>,
}

/// How `GET /stats/usage` groups its rows.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
enum UsageGroup {
    Day,
    Assistant,
    Model,
}

/// Completed replies and their tokens over a range of days.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "object": "usage", "from": "2026-11-01", "to": "2026-11-30", "group_by": "day",
    "data": [{"day": "2026-11-29", "messages": 3, "prompt_tokens": 120,
              "completion_tokens": 51, "total_tokens": 171}],
    "total": {"messages": 3, "prompt_tokens": 120, "completion_tokens": 51, "total_tokens": 171}
}))]
struct Usage {
    /// Always `usage`.
    #[schema(example = "usage")]
    object: &'static str,
    from: NaiveDate,
    to: NaiveDate,
    #[schema(value_type = UsageGroup)]
    group_by: &'static str,
    /// One row per group that has usage, in the group's order.
    data: Vec<UsageRow>,
    total: UsageTotal,
}

/// The sums over the whole range.
#[derive(Serialize, ToSchema)]
struct UsageTotal {
    /// Completed replies.
    messages: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
}

/// Usage of the caller's assistants over a range of days.
///
/// Completed replies and tokens per day, assistant or model, both days of the
/// range included.
#[utoipa::path(
    get,
    path = "/stats/usage",
    tag = "stats",
    security(("bearer" = [])),
    params(UsageQuery, ConsistencyParam),
    responses((status = 200, description = "The usage", body = Usage)),
)]
async fn usage(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    token: ConsistencyToken,
    RawQuery(raw): RawQuery,
) -> Result<Json<Usage>, ApiError> {
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
        .query(|db| read::usage_of(db, user, from, to, group_by))
        .await?;
    let total = rows.iter().fold([0i64; 4], |t, r| {
        [
            t[0] + r.messages,
            t[1] + r.prompt_tokens,
            t[2] + r.completion_tokens,
            t[3] + r.total_tokens,
        ]
    });
    Ok(Json(Usage {
        object: "usage",
        from,
        to,
        group_by: name,
        data: rows,
        total: UsageTotal {
            messages: total[0],
            prompt_tokens: total[1],
            completion_tokens: total[2],
            total_tokens: total[3],
        },
    }))
}
