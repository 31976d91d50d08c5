#![allow(dead_code)] // each test binary uses a different part of this module
//! The metric names a PromQL expression reads, and the expressions of the
//! monitoring files (Grafana dashboards, alert rules), so tests can hold the
//! dashboards and alerts to what the service really exports.
//!
//! A small tokenizer, not a PromQL parser: `promtool check rules` validates the
//! syntax (the ops tests feed it every dashboard expression too); this only has
//! to tell metric names from functions, keywords, label names and durations.

use std::{collections::BTreeSet, path::Path};

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "inf", "nan", "offset", "atan2",
];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Every metric name `expr` selects.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_group = |i: usize, open: char, close: char| -> usize {
        // From the opening bracket at `i`, the index after its match (strings skipped).
        let mut depth = 0;
        let mut j = i;
        while j < chars.len() {
            let c = chars[j];
            if c == '"' || c == '\'' || c == '`' {
                j = skip_string(&chars, j);
                continue;
            }
            if c == open {
                depth += 1;
            } else if c == close {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '#' {
            // A comment runs to the end of the line.
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (5m, 1.5, 1e3).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c == '$' {
            // A Grafana variable.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let lower = word.to_ascii_lowercase();
            if LABEL_LISTS.contains(&lower.as_str()) {
                if next < chars.len() && chars[next] == '(' {
                    i = skip_group(next, '(', ')');
                }
            } else if lower == "offset" {
                // `offset 5m`: the duration is skipped as a number next.
            } else if next < chars.len() && chars[next] == '(' {
                // A function call.
            } else if AGGREGATIONS.contains(&lower.as_str()) || KEYWORDS.contains(&lower.as_str()) {
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut j = start + 1;
    while j < chars.len() {
        if chars[j] == '\\' && quote != '`' {
            j += 2;
            continue;
        }
        if chars[j] == quote {
            return j + 1;
        }
        j += 1;
    }
    j
}

/// The repository's root (where Cargo.toml is).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `(panel title, expr)` of every query in a Grafana dashboard (rows included).
pub fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_owned()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    // Both the plain export and the `{"dashboard": ...}` API envelope.
    let root = if dashboard["dashboard"].is_object() {
        &dashboard["dashboard"]
    } else {
        dashboard
    };
    walk(&root["panels"], &mut out);
    out
}

/// The dashboards under `monitoring/grafana/dashboards/`, parsed.
pub fn dashboards() -> Vec<(String, serde_json::Value)> {
    let dir = repo().join("monitoring/grafana/dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            out.push((path.display().to_string(), json));
        }
    }
    assert!(!out.is_empty(), "no dashboard in {}", dir.display());
    out
}

/// `(rule name, expr)` of every alerting and recording rule in `monitoring/alerts.yml`.
pub fn alert_exprs() -> Vec<(String, String)> {
    let path = repo().join("monitoring/alerts.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    let rules: serde_json::Value = serde_norway::from_str(&text).unwrap();
    let mut out = Vec::new();
    for group in rules["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .unwrap_or("")
                .to_owned();
            out.push((name, rule["expr"].as_str().unwrap_or("").to_owned()));
        }
    }
    out
}

/// The exporters' metrics (postgres-exporter's `pg_*`, redis-exporter's
/// `redis_*`): Prometheus scrapes them from the exporters of the production
/// stack, not from the service.
pub fn exported_by_an_exporter(name: &str) -> bool {
    name.starts_with("pg_") || name.starts_with("redis_")
}

/// Names of the exporters' metrics, of the alert rules' recording rules and of
/// the series Prometheus makes itself: those are not for the service to export.
pub fn not_exported_by_the_service(name: &str) -> bool {
    name == "up" || exported_by_an_exporter(name) || name.contains(':')
}

/// The metric names present in a Prometheus text exposition.
pub fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_owned())
        .collect()
}

/// The value of the series `name` whose labels include every pair of `labels`
/// in a Prometheus text exposition, if there is one (the first, should several
/// match). Label values are read with their escapes (`\"`, `\\`, `\n`).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}')?)?),
                None => (series, Vec::new()),
            };
            let wanted = series_name == name
                && labels.iter().all(|(k, v)| {
                    series_labels
                        .iter()
                        .any(|(key, value)| key == k && value == v)
                });
            wanted.then(|| value.parse().ok()).flatten()
        })
}

/// `key="value",…` of an exposition line, unescaped; `None` if malformed.
fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim_start_matches(',').to_owned(), value));
        rest = &after[end + 1..];
    }
    Some(labels)
}
